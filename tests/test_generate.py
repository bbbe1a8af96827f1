"""Generation requests and the CLI: prompt validation, samplers on a model through `Generator`, sample quality
metrics, and `diffgemma-generate` end to end on the session's trained tiny run. The sampler options' checks are in
test_samplers.py."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.errors import ConfigError, GenerationError
from diffgemma_jax.model import ModelConfig, build_model, make_mask
from diffgemma_jax.objectives.ar import next_token_nll
from diffgemma_jax.sampling.quality import GenerativePerplexity, unigram_entropy
from diffgemma_jax.sampling.requests import Generator, validate_prompt
from diffgemma_jax.sampling.samplers import GenerationOptions, validate_options
from launch.generate import main

# The CLI runs below compile the samplers an earlier call compiled: read back from JAX's cache.
pytestmark = pytest.mark.usefixtures("compilation_cache")

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=4, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense")
MASK, EOS = 4, 3


def test_bad_prompts():
  with pytest.raises(GenerationError, match="empty"):
    validate_prompt("  \n", [2], 128)
  with pytest.raises(GenerationError, match="longer than the model's context of 4 tokens"):
    validate_prompt("abc", [2, 10, 11, 12, 13], 4)
  validate_prompt("abc", [2, 10, 11, 12], 4)


@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x", "--sampler", "nope"], "unknown"),
    (["--prompt", "x", "--threshold", "2"], "--threshold"),
    (["--prompt", "x", "--steps", "0"], "--steps"),
])
def test_cli_bad_input_exits_2(argv, message, capsys, tmp_path):
  code = main(["--config", "configs/pretrain_tiny.py", "--workdir", str(tmp_path)] + argv)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def generator():
  return Generator(build_model(TINY, 0), mask_id=MASK, eos_id=EOS)


def test_threshold_one_equals_one_token_per_step_on_a_model(generator):
  prompt = np.asarray(jax.random.randint(jax.random.key(0), (1, 6), 5, TINY.vocab_size))
  runs = {}
  for sampler in ("threshold_nocache", "low_confidence"):
    options = validate_options(GenerationOptions(sampler=sampler, gen_length=16, block_length=8, threshold=1.0,
                                                 stop_at_eos=False), "masked")
    (runs[sampler],) = generator.run(prompt, options)
  assert runs["threshold_nocache"]["sequence"] == runs["low_confidence"]["sequence"]
  assert runs["threshold_nocache"]["model_calls"] == 16
  assert runs["low_confidence"]["sequence"][:6] == prompt[0].tolist()


def test_generation_is_reproducible_with_a_seed(generator):
  prompt = np.asarray(jax.random.randint(jax.random.key(1), (2, 6), 5, TINY.vocab_size))
  def run(seed):
    options = validate_options(GenerationOptions(sampler="threshold", gen_length=16, block_length=8, temperature=1.0,
                                                 seed=seed, stop_at_eos=False), "masked")
    return [r["sequence"] for r in generator.run(prompt, options)]
  first = run(3)
  assert run(3) == first
  assert run(4) != first
  assert all(seq[:6] == row.tolist() for seq, row in zip(first, prompt))
  assert all(MASK not in seq for seq in first)


def test_generative_perplexity_and_unigram_entropy():
  assert unigram_entropy([7, 7, 7, 7]) == 0.0
  assert unigram_entropy([5, 6, 5, 6]) == pytest.approx(math.log(2))
  model = build_model(TINY, 5)
  P, L = 3, 10
  sequences = np.array(jax.random.randint(jax.random.key(5), (2, L), 5, TINY.vocab_size))
  sequences[1, 6] = EOS  # row 1 is scored through its EOS only
  result = GenerativePerplexity(model)(sequences, P, eos_id=EOS)
  positions = jnp.broadcast_to(jnp.arange(L), (2, L))
  ones = jnp.ones((2, L), jnp.int32)
  logits = model(jnp.asarray(sequences), positions, make_mask("causal", ones, positions))[0]
  nll, _ = next_token_nll(logits, jnp.asarray(sequences), ones)
  expected_rows = [np.asarray(nll[0, P - 1:]), np.asarray(nll[1, P - 1:6])]
  expected = math.exp(sum(r.sum() for r in expected_rows) / sum(r.size for r in expected_rows))
  assert result["num_tokens"] == (L - P) + (7 - P)
  assert result["gen_ppl"] == pytest.approx(expected, rel=1e-4)
  assert result["per_sample_gen_ppl"][1] == pytest.approx(math.exp(expected_rows[1].mean()), rel=1e-4)


def test_cli_generates_on_the_trained_tiny_run(trained_run, tiny_config_file, tmp_path, capsys):
  _, workdir, _ = trained_run
  code = main(["--config", tiny_config_file, "--workdir", workdir, "--prompt", "def main(", "--gen_length", "16",
               "--block_length", "8", "--json"])
  out = capsys.readouterr().out
  assert code == 0, out
  (result,) = json.loads(out)
  assert result["sampler"] == "threshold" and result["step"] > 0
  assert 0 <= result["new_tokens"] <= 16 and 1 <= result["model_calls"] <= 16
  assert result["tokens_per_s"] >= 0 and isinstance(result["completion"], str)
  assert "warning" not in capsys.readouterr().err
  # continuous batching of the masked model's default sampler: each request's tokens and calls as alone (calls at
  # the one slot width the flag leaves)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("class A:\ndef main(\nimport os\n")
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--prompts", str(prompts), "--gen_length", "16",
               "--block_length", "8", "--serving_slots", "2", "--serving_widths", "1", "--json"]) == 0
  served = json.loads(capsys.readouterr().out)[1]
  assert served["prompt"] == "def main(" and served["sampler"] == "threshold" and served["batch_size"] == 2
  assert served["ids"] == result["ids"] and served["model_calls"] == result["model_calls"]
  # Past the trained context: generated, with a warning that names the limit.
  code = main(["--config", tiny_config_file, "--workdir", workdir, "--prompt", "def main(", "--gen_length", "32",
               "--block_length", "8"])
  assert code == 0
  assert "past the 32 the model was trained on (train.seq_len)" in capsys.readouterr().err


@pytest.mark.parametrize("objective,sampler", [("uniform", "entropy_bound"), ("block", "block_threshold")])
def test_cli_generates_canvases_from_block_and_uniform_runs(objective, sampler, load_tiny, tiny_config_file,
                                                            tmp_path, capsys):
  """One training step is enough for a checkpoint: the canvas samplers run end to end from the CLI."""
  from diffgemma_jax.train import train
  overrides = {"objective.name": objective, "objective.block_size": "8", "train.num_steps": "1",
               "checkpoint.every_steps": "1"}
  if objective == "uniform":
    overrides["model.self_conditioning"] = "True"
  workdir = str(tmp_path / "run")
  train(load_tiny(overrides), workdir, show_progress=False)
  flags = [f"--config.{key}={value}" for key, value in overrides.items()]
  base = ["--config", tiny_config_file, "--workdir", workdir, "--prompt", "def main(", "--gen_length", "16"] + flags
  if objective == "uniform":
    base += ["--max_denoising_steps", "4"]
  assert main(base + ["--json"]) == 0
  (result,) = json.loads(capsys.readouterr().out)
  assert result["sampler"] == sampler and result["step"] == 1
  steps = result["steps_per_canvas"]
  assert 1 <= len(steps) <= 2 and all(1 <= s <= (4 if objective == "uniform" else 8) for s in steps)
  assert result["model_calls"] == 1 + sum(steps) + len(steps) - 1
  assert main(base) == 0
  out = capsys.readouterr().out
  assert f"steps per canvas {steps}" in out and f"sampler {sampler}" in out and "def main(" in out
  if objective == "block":  # continuous batching: more prompts than slots, each one's tokens as alone
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\nimport os\nclass A:\n")
    served = base[:4] + ["--prompts", str(prompts)] + base[6:] + ["--serving_slots", "2", "--json"]
    assert main(served) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in results] == ["def main(", "import os", "class A:"]
    assert results[0]["ids"] == result["ids"] and results[0]["steps_per_canvas"] == steps
    assert results[0]["model_calls"] == result["model_calls"] and results[0]["batch_size"] == 2
    # the fused-commit twin writes the same greedy tokens in no more calls
    assert main(base + ["--json", "--sampler", "block_fused"]) == 0
    (fused,) = json.loads(capsys.readouterr().out)
    assert fused["sampler"] == "block_fused" and fused["ids"] == result["ids"]
    assert fused["model_calls"] <= result["model_calls"]


def test_tokenizer_precedence_workdir_then_data_tokenizer(trained_run, load_tiny, tmp_path):
  from diffgemma_jax.sampling.requests import load_tokenizer
  _, workdir, _ = trained_run
  pinned = os.path.join(workdir, "tokenizer.model")
  config = load_tiny({"data.tokenizer": pinned})
  assert load_tokenizer(config, workdir).path == pinned
  empty = tmp_path / "imported"  # e.g. a diffgemma-import workdir: no pinned tokenizer
  empty.mkdir()
  assert load_tokenizer(config, str(empty)).path == pinned


def test_prompts_file_escapes_jsonl_and_bad_bytes(tmp_path):
  import argparse

  from launch.generate import _read_requests
  text = tmp_path / "p.txt"
  text.write_bytes(b'\xef\xbb\xbfdef f():\\n    return 1\n\nprint("a\\\\nb")\r\n')
  assert list(_read_requests(argparse.Namespace(prompt=None, prompts=str(text)))[0]) == [
      "def f():\n    return 1", 'print("a\\nb")']
  lines = tmp_path / "p.jsonl"
  lines.write_text(json.dumps("x\\n") + "\n" + json.dumps({"prompt": "caf\u00e9\n"}) + "\n")
  assert list(_read_requests(argparse.Namespace(prompt=None, prompts=str(lines)))[0]) == ["x\\n", "caf\u00e9\n"]
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"ok\ncaf\xe9 = 1\n")
  with pytest.raises(ConfigError, match=r"bad.txt:2: not valid UTF-8"):
    _read_requests(argparse.Namespace(prompt=None, prompts=str(bad)))
  lines.write_text('{"text": "x"}\n')
  with pytest.raises(ConfigError, match=r"p.jsonl:1: expected a JSON string or an object with a string 'prompt'"):
    _read_requests(argparse.Namespace(prompt=None, prompts=str(lines)))


def test_default_gen_length_fills_the_context(trained_run, tiny_config_file, capsys):
  """No --gen_length: as many whole blocks as fit after the prompt (train.seq_len 32 here), no warning."""
  _, workdir, _ = trained_run
  code = main(["--config", tiny_config_file, "--workdir", workdir, "--prompt", "def main(", "--block_length", "8",
               "--json"])
  captured = capsys.readouterr()
  assert code == 0 and "warning" not in captured.err, captured.err
  (result,) = json.loads(captured.out)
  room = 32 - result["prompt_tokens"]
  assert result["gen_length"] == room // 8 * 8 and result["new_tokens"] <= result["gen_length"]
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--prompt", "def main(", "--top_p", "0.5"]) == 2
  assert "--top_p does not apply to --sampler threshold" in capsys.readouterr().err


def test_a_jsonl_output_keeps_each_result_and_a_rerun_or_a_share_gives_the_whole_jobs(trained_run, tiny_config_file,
                                                                                       tmp_path, capsys, monkeypatch):
  """--output FILE.jsonl: one line per request in index order; a job killed after two requests (and half a line)
  run again generates the other three only, and two --shard halves each run theirs: every result (ids, completion,
  calls) equals the uninterrupted job's, whose fitted gen_length depends on all five prompts. Other prompts, other
  settings or another checkpoint step are refused in one line."""
  import launch.generate
  _, workdir, _ = trained_run
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("def main(\nimport os\nclass Reader(object):\nx = 1\nfor i in range(10):\n")
  base = ["--config", tiny_config_file, "--workdir", workdir, "--prompts", str(prompts), "--block_length", "8",
          "--batch_size", "2", "--json"]
  ran = []
  real = launch.generate.generate_completions
  monkeypatch.setattr(launch.generate, "generate_completions",
                      lambda *a, **k: ran.append(list(k["only"])) or real(*a, **k))

  def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]

  def same(a, b):
    return {k: a[k] for k in ("index", "prompt", "ids", "completion", "model_calls", "gen_length", "step")} == {
        k: b[k] for k in ("index", "prompt", "ids", "completion", "model_calls", "gen_length", "step")}

  whole = tmp_path / "whole.jsonl"
  assert main(base + ["--output", str(whole)]) == 0
  printed = json.loads(capsys.readouterr().out)
  want = lines(whole)
  assert [r["index"] for r in want] == [0, 1, 2, 3, 4] and ran == [[0, 1, 2, 3, 4]]
  assert all(same(a, b) for a, b in zip(printed, want)) and len({r["settings"] for r in want}) == 1
  assert len({r["gen_length"] for r in want}) == 1  # fitted to the longest of the five prompts
  killed = tmp_path / "killed.jsonl"
  text = whole.read_text().splitlines(keepends=True)
  killed.write_text(text[0] + text[3] + text[4][:25])  # requests 0 and 3 done, 4 cut short
  assert main(base + ["--output", str(killed)]) == 0
  captured = capsys.readouterr()
  assert "2 request(s) already done, 3 to run" in captured.err and ran[-1] == [1, 2, 4]
  assert all(same(a, b) for a, b in zip(lines(killed), want)) and len(lines(killed)) == 5
  assert all(same(a, b) for a, b in zip(json.loads(captured.out), want))
  for k in (0, 1):
    share = tmp_path / f"share{k}.jsonl"
    assert main(base + ["--output", str(share), "--shard", f"{k}/2"]) == 0
    got = lines(share)
    assert [r["index"] for r in got] == list(range(k, 5, 2)) and all(same(r, want[r["index"]]) for r in got)
    assert [r["index"] for r in json.loads(capsys.readouterr().out)] == list(range(k, 5, 2))
  before = len(ran)
  assert main(base + ["--output", str(whole)]) == 0 and len(ran) == before + 1 and ran[-1] == []  # nothing left
  capsys.readouterr()
  # Two copies of one launch (srun on two nodes, never joined) and no --shard: copy 1 runs its share into a part
  # file of its own and prints nothing; copy 0 runs its share into the file, gathers copy 1's part and prints the
  # whole job; the part is then gone, and the launch run again runs nothing
  import launch.common
  split, part = tmp_path / "split.jsonl", tmp_path / "split.part-1-of-2.jsonl"
  launch_process = launch.common.launch_process

  def copy_of_launch(copy):
    monkeypatch.setattr(launch.common, "launch_process", lambda config=None: (copy, 2))
    assert main(base + ["--output", str(split)]) == 0
    return capsys.readouterr()

  assert copy_of_launch(1).out == "" and ran[-1] == [1, 3] and not split.exists()
  assert [r["index"] for r in lines(part)] == [1, 3]
  printed = json.loads(copy_of_launch(0).out)
  assert ran[-1] == [0, 2, 4] and all(same(a, b) for a, b in zip(printed, want)) and len(printed) == 5
  assert all(same(a, b) for a, b in zip(lines(split), want)) and len(lines(split)) == 5 and not part.exists()
  for copy in (1, 0):
    copy_of_launch(copy)
    assert ran[-1] == [] and not part.exists()
  monkeypatch.setattr(launch.common, "launch_process", launch_process)
  for flags, message in ((["--seed", "1"], "was made with other settings"),
                         (["--shard", "2/2"], "--shard '2/2': give K/N with 0 <= K < N"),
                         (["--step", "8"], "holds results of checkpoint step 24 (params weights) and this run reads "
                                           "step 8 (params weights); pass --step 24")):
    partial = tmp_path / "partial.jsonl"
    partial.write_text(text[0])
    assert main(base + ["--output", str(partial)] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
  other = tmp_path / "other.txt"
  other.write_text("while True:\n")
  assert main(base[:4] + ["--prompts", str(other)] + base[6:] + ["--output", str(whole)]) == 2
  assert "holds a result for another request than request 0" in capsys.readouterr().err
  foreign = tmp_path / "foreign.jsonl"  # a file of something else, even one unfinished line, is refused, not cut
  foreign.write_text('{"prompt": "def f(')
  assert main(base + ["--output", str(foreign)]) == 2
  assert "foreign.jsonl:1 is not a line of diffgemma-generate's results" in capsys.readouterr().err
  assert foreign.read_text() == '{"prompt": "def f('


def test_a_results_file_is_read_from_where_its_last_read_ended_and_synced_at_most_every_interval(tmp_path,
                                                                                                   monkeypatch):
  """A reader of a results file another process appends (process 0 polling a copy's part) reads only the lines
  added since its last read, a line still being written not at all, and the whole file again once it is replaced
  (the job's end); the writer syncs the file to disk at most every sync_every_s, and at the end."""
  import os

  from diffgemma_jax.sampling.results_file import ResultsFile
  prompts, settings, path = ["a", "b", "c", "d"], {"sampler": "threshold"}, str(tmp_path / "part.jsonl")
  syncs = []
  real_fsync = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
  writer = ResultsFile(path, prompts, settings, sync_every_s=3600)
  reader = ResultsFile(path, prompts, settings, write=False)
  assert reader.refresh() == []
  writer.add(2, {"prompt": "c", "step": 1, "weights": "params"})
  writer.add(0, {"prompt": "a", "step": 1, "weights": "params"})
  assert syncs == [] and reader.refresh() == [2, 0] and reader.refresh() == []
  with open(path, "ab") as f:
    f.write(b'{"ind')  # a line being written: not read until it is whole
  assert reader.refresh() == []
  with open(path, "ab") as f:
    f.write(b'ex": 1, "prompt": "b", "step": 1, "weights": "params", "settings": "' + writer.digest.encode() + b'"}\n')
  assert reader.refresh() == [1] and reader._offset == os.path.getsize(path)
  writer.sync_every_s = 0
  writer.add(3, {"prompt": "d", "step": 1, "weights": "params"})
  assert len(syncs) == 1 and reader.refresh() == [3]
  writer.records[1] = reader.records[1]
  writer.finish()  # replaced whole, in order: read again from its start
  assert len(syncs) >= 2 and reader.refresh() == [0, 1, 2, 3]


def test_a_results_file_holds_its_lines_and_writes_and_prints_them_a_line_at_a_time(tmp_path):
  """A results file holds each result as its JSON line (a result's ids as Python ints took several times their
  text, three copies of a large job's results held it whole: bench/results_memory.py); its end rewrites the file
  in index order and returns the results parsed as they are iterated; the JSON document of --json is printed an
  item at a time, the text of json.dumps(list, indent=2) (and diffgemma-score's report, its records so)."""
  import json

  from diffgemma_jax.sampling.results_file import ResultsFile
  from launch.common import json_array, json_document
  prompts, path = ["a", "b", "c"], str(tmp_path / "out.jsonl")
  kept = ResultsFile(path, prompts, {"sampler": "threshold"})
  for i in (2, 0, 1):
    kept.add(i, {"prompt": prompts[i], "ids": [262_000 + i, 7], "completion": "\u00e9t\u00e9", "step": 1,
                 "weights": "params"})
  with open(path, "rb") as f:
    lines = f.read().splitlines()
  assert [kept.records[i] for i in (2, 0, 1)] == lines and all(isinstance(line, bytes) for line in lines)
  results = kept.finish()
  with open(path, "rb") as f:
    assert f.read() == b"".join(kept.records[i] + b"\n" for i in (0, 1, 2))
  assert len(results) == 3 and list(results) == [json.loads(kept.records[i]) for i in (0, 1, 2)]
  assert [r["ids"] for r in results] == [[262_000, 7], [262_001, 7], [262_002, 7]]
  for items in ([], list(results)[:1], list(results)):
    assert "\n".join(json_array(iter(items))) == json.dumps(items, indent=2)
    report = {"step": 1, "records": items, "summary": {"nll": 2.5}}  # diffgemma-score's, its records streamed
    assert "\n".join(json_document(dict(report, records=iter(items)), "records")) == json.dumps(report, indent=2)


def test_a_results_file_keeps_its_lines_on_disk_and_where_they_lie_in_memory(tmp_path):
  """A results file's lines are spooled to an unnamed file beside it (a million requests took about 2 GB as lines
  in memory): 2,000 results of 2 kB allocate under a tenth of their size in Python objects; every line reads back
  the same, one given again reads as its new bytes, indices iterate in the order first given."""
  import os
  import tracemalloc

  from diffgemma_jax.sampling.results_file import ResultsFile, SpooledLines
  prompts = [f"p{i}" for i in range(2000)]
  kept = ResultsFile(str(tmp_path / "out.jsonl"), prompts, {"sampler": "threshold"})
  assert isinstance(kept.records, SpooledLines)
  tracemalloc.start()
  try:
    for i in reversed(range(2000)):
      kept.add(i, {"prompt": prompts[i], "completion": "x" * 2000, "step": 1, "weights": "params"})
    held = tracemalloc.get_traced_memory()[0]
  finally:
    tracemalloc.stop()
  with open(tmp_path / "out.jsonl", "rb") as f:
    lines = f.read().splitlines()
  assert held < sum(map(len, lines)) / 10, (held, sum(map(len, lines)))
  assert list(kept.records) == list(reversed(range(2000))) and len(kept.records) == 2000
  assert [kept.records[i] for i in reversed(range(2000))] == lines and 2000 not in kept.records
  spooled = SpooledLines(str(tmp_path))
  spooled[5], spooled[3] = b"five", b"three"
  spooled[5] = b"FIVE!"
  assert (list(spooled), list(spooled.values()), 3 in spooled, 4 in spooled) == ([5, 3], [b"FIVE!", b"three"],
                                                                                 True, False)
  assert os.listdir(tmp_path) == ["out.jsonl"]  # the spool files have no name


def test_process_0_gathers_the_parts_as_they_grow_and_fails_once_they_stop(tmp_path):
  """Process 0 of a launch that split a job waits while another copy's part grows (its last request written
  0.3 s after the wait began), then holds every request; a part that stops growing fails it after stale_s in one
  line naming the part and what it lacks; a part of another checkpoint step is refused."""
  import threading
  import time

  from diffgemma_jax.errors import ConfigError
  from diffgemma_jax.sampling.results_file import ResultsFile, gather_parts, part_path
  prompts, settings = ["a", "b", "c", "d"], {"sampler": "threshold"}

  def job(name, parts_have, step=1):
    path = str(tmp_path / f"{name}.jsonl")
    merged, part = ResultsFile(path, prompts, settings), ResultsFile(part_path(path, 1, 2), prompts, settings)
    for i in (0, 2):
      merged.add(i, {"prompt": prompts[i], "step": 1, "weights": "params"})
    for i in parts_have:
      part.add(i, {"prompt": prompts[i], "step": step, "weights": "params"})
    return merged, part

  merged, part = job("grows", [1])
  late = threading.Thread(target=lambda: time.sleep(0.3) or part.add(3, {"prompt": "d", "step": 1,
                                                                           "weights": "params"}))
  late.start()
  gather_parts(merged, prompts, settings, 2, poll_s=0.05, stale_s=5)
  late.join()
  assert sorted(merged.records) == [0, 1, 2, 3] and [r["index"] for r in merged.finish()] == [0, 1, 2, 3]
  merged, _ = job("stops", [1])
  with pytest.raises(ConfigError) as info:
    gather_parts(merged, prompts, settings, 2, poll_s=0.05, stale_s=0.2)
  assert str(info.value) == (f"--output {tmp_path}/stops.jsonl: the shares of other copies of this launch have not "
                             f"grown for 0.2 s: {tmp_path}/stops.part-1-of-2.jsonl (1 left); a copy stopped or "
                             f"failed (see its log); run the same command again to finish the job")
  merged, _ = job("other_step", [1, 3], step=2)
  with pytest.raises(ConfigError, match="other_step.part-1-of-2.jsonl holds results of checkpoint step 2"):
    gather_parts(merged, prompts, settings, 2, poll_s=0.05, stale_s=5)

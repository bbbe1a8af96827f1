"""Held-out bound: the ratio estimator and its delta-method standard error, determinism, and diffgemma-eval."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from conftest import free_port, xla_flags
from diffgemma_jax.evaluate import evaluate, summarize_bound

KEYS = {"step", "num_tokens", "bits_per_token", "stderr_bits_per_token", "ppl_bound", "num_t_samples",
        "unigram_ppl", "exact"}


def test_summarize_bound_ratio_and_delta_method():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 40, 50).astype(float)
  nelbo = lengths * 3.0 + rng.normal(0, 2.0, 50)
  lengths_padded = np.concatenate([lengths, [0, 0]])  # all-padding rows are dropped
  out = summarize_bound(np.concatenate([nelbo, [0, 0]]), lengths_padded)
  ratio = nelbo.sum() / lengths.sum()
  assert out["num_tokens"] == int(lengths.sum()) and out["num_sequences"] == 50
  assert out["bits_per_token"] == pytest.approx(ratio / math.log(2))
  assert out["ppl_bound"] == pytest.approx(math.exp(ratio))
  # delta method == the textbook ratio-estimator variance
  mean_len = lengths.mean()
  var = np.sum((nelbo - ratio * lengths) ** 2) / (50 - 1) / (50 * mean_len ** 2)
  assert out["stderr_bits_per_token"] == pytest.approx(math.sqrt(var) / math.log(2))
  assert "mc_stderr_bits_per_token" not in out
  # given each row's Monte-Carlo standard error: that of the sum, per token
  row_stderr = rng.uniform(0.5, 2.0, 50)
  out = summarize_bound(np.concatenate([nelbo, [0, 0]]), lengths_padded, np.concatenate([row_stderr, [9, 9]]))
  assert out["mc_stderr_bits_per_token"] == pytest.approx(
      math.sqrt(np.sum(row_stderr ** 2)) / lengths.sum() / math.log(2))


def test_evaluate_restores_and_is_deterministic(trained_run, load_tiny):
  """The bound of a step is reproducible, and each row draws by its own id: another eval.batch_size (other
  batch-mates, the last batch padded differently) gives the same bound."""
  from conftest import TRAINED_OVERRIDES
  config, workdir, summary = trained_run
  first = evaluate(config, workdir)
  assert set(first) >= KEYS
  assert first["step"] == 24 and first["num_t_samples"] == config.eval.num_t_samples and first["exact"] is False
  # the trainer's final bound used the same parameters and seed
  assert first["bits_per_token"] == pytest.approx(summary["eval"]["bits_per_token"], rel=1e-6)
  assert first["ppl_bound"] == pytest.approx(2 ** first["bits_per_token"], rel=1e-9)
  assert first["stderr_bits_per_token"] > 0 and first["unigram_ppl"] > 1
  earlier = evaluate(config, workdir, step=8)
  assert earlier["step"] == 8 and earlier["bits_per_token"] > first["bits_per_token"]
  again = evaluate(load_tiny({**TRAINED_OVERRIDES, "eval.batch_size": "3"}), workdir, step=8)
  for key in ("bits_per_token", "stderr_bits_per_token", "mc_stderr_bits_per_token"):
    assert again[key] == pytest.approx(earlier[key], rel=1e-5), key
  assert again["num_tokens"] == earlier["num_tokens"]


def test_eval_cli_writes_json(trained_run, tiny_config_file, tmp_path, capsys):
  from launch.evaluate import main
  _, workdir, _ = trained_run
  output = tmp_path / "bound.json"
  argv = ["--config", tiny_config_file, "--workdir", workdir, "--step", "16", "--output", str(output)]
  assert main(argv + [f"--config.{k}={v}" for k, v in {"train.num_steps": "24"}.items()]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert json.loads(output.read_text()) == printed and printed["step"] == 16 and set(printed) >= KEYS
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--step", "5"]) == 2
  err = capsys.readouterr().err
  assert "--step 5" in err and "[8, 16, 24]" in err
  # an --output that cannot be written fails before the evaluation
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--output", str(tmp_path / "no" / "x.json")]) == 2
  assert "the folder" in capsys.readouterr().err
  # one scored sequence: no standard error, printed as null (standard JSON, no NaN)
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--config.eval.max_sequences=1"]) == 0
  text = capsys.readouterr().out
  assert "NaN" not in text and json.loads(text)["stderr_bits_per_token"] is None


def test_eval_cli_evaluates_several_steps_in_one_run(trained_run, tiny_config_file, capsys):
  """`--step all` and `--step 16,8`: a JSON list in the order asked, each entry the bound the trainer logged at that
  step (the same parameters, rows and draws); `--step best` the lowest of them; a bad --step is a one-line error. Seen to fail with every entry
  evaluated on the first step's parameters."""
  from conftest import read_metrics
  from launch.evaluate import main
  _, workdir, _ = trained_run
  logged = {r["step"]: r["eval/bits_per_token"] for r in read_metrics(workdir) if "eval/bits_per_token" in r}
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--step", "all"]) == 0
  every = json.loads(capsys.readouterr().out)
  assert [r["step"] for r in every] == [8, 16, 24] and all(set(r) >= KEYS for r in every)
  for result in every:
    assert result["bits_per_token"] == pytest.approx(logged[result["step"]], rel=1e-6), result["step"]
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--step", "16,8"]) == 0
  assert [(r["step"], r["bits_per_token"]) for r in json.loads(capsys.readouterr().out)] == [
      (r["step"], r["bits_per_token"]) for r in (every[1], every[0])]
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--step", "best"]) == 0  # one step: no list
  best = json.loads(capsys.readouterr().out)
  assert best["step"] == min(logged, key=logged.get) and best["bits_per_token"] == pytest.approx(
      min(logged.values()), rel=1e-6)
  for bad, message in (("8,x", "give a step number (>= 0) or 'best'"), ("8,5", "--step 5: no such")):
    assert main(["--config", tiny_config_file, "--workdir", workdir, "--step", bad]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def _validation_files(folder):
  """A JSONL file of two records and a text file: standard-library modules the tiny corpus does not hold."""
  import sysconfig
  stdlib = sysconfig.get_paths()["stdlib"]
  folder.mkdir()
  with open(folder / "records.jsonl", "w") as f:
    for name in ("shlex.py", "csv.py"):
      f.write(json.dumps({"text": open(f"{stdlib}/{name}").read()[:6000]}) + "\n")
  (folder / "note.txt").write_text(open(f"{stdlib}/glob.py").read()[:5000])
  return folder


def test_evaluation_sets_live_in_the_dataset_cache_under_its_cap(load_tiny, tiny_tokenizer, tmp_path, monkeypatch):
  """An evaluation set built in the default place is in data.cache_dir (`eval-sets/<key>`), and data.cache_max_gb
  counts it with the dataset copies: using a second set under a cap that holds one evicts the least recently used
  (never a set this process uses), and a set being built (`.partial`) is never taken for a finished one."""
  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.train.dataset import EVAL_SETS, heldout_set
  cache = tmp_path / "cache"
  monkeypatch.setattr(remote_dataset, "_IN_USE", set())
  monkeypatch.setattr(remote_dataset, "_CAPS", {})
  folders = []
  for name in ("a", "b"):
    _validation_files(tmp_path / name)
    config = load_tiny({"data.cache_dir": str(cache), "data.build_workers": "1"})
    folders.append(heldout_set(config, tiny_tokenizer.path, str(tmp_path / name))[0])
  assert [os.path.dirname(f) for f in folders] == [str(cache / EVAL_SETS)] * 2 and folders[0] != folders[1]
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folders[0]) for f in fs)
  os.makedirs(folders[0] + "x.partial")  # another build's staging, in progress
  remote_dataset._IN_USE.clear()  # pylint: disable=protected-access (a later process: neither set in use)
  os.utime(folders[0], (1, 1))  # the least recently used set
  os.utime(folders[0] + "x.partial", (0, 0))  # older still
  config = load_tiny({"data.cache_dir": str(cache), "data.cache_max_gb": str(1.5 * size / 2**30),
                      "data.build_workers": "1"})
  assert heldout_set(config, tiny_tokenizer.path, str(tmp_path / "b"))[0] == folders[1]
  assert not os.path.exists(folders[0]) and os.path.isdir(folders[1]) and os.path.isdir(folders[0] + "x.partial")
  assert heldout_set(config, tiny_tokenizer.path, str(tmp_path / "a"))[0] == folders[0]  # built again; b is in use
  assert os.path.isdir(folders[0]) and os.path.isdir(folders[1])


def test_the_trainer_evaluates_eval_heldout_sets_as_diffgemma_eval_heldout_does(load_tiny, tmp_path, monkeypatch):
  """eval.heldout_sets: at each evaluation the trainer also scores each named set (eval.max_sequences rows of it),
  logged as eval/NAME/... and summarised; each value is diffgemma-eval --heldout's on the same files and step, and
  diffgemma-eval under the same config reports them under heldout_sets. With eval.rank_by=code the checkpoint
  records code's bound (keep_best's and --step best's ranking)."""
  from conftest import read_metrics
  from diffgemma_jax.train import train
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  val = _validation_files(tmp_path / "val")
  sets = f"code={val / 'records.jsonl'}; notes = {val}/*.txt"
  config = load_tiny({"train.num_steps": "2", "checkpoint.every_steps": "2", "eval.heldout_sets": sets,
                      "eval.rank_by": "code", "checkpoint.keep_best": "1"})
  workdir = str(tmp_path / "run")
  summary = train(config, workdir, show_progress=False)
  logged = {key: r[key] for r in read_metrics(workdir) for key in r if key.startswith("eval/")}
  assert sorted(summary["eval"]["heldout_sets"]) == ["code", "notes"]
  again = evaluate(config, workdir)  # diffgemma-eval scores the config's sets too
  for name, files in (("code", str(val / "records.jsonl")), ("notes", f"{val}/*.txt")):
    expected = evaluate(config, workdir, heldout=files)
    assert logged[f"eval/{name}/bits_per_token"] == pytest.approx(expected["bits_per_token"], rel=1e-6), name
    assert logged[f"eval/{name}/num_tokens"] == expected["num_tokens"] and logged[f"eval/{name}/unigram_ppl"] > 1
    assert summary["eval"]["heldout_sets"][name]["bits_per_token"] == logged[f"eval/{name}/bits_per_token"]
    assert again["heldout_sets"][name]["bits_per_token"] == pytest.approx(expected["bits_per_token"], rel=1e-6)
    assert again["heldout_sets"][name]["unigram_ppl"] == logged[f"eval/{name}/unigram_ppl"]
  assert logged["eval/bits_per_token"] == summary["eval"]["bits_per_token"]  # the run's own set, as before
  assert summary["best_checkpoint"] == {"step": 2, "bits_per_token": logged["eval/code/bits_per_token"],
                                        "stderr_bits_per_token": logged["eval/code/stderr_bits_per_token"],
                                        "weights": "params", "set": "code"}
  assert again["bits_per_token"] == pytest.approx(logged["eval/bits_per_token"], rel=1e-6)


def test_eval_heldout_scores_a_set_of_your_own_with_the_runs_tokenizer(trained_run, tiny_config_file, load_tiny,
                                                                         tmp_path, monkeypatch, capsys):
  """diffgemma-eval --heldout FILES: every document of those files (a JSONL file and a text file here), tokenised
  with the run's tokenizer into an evaluation set in the cache, every sequence scored (the config caps eval at 8):
  the same bound as the config's evaluation of a dataset whose held-out split is those files (text_files with
  data.heldout_source); built once, found current the second time; the training split's unigram model as its
  scale. The set cannot be trained on, needs a tokenizer to build, and bad flags are one line."""
  import sysconfig

  from conftest import TRAINED_OVERRIDES
  from data_recipes import text_files
  from diffgemma_jax.data import make_train_iterator
  from diffgemma_jax.errors import DataError
  from launch.evaluate import main
  _, workdir, _ = trained_run
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  stdlib = sysconfig.get_paths()["stdlib"]
  val = _validation_files(tmp_path / "val")
  argv = ["--config", tiny_config_file, "--workdir", workdir, "--step", "24", "--heldout", str(val)]
  assert main(argv) == 0
  captured = capsys.readouterr()
  result = json.loads(captured.out)
  assert "building a dataset of data.heldout_source" in captured.err
  assert result["heldout"] == str(val) and result["dataset"].startswith(str(tmp_path / "cache" / "diffgemma-jax" /
                                                                             "datasets" / "eval-sets"))
  assert result["num_examples"] > 8 and result["unigram_ppl"] > 1 and set(result) >= KEYS
  assert main(argv) == 0  # current: not built again, the same bound
  captured = capsys.readouterr()
  assert "building" not in captured.err and json.loads(captured.out) == result
  # the reference: a dataset of other files whose held-out split is these, evaluated as the config's own
  other = tmp_path / "other"
  other.mkdir()
  (other / "a.txt").write_text(open(f"{stdlib}/bisect.py").read())
  reference = tmp_path / "reference"
  text_files.build(str(reference), source=str(other), heldout_source=str(val),
                   tokenizer=f"{workdir}/tokenizer.model", build_workers=1)
  expected = evaluate(load_tiny({**TRAINED_OVERRIDES, "data.dir": str(reference), "data.source": str(other),
                                 "data.heldout_source": str(val), "data.tokenizer": f"{workdir}/tokenizer.model",
                                 "eval.max_sequences": "0"}), workdir, step=24)
  for key in ("num_tokens", "num_examples"):
    assert result[key] == expected[key], key
  for key in ("bits_per_token", "stderr_bits_per_token", "mc_stderr_bits_per_token"):
    assert result[key] == pytest.approx(expected[key], rel=1e-5), key
  with pytest.raises(DataError, match="is an evaluation set .* it has no train split"):
    make_train_iterator(result["dataset"], seq_len=32, batch_size=2, seed=0)
  with pytest.raises(DataError, match="an evaluation set is read with the tokenizer of the model it evaluates"):
    text_files.build(str(tmp_path / "untokenised"), heldout_source=str(val), build_workers=1)
  capsys.readouterr()
  renamed = tmp_path / "renamed.jsonl"  # the same records with their text under "content"
  renamed.write_text("".join(json.dumps({"content": json.loads(line)["text"]}) + "\n"
                             for line in (val / "records.jsonl").read_text().splitlines()))
  read = []
  for extra in ([str(renamed), "--text_field", "content"], [str(val / "records.jsonl")]):
    assert main(["--config", tiny_config_file, "--workdir", workdir, "--step", "24", "--heldout"] + extra) == 0
    read.append(json.loads(capsys.readouterr().out))
  by_content, by_text = read
  assert by_content["num_tokens"] == by_text["num_tokens"] and by_content["bits_per_token"] == by_text["bits_per_token"]
  for extra, message in ((["--heldout_dir", str(tmp_path / "x")], "--heldout_dir: only with --heldout"),
                         (["--text_field", "content"], "--text_field: only with --heldout"),
                         (["--heldout", str(renamed)], "renamed.jsonl:1"),
                         (["--heldout", str(tmp_path / "missing")],
                          f"--heldout '{tmp_path / 'missing'}' does not exist"),
                         (["--heldout", str(val), "--heldout_dir", "s3://runs/x"], "give a local folder")):
    assert main(["--config", tiny_config_file, "--workdir", workdir] + extra) == 2
    err = capsys.readouterr().err  # (after the build's progress line, where a build starts)
    assert message in err.splitlines()[-1] and err.count("error: ") == 1 and "Traceback" not in err, err


def test_token_shift_block_size_1_evaluates_to_the_ar_likelihood(load_tiny, trained_run):
  """Weights read as a token-shift block model with b = 1 predict every token by the causal pass, so evaluate
  scores exactly the AR baseline's tokens and, in expectation over the noise, reports its exact likelihood (an
  end-to-end check of the adaptation path: init.checkpoint parameters into another objective).

  Both evaluations score the same rows, and the AR value is exact, so their gap is pure Monte-Carlo noise: it is
  compared with the Monte-Carlo error (0.05 bits with 256 noise levels), not with the spread across rows (0.17).
  The predictions do not depend on the noise, so the identity holds for every eps; eps = 0.05 cuts the variance of
  the 1/t weights (the heavy tail of t near 1e-3) by 2.7. A 4% bias is 7 errors."""
  _, workdir, _ = trained_run
  ar = evaluate(load_tiny({"objective.name": "ar"}), checkpoint=workdir)
  shifted = evaluate(load_tiny({"objective.name": "block", "objective.block_size": "1", "model.token_shift": "True",
                                "objective.eps": "0.05", "eval.num_t_samples": "256"}), checkpoint=workdir)
  assert ar["exact"] and not shifted["exact"] and ar["mc_stderr_bits_per_token"] == 0.0
  assert shifted["num_tokens"] == ar["num_tokens"] and shifted["num_examples"] == ar["num_examples"]
  gap = abs(shifted["bits_per_token"] - ar["bits_per_token"])
  assert gap < 4 * shifted["mc_stderr_bits_per_token"], (shifted, ar)


# ---- long evaluations: partial results kept, a stopped evaluation continued --------------------------------------
def test_partial_results_resume_only_under_their_own_key(tmp_path):
  from diffgemma_jax.train.bound_partial import PartialBound
  rng = np.random.default_rng(0)
  batches = [tuple(rng.normal(size=4) for _ in range(3)) for _ in range(3)]
  path, key, notes = str(tmp_path / "p.npz"), {"step": 8, "seed": 0}, []
  saved = PartialBound(path, key)
  for batch in batches:
    saved.add(*batch)
  saved.save(force=True)
  again = PartialBound(path, dict(key), log=notes.append)
  assert again.resume(num_batches=5) == 3 and not notes
  for got, want in zip(again.rows(), (np.concatenate(x) for x in zip(*batches))):
    np.testing.assert_array_equal(got, want)
  assert PartialBound(path, key).resume(num_batches=2) == 2  # never more batches than the evaluation has
  assert PartialBound(path, {"step": 8, "seed": 1}, log=notes.append).resume(5) == 0
  assert notes[-1].endswith("partial results of another evaluation (differs in seed); evaluating from the first batch")
  (tmp_path / "p.npz").write_bytes(b"cut short")
  assert PartialBound(path, key, log=notes.append).resume(5) == 0 and "unreadable partial results" in notes[-1]
  saved.discard()
  assert not (tmp_path / "p.npz").exists()


def test_process_0_alone_decides_whether_a_joined_evaluation_resumes(tmp_path, monkeypatch):
  """A joined evaluation: process 0 checks the file's key and sends the file only where it matches; another
  process takes what it sent whatever its own key says, so a key that differs between hosts (a checkpoint path
  mounted elsewhere) cannot make one process continue while another starts over. The broadcast is stood in for:
  `from_process_0` returns what process 0 sends."""
  from diffgemma_jax.train import bound_partial
  from diffgemma_jax.train.bound_partial import PartialBound
  path = str(tmp_path / "p.npz")
  saved = PartialBound(path, {"checkpoint": "/a/run"})
  saved.add(np.arange(3.0), np.ones(3), np.full(3, 7))
  saved.save(force=True)
  sent = []
  monkeypatch.setattr(bound_partial, "from_process_0", lambda data: sent.append(data) or data)
  assert PartialBound(path, {"checkpoint": "/b/run"}).resume(num_batches=4) == 0 and sent == [b""]
  assert PartialBound(path, {"checkpoint": "/a/run"}).resume(num_batches=4) == 1
  assert sent[-1] == (tmp_path / "p.npz").read_bytes()
  monkeypatch.setattr(bound_partial, "is_first_process", lambda: False)
  for from_0, done in ((sent[-1], 1), (b"", 0)):
    monkeypatch.setattr(bound_partial, "from_process_0", lambda data, from_0=from_0: from_0)
    other = PartialBound(str(tmp_path / "not-read.npz"), {"checkpoint": "/b/run"})
    assert other.resume(num_batches=4) == done
    if done:
      assert other.rows()[2].tolist() == [7, 7, 7]


def test_partial_results_in_a_bucket(bucket):
  """A bucket workdir's partial results: written whole as one object, read back, removed when done."""
  from diffgemma_jax import storage
  from diffgemma_jax.train.bound_partial import PartialBound
  url = f"{bucket}/eval-partial/heldout-step8-set0.npz"
  saved = PartialBound(url, {"step": 8})
  saved.add(np.arange(3.0), np.ones(3), np.full(3, 7))
  saved.save(force=True)
  again = PartialBound(url, {"step": 8})
  assert again.resume(num_batches=4) == 1 and again.rows()[2].tolist() == [7, 7, 7]
  again.discard()
  assert storage.file_size(url) is None


RESUME_IN_ONE_OF_TWO = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from diffgemma_jax.train.bound_partial import PartialBound
partial = PartialBound(sys.argv[3], {"step": 8})
done = partial.resume(num_batches=5)
print(json.dumps([done] + ([a.tolist() for a in partial.rows()] if done else [])), flush=True)
jax.distributed.shutdown()
"""


def test_processes_whose_workdirs_are_their_own_disks_resume_from_process_0s_results(tmp_path):
  """Two processes (jax.distributed on CPU), each with its own partial-results folder, as hosts whose workdir is a
  local disk: only process 0's holds the file (process 0 writes it), and both continue from its 2 batches with its
  rows. Reading the file on every process, the other one would find none and start over: the same global batches
  scored from different rows, and one process running more steps than the other."""
  import os
  import subprocess
  import sys

  from diffgemma_jax.train.bound_partial import PartialBound
  saved = PartialBound(str(tmp_path / "host0" / "p.npz"), {"step": 8})
  saved.add(np.arange(3.0), np.ones(3), np.full(3, 7))
  saved.add(np.arange(3.0, 6.0), np.ones(3), np.full(3, 5))
  saved.save(force=True)
  address = f"127.0.0.1:{free_port()}"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo, XLA_FLAGS=xla_flags())
  procs = [subprocess.Popen([sys.executable, "-c", RESUME_IN_ONE_OF_TWO, address, str(rank),
                             str(tmp_path / f"host{rank}" / "p.npz")], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for rank in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  expected = [2, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 6, [7, 7, 7, 5, 5, 5]]
  assert [json.loads(out.splitlines()[-1]) for out, _ in outputs] == [expected, expected]
  assert not (tmp_path / "host1").exists()  # process 1 never wrote or needed a file of its own


def test_a_mixture_stopped_in_its_second_set_keeps_the_first_and_continues(tmp_path):
  """held_out_bounds over two sets with a stand-in for the jitted bound (its result a function of the batch and
  its row keys alone): a stop at the second set's first batch keeps the first set's results, the rerun scores only the
  second set's rest and equals the uninterrupted mixture; `stop` sees one increasing batch count over both sets."""
  import jax

  from diffgemma_jax.parallel.mesh import make_mesh
  from diffgemma_jax.train.bound import EvaluationStopped, held_out_bounds
  from diffgemma_jax.train.bound_partial import PartialBound
  mesh = make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = lambda: {"tokens": rng.integers(1, 9, (2, 4)).astype(np.int32)}  # noqa: E731
  sets = [("a", 0.7, [batch() for _ in range(3)]), ("b", 0.3, [batch() for _ in range(2)])]
  scored = []

  def bound_fn(params, batch, key, row_ids):
    scored.append(1)
    noise = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r)))(row_ids)
    return batch["tokens"].sum(-1) + noise, noise, np.full(2, 4)

  run = lambda **kw: held_out_bounds(bound_fn, None, sets, seed=3, num_t_samples=1, mesh=mesh, **kw)  # noqa: E731
  whole = run()
  partial_for = lambda i, name, batches: PartialBound(str(tmp_path / f"set{i}.npz"), {"set": name})  # noqa: E731
  seen = []
  with pytest.raises(EvaluationStopped, match="stopped after 1 of 2"):
    run(partial_for=partial_for, stop=lambda b: seen.append(b) or b == 3)
  assert seen == [0, 1, 2, 3] and sorted(p.name for p in tmp_path.iterdir()) == ["set0.npz", "set1.npz"]
  scored.clear()
  assert run(partial_for=partial_for) == whole and len(scored) == 1  # only set b's second batch
  assert not list(tmp_path.iterdir())


def test_a_stopped_evaluation_continues_to_the_same_bound(trained_run, tmp_path, monkeypatch):
  """SIGTERM after the first held-out batch: the evaluation saves that batch's rows and stops; the same call then
  scores the rest only and gives the uninterrupted bound exactly (row r's key is fold_in(seed, r) either way)."""
  import os
  import signal

  from diffgemma_jax import evaluate as evaluate_module
  from diffgemma_jax.train.bound import EvaluationStopped
  from diffgemma_jax.train.preemption import StopRequest
  config, workdir, _ = trained_run
  whole = evaluate(config, workdir, step=16)

  class TermAfterFirstBatch(StopRequest):
    def reached(self, step):
      if step == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; the real handler records it
      return super().reached(step)

  monkeypatch.setattr(evaluate_module, "StopRequest", TermAfterFirstBatch)
  partial_dir = str(tmp_path / "partial")
  with pytest.raises(EvaluationStopped, match="stopped after 1 of 2 held-out batches"):
    evaluate(config, workdir, step=16, partial_dir=partial_dir)
  assert os.listdir(partial_dir) == ["heldout-step16-set0.npz"]
  monkeypatch.setattr(evaluate_module, "StopRequest", StopRequest)
  notes = []
  resumed = evaluate(config, workdir, step=16, partial_dir=partial_dir, log=notes.append)
  assert any(n.startswith("continuing from held-out batch 1 of 2") for n in notes), notes
  assert resumed == whole
  assert os.listdir(partial_dir) == []  # a complete evaluation leaves no partial results behind

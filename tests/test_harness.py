"""The lm-evaluation-harness model (`diffgemma_jax/harness.py`, `diffgemma-lm-eval`): the three request types on an
autoregressive model against plain causal forward passes, the harness's own `simple_evaluate` end to end on the
session's trained run with task files like the shipped ones, and the shipped held-out tasks load."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from conftest import TINY_MODEL, compilation_cache_entries, free_port, read_metrics  # noqa: E402
from diffgemma_jax.harness import DiffGemmaLM  # noqa: E402
from diffgemma_jax.model import ModelConfig, build_model, make_mask  # noqa: E402
from diffgemma_jax.scoring import Pair  # noqa: E402
from launch.harness import TASKS_DIR, harness_argv, main  # noqa: E402

# A harness run on a model an earlier one ran reads the programs it compiled from JAX's cache.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _request(kind, args, index=0):
  return Instance(request_type=kind, doc={}, arguments=args, idx=index, metadata=("t", index, 1))


@pytest.fixture(scope="module")
def ar_lm(trained_run, load_tiny):
  from diffgemma_jax.sampling.requests import load_tokenizer
  _, workdir, _ = trained_run
  config = load_tiny({"objective.name": "ar"})
  model = build_model(ModelConfig(**TINY_MODEL), 4)
  return DiffGemmaLM(config, model=model, tokenizer=load_tokenizer(config, workdir), batch_size=4), model


_REFERENCES = {}


def _causal_log_probs(model, ids, width: int = 32):
  """log p(. | ids[:i+1]) at every position i of `ids`, by one causal pass over `ids` padded to `width` (what
  follows a position never changes its logits, so one compiled width serves every length)."""
  if id(model) not in _REFERENCES:
    graphdef, state = nnx.split(model)

    @jax.jit
    def reference(state, tokens):
      positions = jnp.arange(tokens.shape[1])[None]
      logits = nnx.merge(graphdef, state)(tokens, positions, make_mask("causal", jnp.ones_like(tokens), positions))[0]
      return jax.nn.log_softmax(logits[0], axis=-1)

    _REFERENCES[id(model)] = lambda tokens: reference(state, tokens)
  assert len(ids) <= width
  return np.asarray(_REFERENCES[id(model)](jnp.asarray([list(ids) + [0] * (width - len(ids))])))[:len(ids)]


def test_ar_requests_against_causal_passes(ar_lm, monkeypatch):
  lm, model = ar_lm
  tok = lm.tokenizer
  bos = tok.bos_id
  context = "def f(x):\n"
  # greedy continuation of the context, three tokens, by full causal passes: is_greedy must say True for it
  ids = [bos] + tok.encode(context)
  for _ in range(3):
    ids.append(int(np.argmax(_causal_log_probs(model, ids)[-1])))
  greedy_text = tok.decode_continuation([bos] + tok.encode(context), ids[len(tok.encode(context)) + 1:])
  pairs = [(context, "    return x\n"), ("", "import os"), (context, greedy_text)]
  out = lm.loglikelihood([_request("loglikelihood", pair, i) for i, pair in enumerate(pairs)])
  from diffgemma_jax.data.sft import split_tokens
  for (ctx, cont), (logprob, is_greedy) in zip(pairs, out):
    head, tail = split_tokens(tok, ctx, cont)
    full = [bos] + head + tail
    log_probs = _causal_log_probs(model, full)
    expected = sum(log_probs[i - 1, full[i]] for i in range(1 + len(head), len(full)))
    assert logprob == pytest.approx(expected, rel=1e-5)
  assert [g for _, g in out] == [False, False, True]
  # the answer comes from the objective's declared capability, not from its name
  rows = lm.scorer.rows([Pair(context, greedy_text)])
  declared = type(lm.scorer.objective).capabilities
  monkeypatch.setattr(type(lm.scorer.objective), "capabilities", dataclasses.replace(declared, next_token=False))
  assert lm.scorer.greedy(rows) == [None]
  monkeypatch.setattr(type(lm.scorer.objective), "capabilities", declared)
  assert lm.scorer.greedy(rows) == [True]
  # rolling: a text that fits one window is its exact log-likelihood after bos; a longer one is cut into windows
  text = "import os\nimport sys\n"
  short, long = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,)),
                                         _request("loglikelihood_rolling", (text * 12,), 1)])
  full = [bos] + tok.encode(text)
  log_probs = _causal_log_probs(model, full)
  assert short == pytest.approx(sum(log_probs[i - 1, full[i]] for i in range(1, len(full))), rel=1e-5)
  assert len(tok.encode(text * 12)) > lm.seq_len and long < 11 * short < 0  # a longer text, more nats
  # generate_until: greedy AR decoding, cut at the first `until` string
  (text_out, cut_out) = lm.generate_until([
      _request("generate_until", (context, {"max_gen_toks": 3, "until": []})),
      _request("generate_until", (context, {"max_gen_toks": 3, "until": [greedy_text[1:3]]}), 1)])
  assert text_out == greedy_text
  assert cut_out == greedy_text[:greedy_text.find(greedy_text[1:3])]
  monkeypatch.setattr(lm, "serving_slots", 1)  # model_args serving_slots=1: continuous batching, the same texts
  assert lm.generate_until([_request("generate_until", (context, {"max_gen_toks": 3, "until": []}))]) == [text_out]


TASKS = {
    "tiny_mc.yaml": """
        task: tiny_mc
        custom_dataset: !function utils.load_mc
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{prompt}}"
        doc_to_choice: choices
        doc_to_target: answer
        target_delimiter: ""
        metric_list:
          - metric: acc
        """,
    "tiny_rolling.yaml": """
        task: tiny_rolling
        custom_dataset: !function utils.load_text
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
        """,
    "tiny_gen.yaml": """
        task: tiny_gen
        custom_dataset: !function utils.load_mc
        test_split: test
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{choices[answer]}}"
        generation_kwargs: {until: ["\\n"], max_gen_toks: 8}
        metric_list:
          - metric: exact_match
        """,
    "utils.py": """
        import datasets

        def load_mc(**_):
          docs = [{"prompt": f"def add_{i}(x):\\n", "choices": ["    return x\\n", f"    return x + {i}\\n"],
                   "answer": 1} for i in range(3)]
          return {"test": datasets.Dataset.from_list(docs)}

        def load_text(**_):
          return {"test": datasets.Dataset.from_list([{"text": "import os\\nimport sys\\n" * k} for k in (1, 6)])}
        """}


def test_the_harness_runs_our_model_on_its_own_api(trained_run, tiny_config_file, tmp_path, no_compilation_cache):
  """`lm_eval.simple_evaluate` with model "diffgemma": multiple choice (loglikelihood), perplexity
  (loglikelihood_rolling, texts longer than the 32-token context) and generation, on the session's masked run. What
  it compiles goes to the compilation cache its config overrides name."""
  from lm_eval.tasks import TaskManager
  _, workdir, _ = trained_run
  for name, text in TASKS.items():
    (tmp_path / name).write_text(textwrap.dedent(text))
  cache = str(tmp_path / "jax-cache")
  results = lm_eval.simple_evaluate(
      model="diffgemma", model_args=f"config={tiny_config_file},workdir={workdir},block_length=8,"
      f"overrides=compilation.cache_dir={cache};compilation.min_compile_time_s=0",
      tasks=["tiny_mc", "tiny_rolling", "tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
      batch_size=4, log_samples=True)
  metrics = results["results"]
  assert 0.0 <= metrics["tiny_mc"]["acc,none"] <= 1.0
  assert 1.0 < metrics["tiny_rolling"]["word_perplexity,none"] < math.inf
  samples = results["samples"]
  assert all(all(ll < 0 and g is False for ll, g in s["filtered_resps"]) for s in samples["tiny_mc"])
  assert len(samples["tiny_gen"]) == 3 and all("\n" not in s["filtered_resps"][0] for s in samples["tiny_gen"])
  # the second text is about 6x the first: more nats, through several windows of the 32-token context
  rolling = [s["filtered_resps"][0] for s in sorted(samples["tiny_rolling"], key=lambda s: s["doc_id"])]
  assert rolling[1] < rolling[0] < 0
  assert compilation_cache_entries(cache)


def test_the_shipped_held_out_tasks_load_and_the_wrapper_adds_them():
  from lm_eval.tasks import TaskManager, get_task_dict
  tasks = get_task_dict(["stdlib_heldout_mc", "stdlib_heldout_completion"], TaskManager(include_path=TASKS_DIR,
                                                                                             include_defaults=False))
  with open(os.path.join(TASKS_DIR, "baselines.json")) as f:
    baselines = json.load(f)
  for name, task in tasks.items():
    docs = list(task.test_docs())
    assert len(docs) == baselines[name]["items"] > 100
  mc = tasks["stdlib_heldout_mc"]
  doc = next(iter(mc.test_docs()))
  assert len(mc.doc_to_choice(doc)) == 4 and mc.doc_to_text(doc).startswith("def ")
  assert harness_argv(["--model", "diffgemma"]) == ["--model", "diffgemma", "--include_path", TASKS_DIR]
  assert harness_argv(["--include_path", "mine", "--tasks", "x"]) == ["--include_path", "mine", "--tasks", "x"]


def test_bad_model_args_fail_with_one_line(trained_run, tiny_config_file, monkeypatch, capsys):
  """The harness builds the model from --model_args (`create_from_arg_string`); a bad argument fails before the
  model is restored, and diffgemma-lm-eval prints it as one line with exit code 2."""
  from diffgemma_jax.errors import ConfigError
  _, workdir, _ = trained_run
  with pytest.raises(ConfigError) as info:
    DiffGemmaLM.create_from_arg_string(f"config={tiny_config_file},workdir={workdir},top_p=0.5", {"batch_size": 4})
  message = str(info.value)
  assert message == ("--top_p does not apply to --sampler threshold (it reads --block_length, --steps, "
                     "--temperature, --threshold); --top_p is for ar")
  with pytest.raises(ConfigError, match="serving_slots runs the samplers ar, .*, not sampler block_fused"):
    DiffGemmaLM.create_from_arg_string(f"config={tiny_config_file},workdir={workdir},serving_slots=2,"
                                       "overrides=objective.name=block,sampler=block_fused")
  with pytest.raises(ConfigError, match="unknown argument\\(s\\) beam"):
    DiffGemmaLM.create_from_arg_string(f"config={tiny_config_file},workdir={workdir},beam=4")
  for args, error in (("serving_widths=2", "serving_widths sets the continuous-batching engine's slot widths; give "
                                           "serving_slots too"),
                      ("serving_slots=2,serving_widths=0", "serving_widths must be an integer >= 1"),
                      ("serving_slots=2,serving_widths=two", "serving_widths='two': give a positive integer"),
                      ("serving_slots=2,serving_widths=2,overrides=objective.name=ar",
                       "serving_widths sets the slot widths of the samplers .* not of sampler ar"),
                      ("step=latest", "--model_args step latest: give a checkpoint step \\(a number >= 0\\) or "
                                      "'best'")):
    with pytest.raises(ConfigError, match=error):
      DiffGemmaLM.create_from_arg_string(f"config={tiny_config_file},workdir={workdir},{args}")
  # a valid one reaches the engine (the masked engine's widths, as diffgemma-generate --serving_widths); step=best:
  # the step of lowest recorded held-out bound
  lm = DiffGemmaLM.create_from_arg_string(f"config={tiny_config_file},workdir={workdir},block_length=8,"
                                          "serving_slots=2,serving_widths=1,step=best")
  logged = {r["step"]: r["eval/bits_per_token"] for r in read_metrics(workdir) if "eval/bits_per_token" in r}
  assert lm.step == min(logged, key=logged.get)
  seen = {}
  monkeypatch.setattr(lm.generator, "run_requests", lambda prompts, options, **kw: seen.update(kw) or [])
  lm.generate_until([_request("generate_until", ("def f(", {"max_gen_toks": 8, "until": []}))])
  assert (seen["serving_slots"], seen["serving_widths"]) == (2, 1)

  def harness_cli():  # what the harness's CLI does with our model's error
    DiffGemmaLM.create_from_arg_string(f"config={tiny_config_file},workdir={workdir},top_p=0.5")

  monkeypatch.setattr("lm_eval.__main__.cli_evaluate", harness_cli)
  assert main(["--model", "diffgemma"]) == 2
  assert capsys.readouterr().err == f"error: {message}\n"


def test_the_harness_own_argument_errors_are_one_line(tiny_config_file, tmp_path, capsys):
  """An unknown task is the harness's ValueError (raised before any model is built): one line and exit 2 (it was a
  traceback); a ValueError raised by our code under the harness still propagates whole."""
  from launch.harness import raised_by_harness
  assert main(["--model", "diffgemma", "--model_args", f"config={tiny_config_file},workdir={tmp_path}",
               "--tasks", "no_such_task_here"]) == 2
  assert capsys.readouterr().err.splitlines()[-1] == ("error: lm-eval: Tasks not found: no_such_task_here "
                                                      "(diffgemma-lm-eval --tasks list names them)")
  try:
    int("ours")
  except ValueError as e:
    assert not raised_by_harness(e)


def test_a_bucket_output_path_gets_the_harness_files(s3_endpoint, trained_run, tiny_config_file, tmp_path,
                                                     monkeypatch, capsys):
  """`--output_path s3://...`: the harness writes into a local folder whose files are uploaded when it ends: a
  folder gets the results and samples a local folder gets, a `.json` path gets `<stem>_<date>.json` beside it, and
  a run that fails part way (here while writing its samples) still uploads what it wrote; a bucket that cannot
  be reached fails first, in one line."""
  from etils import epath
  from lm_eval.loggers import EvaluationTracker

  from diffgemma_jax import storage
  _, workdir, _ = trained_run
  seen = []  # a local --output_path reaches the harness's CLI as written
  monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: seen.append(sys.argv[1:]))
  local = ["--tasks", "tiny_mc", "-o", str(tmp_path / "out"), "--log_samples"]
  assert main(local) == 0 and seen == [harness_argv(local)]
  # a bucket output_path in the harness's own YAML config: overridden by a local folder on the command line
  (tmp_path / "eval.yaml").write_text("output_path: s3://runs/from-yaml\nlog_samples: true\n")
  seen.clear()
  assert main(["run", "--config", str(tmp_path / "eval.yaml"), "--tasks", "tiny_mc"]) == 0
  ((*given, flag, folder),) = [argv[:-2] for argv in seen]  # less our --include_path
  assert given == ["run", "--config", str(tmp_path / "eval.yaml"), "--tasks", "tiny_mc"] and flag == "--output_path"
  assert not storage.is_url(folder)
  monkeypatch.undo()
  for name, text in TASKS.items():
    (tmp_path / name).write_text(textwrap.dedent(text))
  run = ["--model", "diffgemma", "--model_args", f"config={tiny_config_file},workdir={workdir},block_length=8",
         "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--batch_size", "4", "--log_samples"]
  assert main(run + ["--output_path", "s3://no-such-bucket/eval"]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: --output_path s3://no-such-bucket/eval: the bucket s3://no-such-bucket cannot be reached "
                 f"(endpoint {s3_endpoint}): it does not exist, or these credentials cannot see it; create it first\n")

  assert main(run + ["--output_path", "s3://runs/lm-eval"]) == 0
  written = sorted(storage.folder_sizes("s3://runs/lm-eval"))  # in a folder named after the model (random here)
  assert [os.path.basename(name).split("_")[0] for name in written] == ["results", "samples"], written
  results = json.loads(epath.Path(f"s3://runs/lm-eval/{written[0]}").read_text())
  assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
  samples = epath.Path(f"s3://runs/lm-eval/{written[1]}").read_text().splitlines()
  assert os.path.basename(written[1]).startswith("samples_tiny_mc_") and len(samples) == 3

  def disk_full(*_, **__):
    raise OSError("No space left on device")

  monkeypatch.setattr(EvaluationTracker, "save_results_samples", disk_full)
  with pytest.raises(OSError, match="No space left"):
    main(run + ["--output_path", "s3://runs/failed/tiny.json"])
  (uploaded,) = epath.Path("s3://runs/failed").iterdir()
  assert uploaded.name.startswith("tiny_") and uploaded.name.endswith(".json")
  assert json.loads(uploaded.read_text())["results"]["tiny_mc"] == results["results"]["tiny_mc"]


def test_the_harness_records_the_git_hash_without_git_complaining_in_the_log(tmp_path, monkeypatch, capfd):
  """diffgemma-lm-eval hands the harness a `get_git_commit_hash` that keeps git's stderr out of the log: outside a
  repository (a cluster job's working directory) nothing is printed and the hash is None, as the harness records
  it; inside one the hash is `git describe --always`'s; the harness's own function is back once the CLI returns."""
  import subprocess

  import lm_eval.evaluator
  original = lm_eval.evaluator.get_git_commit_hash
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks no further up than tmp_path
  recorded = []
  monkeypatch.setattr("lm_eval.__main__.cli_evaluate",  # what the harness's evaluator does for its results
                      lambda: recorded.append(lm_eval.evaluator.get_git_commit_hash()))
  (tmp_path / "job").mkdir()
  monkeypatch.chdir(tmp_path / "job")
  assert main(["--model", "diffgemma"]) == 0
  err = capfd.readouterr().err
  assert recorded == [None] and "fatal" not in err and "git" not in err, err
  assert lm_eval.evaluator.get_git_commit_hash is original
  repo = tmp_path / "repo"
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
  monkeypatch.chdir(repo)
  assert main(["--model", "diffgemma"]) == 0
  assert recorded[1] == subprocess.check_output(["git", "describe", "--always"], text=True).strip()
  assert len(recorded[1]) >= 7


def test_the_shipped_tasks_load_without_the_harness_metadata_notice(tmp_path, monkeypatch, caplog):
  """Through diffgemma-lm-eval the shipped tasks load without the harness's notice that a custom_dataset function
  takes `--metadata` kwargs; a task of the user's with a custom_dataset still gets it, and so does a shipped
  task loaded outside the CLI."""
  import logging

  from lm_eval.tasks import TaskManager, get_task_dict
  for name, text in TASKS.items():
    (tmp_path / name).write_text(textwrap.dedent(text))

  def load(include_path):
    get_task_dict(["stdlib_heldout_mc", "tiny_mc"] if include_path else ["stdlib_heldout_mc"],
                  TaskManager(include_path=include_path or TASKS_DIR, include_defaults=False))

  def notices():
    found = sorted(r.getMessage().split(":")[0] for r in caplog.records if "Custom kwargs" in r.getMessage())
    caplog.clear()
    return found

  with caplog.at_level(logging.WARNING):
    load(None)
    assert notices() == ["stdlib_heldout_mc"]  # the harness's own notice, outside our CLI
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: load([TASKS_DIR, str(tmp_path)]))
    assert main(["--model", "diffgemma"]) == 0
    assert notices() == ["tiny_mc"]
    load(None)
    assert notices() == ["stdlib_heldout_mc"]  # the filter is gone once the CLI returns


def test_two_processes_split_the_requests_and_report_what_one_reports(trained_run, tiny_config_file, tmp_path,
                                                                      no_compilation_cache):
  """Two copies of diffgemma-lm-eval in one launch ($JAX_PROCESS_ID 0 and 1 of 2, JAX's runtime not joined) split
  the documents of a multiple-choice and a greedy-generation task, meet in a torch gloo group at
  the coordinator's port + 1, and process 0 reports metrics and logged samples equal to one process's (every
  score is a function of its request; greedy generation too); process 1 writes and prints no results."""
  import subprocess
  _, workdir, _ = trained_run
  for name, text in TASKS.items():
    (tmp_path / name).write_text(textwrap.dedent(text))
  cache = f"overrides=compilation.cache_dir={tmp_path / 'jax-cache'};compilation.min_compile_time_s=0"
  run = ["--model", "diffgemma", "--model_args", f"config={tiny_config_file},workdir={workdir},block_length=8,{cache}",
         "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tmp_path), "--batch_size", "4", "--log_samples"]
  assert main(run + ["--output_path", str(tmp_path / "single")]) == 0  # compiles; the two processes read its cache
  port = free_port()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = []
  for rank in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))
    procs.append(subprocess.Popen([sys.executable, "-m", "launch.harness", *run, "--output_path",
                                   str(tmp_path / f"out{rank}")], cwd=repo, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "tiny_mc" in outputs[0][0] and outputs[1][0] == "" and not (tmp_path / "out1").exists()
  # each answers its documents' requests (3 documents: 1 or 2 each; lm-eval pads the shorter share), not all
  for rank, (_, err) in enumerate(outputs):
    assert f"process {rank} of 2: answering documents {rank}, {rank + 2}, ... of each task" in err, err[-2000:]
    assert f"process {rank} of 2: 4 loglikelihood requests" in err and f"process {rank} of 2: 2 generate_until" in err

  # a request that only process 1 gets and cannot answer (a continuation longer than the 32-token context): it
  # fails with its one-line error, and process 0 at its next collective ends with that line, not gloo's
  (tmp_path / "tiny_long.yaml").write_text(textwrap.dedent(TASKS["tiny_mc.yaml"]).replace(
      "task: tiny_mc", "task: tiny_long").replace("utils.load_mc", "utils.load_long"))
  with open(tmp_path / "utils.py", "a") as f:
    f.write(textwrap.dedent("""
        def load_long(**_):
          docs = [{"prompt": "x = ", "choices": [" 1", " 2" * (40 if i == 1 else 1)], "answer": 0} for i in range(2)]
          return {"test": datasets.Dataset.from_list(docs)}
        """))
  failing = [arg if arg != "tiny_mc,tiny_gen" else "tiny_long" for arg in run if arg != "--log_samples"]
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "launch.harness", *failing], cwd=repo, env=dict(
      env, JAX_COORDINATOR_ADDRESS=address, JAX_PROCESS_ID=str(rank)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for rank in range(2)]
  try:
    errors = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  lines = [x for x in errors[1].splitlines() if x.startswith("error: ")]
  assert len(lines) == 1, errors[1][-3000:]
  line = lines[0]
  assert procs[1].returncode == 2 and "more than the model's context of 32" in line, errors[1][-2000:]
  assert procs[0].returncode == 2 and f"error: process 1 of 2 failed: {line[len('error: '):]}" in errors[0], \
      errors[0][-2000:]
  assert "Traceback" not in errors[0] + errors[1]

  def written(folder):
    files = sorted(str(p) for p in (tmp_path / folder).rglob("*.json*"))
    results = json.loads(open(next(f for f in files if os.path.basename(f).startswith("results"))).read())
    samples = {os.path.basename(f).split("_20")[0]: sorted((json.loads(line) for line in open(f)),
                                                           key=lambda s: s["doc_id"])
               for f in files if os.path.basename(f).startswith("samples")}
    return results["results"], samples

  (multi, multi_samples), (single, single_samples) = written("out0"), written("single")
  assert multi == single and sorted(multi) == ["tiny_gen", "tiny_mc"]
  assert sorted(multi_samples) == sorted(single_samples) and len(multi_samples) == 2
  for task, samples in single_samples.items():  # (a rank's padding requests, lm-eval's own, add a response to its
    # last document's `resps`: what it scores is `filtered_resps`, the first)
    assert [s["doc_id"] for s in multi_samples[task]] == [s["doc_id"] for s in samples]
    assert [s["filtered_resps"] for s in multi_samples[task]] == [s["filtered_resps"] for s in samples], task

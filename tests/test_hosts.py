"""What a multi-process run writes, and where: process 0 alone writes a command's --output and prints its results
(`launch/common.Outputs`, `distributed.launch_process`: from the runtime once joined, else from the launch's
environment), and a workdir that the hosts do not share is refused on every process (`check_shared_folder`).
docs/multihost.md has the audit these guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, xla_flags
from diffgemma_jax.parallel.distributed import launch_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "pretrain_tiny.py")
SRUN = {"SLURM_JOB_ID": "9", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0"}  # what srun sets in the second task


def test_launch_process_comes_from_the_launch_when_the_runtime_was_not_joined():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert launch_process(env=env) == (3, 4)
  assert launch_process(env=SRUN) == (1, 2)
  assert launch_process(env=dict(SRUN, SLURM_PROCID="0")) == (0, 2)
  assert launch_process(env={}) == (0, 1)


def _second_of_two(monkeypatch, index: int = 1) -> None:
  """The environment launch/multihost/local.sh (or a JobSet) gives process `index` of two; nothing joins."""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", str(index))


def _stub_readers(monkeypatch):
  """Each reader CLI with its computation replaced by a fixed result: what is under test is what the CLI writes."""
  import launch.evaluate
  import launch.generate
  import launch.score
  monkeypatch.setattr(launch.evaluate, "evaluate_steps", lambda *a, **k: [{"bits_per_token": 1.5}])
  # diffgemma-eval and -score join the runtime the launch describes (test_multihost.py runs them joined); here they
  # stay out, so the launch's environment alone says which process they are
  monkeypatch.setattr(launch.evaluate, "initialize_distributed", lambda config: False)
  monkeypatch.setattr(launch.score, "initialize_distributed", lambda config: False)
  row = {key: 0 for key in launch.generate.JSON_KEYS}
  monkeypatch.setattr(launch.generate, "generate_completions",
                      lambda *a, **k: [dict(row, prompt="def f(", completion="):")])
  monkeypatch.setattr(launch.score, "score_file", lambda *a, **k: {"records": [], "summary": {"nll": 0.0}})
  return {"eval": (launch.evaluate.main, ["--workdir", "w"]),
          "generate": (launch.generate.main, ["--workdir", "w", "--prompt", "def f(", "--json"]),
          "score": (launch.score.main, ["--workdir", "w", "--records", "r.jsonl", "--json"])}


@pytest.mark.parametrize("cli", ["eval", "generate", "score"])
def test_only_process_0_of_a_launch_writes_the_output_and_prints(cli, monkeypatch, tmp_path, capsys):
  """Process 1 of two computes and returns 0 but writes no --output (even where its own disk lacks the folder: it
  is not checked there) and prints nothing on stdout; process 0 checks the folder, writes the file and prints."""
  main, args = _stub_readers(monkeypatch)[cli]
  _second_of_two(monkeypatch)
  elsewhere = tmp_path / "not-on-this-host" / "out.json"
  assert main(["--config", CONFIG, *args, "--output", str(elsewhere)]) == 0
  out, err = capsys.readouterr()
  assert out == "" and not elsewhere.parent.exists()
  assert "process 1 of 2: process 0 writes" in err
  _second_of_two(monkeypatch, index=0)
  assert main(["--config", CONFIG, *args, "--output", str(elsewhere)]) == 2  # process 0 checks before computing
  assert "does not exist" in capsys.readouterr().err
  here = tmp_path / "out.json"
  assert main(["--config", CONFIG, *args, "--output", str(here)]) == 0
  out, _ = capsys.readouterr()
  assert json.loads(here.read_text()) == json.loads(out)


def test_only_process_0_exports_and_inspect_prints_once(monkeypatch, tmp_path, capsys):
  from launch.export_hf import main as export_main
  from launch.inspect import main as inspect_main
  _second_of_two(monkeypatch)
  target = tmp_path / "hf"
  assert export_main(["--config", CONFIG, "--workdir", str(tmp_path / "no-run-here"), "--output", str(target)]) == 0
  assert not target.exists()
  assert inspect_main(["--config", CONFIG, "--json"]) == 0
  assert capsys.readouterr().out == ""
  _second_of_two(monkeypatch, index=0)
  assert inspect_main(["--config", CONFIG, "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["total_params"] > 0


def test_the_harness_of_process_1_writes_into_scratch_and_prints_nothing(monkeypatch, tmp_path, capsys):
  """lm-eval writes its --output_path itself: process 1's run gets a temporary folder instead of the user's path
  (given on the command line or in the harness's YAML config), and its stdout (the results table) is dropped."""
  import launch.harness
  seen = []

  def harness(argv):
    seen.append(argv)
    print("| task | acc |")
    return 0

  monkeypatch.setattr(launch.harness, "_evaluate", harness)
  yaml_config = tmp_path / "harness.yaml"
  yaml_config.write_text(f"output_path: {tmp_path / 'from-yaml'}\n")
  _second_of_two(monkeypatch)
  for argv in (["--tasks", "x", "--output_path", str(tmp_path / "results")], ["--config", str(yaml_config)]):
    assert launch.harness.main(argv) == 0
    assert capsys.readouterr().out == ""
    given = seen[-1][seen[-1].index("--output_path") + 1:]
    assert len(given) == 1 and not given[0].startswith(str(tmp_path)) and not os.path.exists(given[0])
  _second_of_two(monkeypatch, index=0)
  assert launch.harness.main(["--tasks", "x", "--output_path", str(tmp_path / "results")]) == 0
  assert capsys.readouterr().out == "| task | acc |\n" and seen[-1][-1] == str(tmp_path / "results")


def test_partial_results_are_saved_and_discarded_by_the_first_copy_only(monkeypatch, tmp_path):
  """N copies of diffgemma-eval that never joined the runtime (srun on every node) each count as process 0 to JAX;
  only the first of the launch saves or deletes the shared partial-results file."""
  import numpy as np

  from diffgemma_jax.train.bound_partial import PartialBound
  path = tmp_path / "p.npz"
  _second_of_two(monkeypatch)
  second = PartialBound(str(path), {"step": 1})
  second.add(np.zeros(2), np.ones(2), np.full(2, 3))
  second.save(force=True)
  assert not path.exists()
  _second_of_two(monkeypatch, index=0)
  first = PartialBound(str(path), {"step": 1})
  first.add(np.zeros(2), np.ones(2), np.full(2, 3))
  first.save(force=True)
  _second_of_two(monkeypatch)
  second.discard()
  assert path.is_file()
  assert PartialBound(str(path), {"step": 1}).resume(num_batches=1) == 0  # it does not read it either
  _second_of_two(monkeypatch, index=0)
  assert PartialBound(str(path), {"step": 1}).resume(num_batches=1) == 1


def test_copies_other_than_the_first_read_the_compilation_cache_and_write_nothing(monkeypatch, tmp_path,
                                                                               no_compilation_cache):
  """JAX writes its persistent cache from its process 0; N copies that never joined are each JAX's process 0, and
  would all write the same entries into one folder (in place, not renamed). Only the first copy writes; the others
  read what it wrote."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from conftest import compilation_cache_entries
  from diffgemma_jax.compile_cache import use_compilation_cache
  from diffgemma_jax.config import base_config
  config = base_config()
  config.compilation.update(cache_dir=str(tmp_path / "cache"), min_compile_time_s=0.0)
  hits = []
  listener = lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None  # noqa: E731
  program = lambda: jax.block_until_ready(jax.jit(lambda a: jnp.cos(a) * 3.0)(np.ones(5, np.float32)))  # noqa: E731
  _second_of_two(monkeypatch)
  use_compilation_cache(config)
  program()
  assert compilation_cache_entries(str(tmp_path / "cache")) == set()
  no_compilation_cache()
  _second_of_two(monkeypatch, index=0)
  use_compilation_cache(config)
  program()
  assert len(compilation_cache_entries(str(tmp_path / "cache"))) == 1
  no_compilation_cache()
  _second_of_two(monkeypatch)
  use_compilation_cache(config)
  jax.monitoring.register_event_listener(listener)
  try:
    program()
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert hits == [1]


TWO_HOSTS = """
import json, os, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.parallel.distributed import check_shared_folder
from launch.common import Outputs
shared, own = sys.argv[3], sys.argv[4]
seen = []
for folder in (shared, own):
  try:
    check_shared_folder(folder, "--workdir")
    seen.append("ok")
  except ConfigError as e:
    seen.append(str(e))
outputs = Outputs()
outputs.write(os.path.join(own, "out.json"), json.dumps(jax.process_index()))
outputs.write(os.path.join(shared, "out.json"), json.dumps(jax.process_index()))
print(json.dumps(seen), flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_refuse_a_workdir_on_their_own_disks_and_write_once(tmp_path):
  """Two processes (jax.distributed on CPU), each given a shared folder and a folder of its own (each host's own
  disk): the shared one passes on both; the own one fails on both (a failure on process 1 alone would leave
  process 0 waiting at its next collective), naming process 1; an output is written by process 0 only, in the
  shared folder and in its own (process 1's own folder gets no file)."""
  address = f"127.0.0.1:{free_port()}"
  shared = tmp_path / "shared"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, address, str(rank), str(shared),
                             str(tmp_path / f"host{rank}")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for rank in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  for out, _ in outputs:
    ok, refused = json.loads(out.splitlines()[-1])
    assert ok == "ok"
    assert refused.startswith(f"--workdir {tmp_path / 'host'}") and "process 1 of 2 cannot see the files" in refused
  assert json.loads((shared / "out.json").read_text()) == 0
  assert (tmp_path / "host0" / "out.json").is_file() and not (tmp_path / "host1" / "out.json").exists()
  assert sorted(p.name for p in shared.iterdir()) == ["out.json"]  # the probe file is gone


def _two_processes(args_of, extra_env=None, timeout=60):
  """Starts two processes (`args_of(rank)`, joined through $JAX_COORDINATOR_ADDRESS), returns [(status, stdout,
  stderr)], the elapsed seconds; kills both if they outlast `timeout`."""
  import time
  address = f"127.0.0.1:{free_port()}"
  started = time.monotonic()
  procs = []
  for rank in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags(1), JAX_COORDINATOR_ADDRESS=address,
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank), **(extra_env or {}))
    procs.append(subprocess.Popen([sys.executable] + args_of(rank), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)], time.monotonic() - started


def test_a_process_that_fails_alone_ends_the_others_at_once_with_its_line(tiny_config_file, tmp_path):
  """Two joined training processes, process 1 alone given an initial checkpoint its host lacks: it fails with its
  one-line error, and process 0, which would wait for it at the dataset build's barrier (an hour), exits at once
  with the same status, printing process 1's line (parallel/failures.py); neither prints a traceback."""
  missing = str(tmp_path / "missing_run")
  results, seconds = _two_processes(lambda rank: [
      "-m", "launch.train", "--config", tiny_config_file, "--workdir", str(tmp_path / "run"), "--no_progress",
      "--config.train.num_steps=1"] + ([f"--config.init.checkpoint={missing}"] if rank == 1 else []))
  (status0, _, err0), (status1, _, err1) = results
  assert status1 == 2 and f"error: init.checkpoint: {missing} does not exist" in err1, err1[-2000:]
  line = next(line for line in err1.splitlines() if line.startswith("error: "))
  assert status0 == 2 and f"error: process 1 of 2 failed: {line[len('error: '):]}" in err0, err0[-2000:]
  assert "Traceback" not in err0 + err1
  assert seconds < 45, seconds  # process start-up and a join: seconds; the barrier would hold process 0 an hour


PEER_FAILS = """
import sys
from diffgemma_jax.parallel.distributed import barrier, initialize_distributed
from launch.common import fail
initialize_distributed()
if sys.argv[2] == "both":  # a failure every process has at once (a NaN loss); process 0 late by argv[4] seconds
  if sys.argv[1] == "0" and len(sys.argv) > 4:
    import time
    time.sleep(float(sys.argv[4]))
  sys.exit(fail(f"loss is NaN at step 7 (process {sys.argv[1]})", code=3))
if int(sys.argv[1]) == int(sys.argv[2]):
  if sys.argv[3] == "raise":
    raise RuntimeError("a bug on this host\\nsecond line")
  sys.exit(fail("--flag x: no such file", code=2))
barrier("never_passed", timeout_s=600)
"""


@pytest.mark.parametrize("failing, how, status, line", [
    (0, "fail", 2, "--flag x: no such file"),
    (1, "raise", 1, "RuntimeError: a bug on this host (its traceback is in that process's log)")])
def test_either_process_failing_ends_the_other_waiting_at_a_barrier(failing, how, status, line):
  """Process 0 (which serves the runtime, so it must outlive the others' reading of its failure) failing through
  the entry points' `fail`, or process 1 raising an exception nothing catches: the other, waiting at a barrier of
  600 s, exits at once with the failing one's status and prints its line; the failing one prints its own error
  (the uncaught exception its traceback)."""
  results, seconds = _two_processes(lambda rank: ["-c", PEER_FAILS, str(rank), str(failing), how])
  other = 1 - failing
  assert [status for status, _, _ in results] == [status, status], [err[-1500:] for _, _, err in results]
  assert f"error: process {failing} of 2 failed: {line}" in results[other][2], results[other][2][-2000:]
  assert ("Traceback" in results[failing][2]) == (how == "raise") and "Traceback" not in results[other][2]
  assert seconds < 45, seconds


@pytest.mark.parametrize("late", [None, 1.0])
def test_a_failure_every_process_has_ends_each_with_one_line(late):
  """Both processes failing at once (the first report wins the store), or process 0 a second after process 1's
  report reached it (before it exits: it outlives the others by EXIT_GRACE_S): each exits with the status and
  prints one error line, its own, or the other's where that reached it before its own failure (the store's winner
  always prints its own, which it prints before reporting). Seen to fail before `claim_error_line`: process 0
  printed process 1's line and then its own (in a loaded suite at once; always when a second late)."""
  delay = [] if late is None else [str(late)]
  results, seconds = _two_processes(lambda rank: ["-c", PEER_FAILS, str(rank), "both", "fail"] + delay)
  own = []
  for rank, (status, _, err) in enumerate(results):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 3 and lines in ([f"error: loss is NaN at step 7 (process {rank})"],
                                     [f"error: process {1 - rank} of 2 failed: loss is NaN at step 7 (process "
                                      f"{1 - rank})"]), err[-2000:]
    own.append(lines[0].endswith(f"(process {rank})"))
  assert any(own) and (late is None or own == [False, True]), [err[-500:] for _, _, err in results]
  assert seconds < 45, seconds

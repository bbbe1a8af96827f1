"""Checkpoints: readable by plain Orbax, resume equivalence after SIGKILL, NaN safety, half-written saves ignored,
and incompatible workdirs refused."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, compilation_cache_entries, read_metrics, train_losses
from diffgemma_jax.errors import IncompatibleCheckpointError, NonFiniteLossError
from diffgemma_jax.train import Checkpointer, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_orbax_restores_a_checkpoint(trained_run):
  config, workdir, _ = trained_run
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("params", "opt_state", "data_iterator"))
  assert manager.all_steps() == [8, 16, 24]  # keep=3
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "24", "params"))
  assert params["embedder"]["embedding"].shape == (config.model.vocab_size, config.model.embed_dim)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  restored = manager.restore(24, args=ocp.args.Composite(data_iterator=ocp.args.JsonRestore()))
  assert restored["data_iterator"] is not None
  manager.close()


def test_trainer_restore_matches_plain_orbax(trained_run):
  from diffgemma_jax.model.config import ModelConfig
  from diffgemma_jax.parallel import make_mesh
  from diffgemma_jax.train import abstract_train_state, make_optimizer
  config, workdir, _ = trained_run
  tx, _ = make_optimizer(config.train)
  _, abstract, shardings = abstract_train_state(ModelConfig.from_config_dict(config.model), tx, make_mesh())
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config, create=False)
  state, _ = ckpt.restore(16, abstract, shardings)
  ckpt.close()
  plain = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "16", "params"))
  assert int(state.step) == 16
  np.testing.assert_array_equal(np.asarray(state.params["embedder"]["embedding"][...]),
                                plain["embedder"]["embedding"])


def test_a_runs_parameter_shapes_are_read_without_orbax_warnings(trained_run, caplog):
  """`saved_params` (how init.checkpoint, a LoRA fine-tune and `diffgemma-eval --checkpoint` check shapes) lists
  every saved parameter with its shape, and Orbax logs nothing: a Checkpointer's metadata call looks for the step's
  metadata file inside params/ (the manager writes it one folder up) and warns "Metadata file does not exist"."""
  from diffgemma_jax.train.reading import flat_paths, open_run
  _, workdir, _ = trained_run
  with caplog.at_level(logging.INFO):
    run = open_run(workdir)
    saved = run.saved_params()
  assert run.step == TRAINED_STEPS
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  plain = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(TRAINED_STEPS), "params"))
  assert {k: tuple(v.shape) for k, v in saved.items()} == {k: v.shape for k, v in flat_paths(plain).items()}
  assert len(saved) > 20


def _train_cmd(config_file: str, workdir: str, overrides: dict[str, str]) -> list[str]:
  return ([sys.executable, "-m", "launch.train", "--config", config_file, "--workdir", workdir, "--no_progress"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def _complete_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_resume_after_sigkill_repeats_the_loss_trajectory(trained_run, tiny_config_file, tmp_path):
  """Kill a run (SIGKILL) after its first checkpoint, rerun the same command: every later step's loss equals the
  uninterrupted run's. The rerun reads the programs the killed run compiled from their compilation cache."""
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "killed")
  cache = {"compilation.cache_dir": str(tmp_path / "jax-cache"), "compilation.min_compile_time_s": "0"}
  cmd = _train_cmd(tiny_config_file, workdir, dict(TRAINED_OVERRIDES, **cache))
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if _complete_steps(os.path.join(workdir, "checkpoints")):
        break
      time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  before = train_losses(workdir)
  assert max(before) < TRAINED_STEPS, "killed too late to test anything"
  resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  losses, reference = train_losses(workdir), train_losses(reference_dir)
  assert sorted(losses) == list(range(1, TRAINED_STEPS + 1))
  first_checkpoint = 8
  for step in range(first_checkpoint + 1, TRAINED_STEPS + 1):
    assert len(losses[step]) == 1, (step, losses[step])  # what the killed run logged past its checkpoint is gone
    assert losses[step][0] == pytest.approx(reference[step][0], rel=1e-6, abs=0), step
  bounds = [r for r in read_metrics(workdir) if r.get("step") == TRAINED_STEPS and "eval/bits_per_token" in r]
  reference_bound = [r for r in read_metrics(reference_dir) if r.get("step") == TRAINED_STEPS
                     and "eval/bits_per_token" in r]
  assert bounds[-1]["eval/bits_per_token"] == pytest.approx(reference_bound[-1]["eval/bits_per_token"], rel=1e-6)


def test_sigterm_saves_the_step_in_flight_and_the_rerun_resumes_exactly(trained_run, tiny_config_file, tmp_path):
  """A preemption notice (SIGTERM) mid-run: the run saves a checkpoint of the step it was on, exits 4, and the same
  command resumes from there with the uninterrupted run's losses, its train step read from the compilation cache
  the first process wrote (`compilation.cache_dir`), not compiled again."""
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "preempted")
  cache = {"compilation.cache_dir": str(tmp_path / "jax-cache"), "compilation.min_compile_time_s": "0"}
  cmd = _train_cmd(tiny_config_file, workdir, dict(TRAINED_OVERRIDES, **cache))
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.isfile(os.path.join(workdir, "metrics.jsonl")) and train_losses(workdir):
        break
      time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
  finally:
    proc.kill()
  assert proc.returncode == 4, err[-3000:]
  saved = _complete_steps(os.path.join(workdir, "checkpoints"))
  logged = max(train_losses(workdir))
  assert saved and saved[-1] == logged < TRAINED_STEPS, (saved, logged)  # every finished step is in the checkpoint
  assert f"stop requested (SIGTERM): saved checkpoint {logged}" in err
  assert any(name.startswith("jit_step-") for name in compilation_cache_entries(cache["compilation.cache_dir"]))
  resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, JAX_LOG_COMPILES="1"))  # JAX then logs each cache hit
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Persistent compilation cache hit for 'jit_step'" in resumed.stderr, resumed.stderr[-3000:]
  losses, reference = train_losses(workdir), train_losses(reference_dir)
  assert sorted(losses) == list(range(1, TRAINED_STEPS + 1)) and all(len(v) == 1 for v in losses.values())
  for step in range(logged + 1, TRAINED_STEPS + 1):
    assert losses[step][0] == pytest.approx(reference[step][0], rel=1e-6, abs=0), step


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config_file, tmp_path, capsys):
  from launch.train import main
  workdir = str(tmp_path / "nan")
  code = main(["--config", tiny_config_file, "--workdir", workdir, "--no_progress", "--config.train.num_steps=12",
               "--config.checkpoint.every_steps=4", "--config.train.debug_nan_at_step=6"])
  err = capsys.readouterr().err
  assert code == 3, err
  assert "step 6: loss is nan" in err and "last good checkpoint: step 4" in err
  assert "Traceback" not in err
  directory = os.path.join(workdir, "checkpoints")
  assert ocp.CheckpointManager(directory).all_steps() == [4]
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "4", "params"))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  from diffgemma_jax.train.memory import binary_bytes
  held = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))  # one device holds every parameter
  assert f"train state per device: {binary_bytes(held)} trained parameters + " in err, err
  logged = train_losses(workdir)
  assert max(logged) == 5 and all(np.isfinite(v) for vs in logged.values() for v in vs)


def test_half_written_checkpoint_is_ignored(trained_run, load_tiny, tmp_path):
  """A kill during a save leaves Orbax's temporary directory; the resume takes the last complete step."""
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "partial")
  shutil.copytree(reference_dir, workdir)
  partial = os.path.join(workdir, "checkpoints", "32.orbax-checkpoint-tmp-1700000000000000")
  os.makedirs(os.path.join(partial, "params"))
  with open(os.path.join(partial, "params", "garbage"), "wb") as f:
    f.write(b"\x00" * 100)
  config = load_tiny(dict(TRAINED_OVERRIDES, **{"train.num_steps": "26"}))
  assert Checkpointer(os.path.join(workdir, "checkpoints"), config).latest_step() == TRAINED_STEPS
  summary = train(config, workdir, show_progress=False)
  assert summary["start_step"] == TRAINED_STEPS and summary["final_step"] == 26


def test_incompatible_workdir_is_refused_naming_the_fields(trained_run, load_tiny, tmp_path):
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "other")
  shutil.copytree(reference_dir, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config = load_tiny({"model.embed_dim": "96", "model.num_experts": "8"})
  with pytest.raises(IncompatibleCheckpointError) as info:
    train(config, workdir, show_progress=False)
  message = str(info.value)
  assert "model.embed_dim: 64 in the checkpoints, 96 in the config" in message
  assert "model.num_experts" in message and "model.top_k" not in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  # a runtime-only change (dispatch backend) is not a different model
  Checkpointer(os.path.join(workdir, "checkpoints"), load_tiny({"model.dispatch": "ragged"}))


def test_resume_with_other_frozen_parameters_is_refused(trained_run, load_tiny):
  _, reference_dir, _ = trained_run
  with pytest.raises(IncompatibleCheckpointError, match=r"train.freeze: \(\) in the checkpoints, \('router',\) in"):
    Checkpointer(os.path.join(reference_dir, "checkpoints"), load_tiny({"train.freeze": "('router',)"}))


def test_update_to_non_finite_parameters_is_never_saved(load_tiny, tmp_path):
  """A finite loss and gradient can still give a poisoned update (here a NaN learning rate set past validation):
  the parameters' norm after the update stops the run before the checkpoint."""
  config = load_tiny({"train.num_steps": "2", "checkpoint.every_steps": "1", "eval.every_steps": "0"})
  config.train.learning_rate = float("nan")
  workdir = str(tmp_path / "poisoned")
  with pytest.raises(NonFiniteLossError, match=r"step 1: param_norm is nan.*\(no checkpoint yet\)"):
    train(config, workdir, show_progress=False)
  assert not _complete_steps(os.path.join(workdir, "checkpoints"))


def test_resume_with_another_objective_or_optimizer_structure_is_refused(trained_run, load_tiny, tmp_path):
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "other_objective")
  shutil.copytree(reference_dir, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(IncompatibleCheckpointError, match=r"objective.name: 'masked' in the checkpoints, 'ar' in"):
    train(load_tiny(dict(TRAINED_OVERRIDES, **{"objective.name": "ar"})), workdir, show_progress=False)
  with pytest.raises(IncompatibleCheckpointError, match=r"without gradient clipping|with gradient clipping.*"
                                                         r"train.grad_clip=1.0 there, 0.0 in the config"):
    train(load_tiny(dict(TRAINED_OVERRIDES, **{"train.grad_clip": "0"})), workdir, show_progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before

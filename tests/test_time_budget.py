"""train.max_runtime_s: a run sized by wall-clock time stops cleanly (checkpoint and evaluation of the step it
reached, the reason logged) and the same command continues it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, read_metrics, train_losses
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.train import Checkpointer, train

# The reruns below compile what the run before them compiled: read back from JAX's cache, not compiled again.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_time_budget_stops_with_a_checkpoint_and_evaluation_and_the_rerun_continues(trained_run, load_tiny, tmp_path,
                                                                                     capsys):
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "budget")
  shutil.copytree(reference_dir, workdir)
  extended = dict(TRAINED_OVERRIDES, **{"train.num_steps": str(TRAINED_STEPS + 3)})
  # A budget spent before the first step ends: exactly one step runs, then the stop.
  summary = train(load_tiny(dict(extended, **{"train.max_runtime_s": "1e-6"})), workdir, show_progress=False)
  stopped = TRAINED_STEPS + 1
  assert summary["stopped_by_time"] and summary["final_step"] == stopped and summary["checkpoint_step"] == stopped
  assert summary["eval"]["step"] == stopped
  assert Checkpointer(os.path.join(workdir, "checkpoints"), load_tiny(extended)).latest_step() == stopped
  evals = [r["step"] for r in read_metrics(workdir) if "eval/bits_per_token" in r]
  assert evals[-1] == stopped
  assert f"step {stopped} of {TRAINED_STEPS + 3}: train.max_runtime_s=1e-06 spent" in capsys.readouterr().err
  # The same command without a budget continues from the saved step to the end.
  summary = train(load_tiny(extended), workdir, show_progress=False)
  assert summary["start_step"] == stopped and summary["final_step"] == TRAINED_STEPS + 3
  assert not summary.get("stopped_by_time")
  assert sorted(train_losses(workdir))[-4:] == list(range(TRAINED_STEPS, TRAINED_STEPS + 4))


def test_negative_time_budget_is_refused_naming_the_key(load_tiny, tmp_path):
  with pytest.raises(ConfigError, match=r"train\.max_runtime_s=-1.0: must be >= 0"):
    train(load_tiny({"train.max_runtime_s": "-1"}), str(tmp_path / "w"), show_progress=False)


# wsd_time: the decay placed while the run goes (train/time_decay.py).

def _decay(workdir, num_steps=100, fraction=0.2, max_runtime_s=100.0):
  from diffgemma_jax.config import base_config
  from diffgemma_jax.train.time_decay import TimedDecay
  tc = base_config().train
  tc.update(lr_schedule="wsd_time", num_steps=num_steps, decay_fraction=fraction, max_runtime_s=max_runtime_s)
  os.makedirs(workdir, exist_ok=True)
  return TimedDecay(tc, str(workdir), start_step=0, max_runtime_s=max_runtime_s)


def test_timed_decay_is_placed_by_the_clock_or_the_step_cap(tmp_path):
  # 10 s to the first step's end, then 0.5 s/step: the decay starts once 0.8 x 90 s of stepping is spent and
  # holds the steps the 18 s left allow at that rate.
  decay = _decay(tmp_path)
  assert decay.place(50, elapsed_s=71.0, first_step_s=10.0, step_time_s=0.5, sync=False) is None
  record = decay.place(51, elapsed_s=82.0, first_step_s=10.0, step_time_s=0.5, sync=False)
  assert (record["decay_start"], record["horizon"], record["reason"]) == (51, 51 + 36, "time")
  assert decay.placed == (51, 87) and decay.end_step() == 87
  assert decay.place(52, elapsed_s=90.0, first_step_s=10.0, step_time_s=0.5, sync=False) is None  # once only
  # A machine faster than the cap assumed: the decay starts at 0.8 x num_steps and ends at the cap.
  fast = _decay(tmp_path / "fast")
  assert fast.place(79, elapsed_s=20.0, first_step_s=10.0, step_time_s=0.01, sync=False) is None
  record = fast.place(80, elapsed_s=20.1, first_step_s=10.0, step_time_s=0.01, sync=False)
  assert (record["decay_start"], record["horizon"], record["reason"]) == (80, 100, "num_steps")
  # Several processes: process 0's decision is broadcast (here one process, through the same broadcast).
  synced = _decay(tmp_path / "synced")
  assert synced.place(50, elapsed_s=71.0, first_step_s=10.0, step_time_s=0.5, sync=True) is None
  assert synced.place(51, elapsed_s=82.0, first_step_s=10.0, step_time_s=0.5, sync=True)["horizon"] == 87
  assert json.loads((tmp_path / "synced" / "lr_decay.json").read_text())["horizon"] == 87
  # Out of time already: one more step, not none.
  late = _decay(tmp_path / "late")
  assert late.place(5, elapsed_s=200.0, first_step_s=10.0, step_time_s=0.5, sync=False)["horizon"] == 6


def test_timed_decay_schedule_is_optax_wsd_once_placed():
  import numpy as np
  from diffgemma_jax.config import base_config
  from diffgemma_jax.train.optimizer import learning_rate_schedule
  tc = base_config().train
  tc.update(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=10, num_steps=100, max_runtime_s=60.0)
  timed = tc.copy_and_resolve_references()
  timed.lr_schedule = "wsd_time"
  wsd = tc.copy_and_resolve_references()
  wsd.update(lr_schedule="wsd", decay_steps=30, num_steps=90)
  placed, reference = learning_rate_schedule(timed, (60, 90)), learning_rate_schedule(wsd)
  steps = np.arange(0, 120)
  np.testing.assert_allclose([float(placed(s)) for s in steps], [float(reference(s)) for s in steps], rtol=1e-6)
  unplaced = learning_rate_schedule(timed)  # before the decay is placed: the plateau, for ever
  assert float(unplaced(5)) == pytest.approx(5e-4) and float(unplaced(10 ** 6)) == pytest.approx(1e-3)


def test_timed_decay_run_ends_at_its_horizon_and_resumes_on_the_same_schedule(trained_run, load_tiny, tmp_path,
                                                                              capsys):
  """Extending the trained run by 6 steps under wsd_time with a budget it will not spend: the step cap places the
  decay at once (0.5 x 30 steps are behind it), the rate falls linearly to the floor at step 30, and a copy resumed
  from step 26 repeats steps 27-30 exactly, reading the placement back."""
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "timed")
  shutil.copytree(reference_dir, workdir)
  overrides = dict(TRAINED_OVERRIDES, **{"train.num_steps": str(TRAINED_STEPS + 6), "train.lr_schedule": "wsd_time",
                                         "train.decay_fraction": "0.5", "train.max_runtime_s": "3600",
                                         "checkpoint.every_steps": "2", "train.log_every_steps": "1"})
  config = load_tiny(overrides)
  summary = train(config, workdir, show_progress=False)
  start = TRAINED_STEPS + 1
  assert summary["lr_decay"]["decay_start"] == start and summary["lr_decay"]["horizon"] == TRAINED_STEPS + 6
  assert summary["final_step"] == TRAINED_STEPS + 6 and not summary.get("stopped_by_time")
  assert "train.lr_schedule='wsd_time' decays over the next 5 steps" in capsys.readouterr().err
  peak, floor = float(config.train.learning_rate), float(config.train.learning_rate) * float(config.train.min_lr_ratio)
  lrs = {r["step"]: r["train/lr"] for r in read_metrics(workdir) if "train/lr" in r and r["step"] > TRAINED_STEPS}
  expected = {s: peak + (floor - peak) * (s - 1 - start) / 5 for s in range(start + 1, TRAINED_STEPS + 7)}
  assert {s: lrs[s] for s in expected} == pytest.approx(expected, rel=1e-5)  # step s logs the rate of count s - 1
  with open(os.path.join(workdir, "lr_decay.json")) as f:
    assert json.load(f)["decay_start"] == start

  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns("metrics.jsonl"))
  for step in (TRAINED_STEPS + 4, TRAINED_STEPS + 6):
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  again = train(config, resumed, show_progress=False)
  assert again["start_step"] == TRAINED_STEPS + 2 and again["final_step"] == TRAINED_STEPS + 6
  losses, repeated = train_losses(workdir), train_losses(resumed)
  assert [repeated[s][-1] for s in range(TRAINED_STEPS + 3, TRAINED_STEPS + 7)] == pytest.approx(
      [losses[s][-1] for s in range(TRAINED_STEPS + 3, TRAINED_STEPS + 7)], rel=1e-6)


def test_timed_decay_needs_a_time_budget(load_tiny, tmp_path):
  with pytest.raises(ConfigError, match=r"train\.lr_schedule='wsd_time' is sized by the clock: set "
                                        r"train\.max_runtime_s > 0"):
    train(load_tiny({"train.lr_schedule": "wsd_time"}), str(tmp_path / "w"), show_progress=False)
  with pytest.raises(ConfigError, match=r"train\.decay_fraction=1\.5: .* in \(0, 1\)"):
    train(load_tiny({"train.lr_schedule": "wsd_time", "train.max_runtime_s": "10", "train.decay_fraction": "1.5"}),
          str(tmp_path / "w"), show_progress=False)


def test_compiled_step_takes_the_placement_under_wsd_time(load_tiny):
  """compile_train_step builds a wsd_time config's step as the trainer does: the placement is its fourth argument,
  and the rate of update count 1 is the floor once the decay is placed at (0, 1), the peak while it is not."""
  import jax

  from diffgemma_jax.train.compiled import compile_train_step, synthetic_batch
  config = load_tiny({"train.lr_schedule": "wsd_time", "train.max_runtime_s": "60", "train.warmup_steps": "0"})
  compiled = compile_train_step(config, mask_id=4)
  assert compiled.decay_placed and compiled.decay_args()[0].tolist() == [2 ** 31 - 1] * 2
  batch = compiled.place(synthetic_batch(int(config.train.batch_size), int(config.train.seq_len),
                                         int(config.model.vocab_size)))
  peak = float(config.train.learning_rate)
  for placed, rate in ((None, peak), ((0, 1), peak * float(config.train.min_lr_ratio))):
    state = compiled.init_state()
    for _ in range(2):
      state, metrics = compiled.step(state, batch, jax.random.key(0), *compiled.decay_args(placed))
    assert float(metrics["lr"]) == pytest.approx(rate, rel=1e-6)

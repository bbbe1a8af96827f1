"""train.max_runtime_s: a run sized by wall-clock time stops cleanly (checkpoint and evaluation of the step it
reached, the reason logged) and the same command continues it."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, read_metrics, train_losses
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.train import Checkpointer, train


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

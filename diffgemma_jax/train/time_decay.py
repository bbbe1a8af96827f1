"""Placing the wsd_time schedule's decay while the run goes (`train.lr_schedule = "wsd_time"`).

A run given a wall-clock budget (`train.max_runtime_s`) instead of a step count cannot know its horizon before it
has measured its step, so the schedule holds the peak rate until (1 - `train.decay_fraction`) of the stepping time
is spent (counted from the end of the first step, whose compilation is no stepping) and then fixes its decay:

  start   = the next update's count
  horizon = min(train.num_steps, start + (time left) / (mean step time so far))

and the run ends at the horizon with the rate at the floor, its final checkpoint and evaluation after it, like any
run's last step. `train.num_steps` stays a cap: at (1 - decay_fraction) x num_steps the decay starts anyway (a
machine faster than the budget assumed decays into the cap). The mean step time excludes checkpoint saves and
evaluations; a run that saves or evaluates during its decay may reach `train.max_runtime_s` a little before its
horizon, and stops there as any timed run (its rate then a little above the floor).

The placement is an int32[2] argument of the jitted step (train/step.py), so nothing compiles again when it is
fixed, and it is written to `<workdir>/lr_decay.json` with the numbers it came from. A resumed run reads it and
follows the same schedule: a run that reached its horizon resumes to nothing but its evaluation; to train further,
start a new run from its checkpoint (`init.checkpoint`). Several processes place the decay from process 0's clock,
broadcast at the same steps, so they all compile and run the same schedule.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
from etils import epath

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.train.optimizer import decay_argument, placed_decay_optimizer

DECAY_FILE = "lr_decay.json"


class TimedDecay:
  """wsd_time's decay for one invocation of the trainer: loaded from the workdir, placed once, saved."""

  def __init__(self, train_config, workdir: str, *, start_step: int, max_runtime_s: float):
    self.optimizer = placed_decay_optimizer(train_config)  # make_train_step's optimizer_for_decay
    self.enabled = self.optimizer is not None
    self.fraction = float(train_config.get("decay_fraction", 0.2))
    self.num_steps = int(train_config.num_steps)
    self.max_runtime_s = max_runtime_s
    self.path = epath.Path(workdir) / DECAY_FILE
    self.record: dict[str, Any] | None = None
    if self.enabled and start_step > 0 and self.path.exists():  # a fresh run (step 0) places its own
      self.record = _read(self.path)
    self._args = self._step_args()

  @property
  def placed(self) -> tuple[int, int] | None:
    return None if self.record is None else (int(self.record["decay_start"]), int(self.record["horizon"]))

  def end_step(self) -> int:
    """The step the run ends at: its horizon once placed, else train.num_steps."""
    return min(self.num_steps, self.placed[1]) if self.placed else self.num_steps

  def args(self) -> tuple[np.ndarray, ...]:
    """The jitted step's arguments after (state, batch, rng): the placement for wsd_time, none otherwise (made
    once per placement, not per step)."""
    return self._args

  def _step_args(self) -> tuple[np.ndarray, ...]:
    return (decay_argument(self.placed),) if self.enabled else ()

  def place(self, step: int, *, elapsed_s: float, first_step_s: float | None, step_time_s: float | None,
            sync: bool) -> dict[str, Any] | None:
    """After update `step` is dispatched: fixes the decay if its time (or the step cap's point) has come, and
    returns its record (None: not yet, or placed already). `elapsed_s`: since the invocation started;
    `first_step_s`: when the first step had finished (compilation included); `step_time_s`: the mean step time
    since. `sync`: several processes, all calling at the same step; process 0's decision is broadcast."""
    if not self.enabled or self.record is not None:
      return None
    record = self._decide(step, elapsed_s, first_step_s, step_time_s)
    if sync:
      from jax.experimental import multihost_utils
      numbers = np.asarray([-1, -1] if record is None else [record["decay_start"], record["horizon"]], np.int64)
      numbers = np.asarray(multihost_utils.broadcast_one_to_all(numbers))
      if numbers[0] < 0:
        return None
      record = dict(record or {"reason": "process 0"}, decay_start=int(numbers[0]), horizon=int(numbers[1]))
    if record is None:
      return None
    self.record = record
    self._args = self._step_args()
    if jax.process_index() == 0:
      self.path.write_text(json.dumps(record, indent=1) + "\n")
    return record

  def _decide(self, step, elapsed_s, first_step_s, step_time_s) -> dict[str, Any] | None:
    by_steps = step >= math.ceil((1.0 - self.fraction) * self.num_steps)
    by_time = False
    if first_step_s is not None and step_time_s:
      by_time = elapsed_s - first_step_s >= (1.0 - self.fraction) * (self.max_runtime_s - first_step_s)
    if not (by_steps or by_time):
      return None
    horizon = self.num_steps
    left_s = max(self.max_runtime_s - elapsed_s, 0.0)
    if step_time_s:
      horizon = min(horizon, step + max(int(left_s / step_time_s), 1))
    return {"decay_start": step, "horizon": max(horizon, step + 1), "reason": "time" if by_time else "num_steps",
            "elapsed_s": round(elapsed_s, 3), "first_step_s": first_step_s, "step_time_s": step_time_s,
            "time_left_s": round(left_s, 3), "max_runtime_s": self.max_runtime_s, "num_steps": self.num_steps,
            "decay_fraction": self.fraction}

  def describe(self) -> str:
    start, horizon = self.placed
    record = self.record
    timing = (f" at {record['step_time_s'] * 1e3:.1f} ms/step, {record['time_left_s']:.1f}s of "
              f"train.max_runtime_s={self.max_runtime_s:g} left" if record.get("step_time_s") else "")
    return (f"step {start}: train.lr_schedule='wsd_time' decays over the next {horizon - start} steps to step "
            f"{horizon} ({record['reason']}{timing}); saved in {self.path}")


def _read(path: epath.Path) -> dict[str, Any]:
  try:
    record = json.loads(path.read_text())
    start, horizon = int(record["decay_start"]), int(record["horizon"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path}: not a wsd_time decay record ({e}); it holds decay_start and horizon, written "
                      f"by the run; delete it to let the resumed run place its decay anew") from None
  if not 0 <= start < horizon:
    raise ConfigError(f"{path}: decay_start={start}, horizon={horizon}: need 0 <= decay_start < horizon")
  return record

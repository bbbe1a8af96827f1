"""Stopping a run whose held-out bound has stopped improving (`train.early_stop_patience`).

The trainer's evaluations (every `eval.every_steps`, and every save with `checkpoint.keep_best`) score the same rows
with the same noise draws each time (`eval.seed`), so two of them differ by the model alone. After `patience`
evaluations in a row none of which is lower than the best so far by more than `min_delta` bits/token, the run
saves the step it reached and stops. The count runs across resumes: it is replayed from the evaluations the run's
`metrics.jsonl` holds up to the resumed step, so the same command after an early stop does not train on (it says
so; raise the patience, or set it to 0, to continue). With `eval.rank_by` the bound that counts is that
eval.heldout_sets set's (`eval/NAME/bits_per_token` in the file).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from diffgemma_jax.train.logging import eval_prefix, logged_records


class EarlyStop:
  """The best bound so far and the evaluations since it; `patience` 0: never stops."""

  def __init__(self, patience: int, min_delta: float, ranked_set: str = ""):
    """`ranked_set`: the eval.heldout_sets set whose bound counts (eval.rank_by); "": the run's own."""
    self.patience, self.min_delta, self.ranked_set = int(patience), float(min_delta), str(ranked_set)
    self.best, self.best_step, self.waited = math.inf, None, 0

  def observe(self, step: int, bits_per_token: float) -> bool:
    """Counts the evaluation of `step`; whether the run should stop now."""
    if math.isfinite(bits_per_token) and bits_per_token < self.best - self.min_delta:
      self.best, self.best_step, self.waited = bits_per_token, step, 0
    else:
      self.waited += 1
    return self.exhausted

  @property
  def exhausted(self) -> bool:
    return self.patience > 0 and self.waited >= self.patience

  def record(self) -> dict[str, float | int | None]:
    """The summary's `stopped_early`: the best step and its bound."""
    return {"best_step": self.best_step, "best_bits_per_token": self.best}

  def describe(self) -> str:
    better = f"by more than {self.min_delta:g} bits/token " if self.min_delta else ""
    which = f"the bound of held-out set {self.ranked_set} (eval.rank_by)" if self.ranked_set else "the held-out bound"
    return (f"{which} has not improved {better}on step {self.best_step}'s {self.best:.4f} bits/token "
            f"for {self.waited} evaluations (train.early_stop_patience={self.patience})")


def replay(stop: EarlyStop, workdir: str, through_step: int) -> EarlyStop:
  """`stop` having observed the run's earlier evaluations: those metrics.jsonl logged up to `through_step` (the step
  resumed from), one per step (the last logged for it), in step order. A run without the file starts counting
  afresh. Several processes take process 0's reading (its logger rewrites the file as the run starts)."""
  if not stop.patience:
    return stop
  if jax.process_index() == 0:
    key = f"{eval_prefix(stop.ranked_set)}/bits_per_token"
    bounds = {int(r["step"]): float(r[key]) for r in logged_records(workdir)
              if key in r and int(r["step"]) <= through_step}  # the last logged for each step
    for step in sorted(bounds):
      stop.observe(step, bounds[step])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    state = np.asarray([stop.best, -1 if stop.best_step is None else stop.best_step, stop.waited], np.float64)
    best, best_step, waited = multihost_utils.broadcast_one_to_all(state)
    stop.best, stop.best_step, stop.waited = float(best), None if best_step < 0 else int(best_step), int(waited)
  return stop

"""`train.profile_steps = (first, last)`: a `jax.profiler` trace of those steps in the run's TensorBoard folder.

The trace starts before step `first` is dispatched and stops once step `last` has finished on the device, so it
holds whole steps. It lands in `<workdir>/tb/plugins/profile/<timestamp>/` (TensorBoard's profile tab reads it;
the `*.trace.json.gz` beside it opens in Perfetto, and `bench/trace_summary.py` lists its largest costs). For a
workdir in a bucket the profiler writes into a local temporary folder and the trace is uploaded when it stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError


def check_profile_steps(value) -> tuple[int, int] | None:
  """(first, last) from `train.profile_steps`, or None when it is empty (no trace)."""
  steps = tuple(value)
  if not steps:
    return None
  if len(steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps) \
      or not 1 <= steps[0] <= steps[1]:
    raise ConfigError(f"train.profile_steps: (first, last) step numbers with 1 <= first <= last, e.g. (10, 12), or "
                      f"() for no trace; got {value!r}")
  return steps


class StepProfiler:
  """Traces the steps `profile_steps` names; `before(step)` ahead of dispatching a step, `after(step, out)` once it
  is dispatched (`out`: something of the step's to wait on)."""

  def __init__(self, log_dir: str, profile_steps):
    self.log_dir = log_dir  # a local folder or a bucket URL
    self.steps = check_profile_steps(profile_steps)
    self.active = False
    self.trace_dir = None
    self._local = None  # where the profiler writes: log_dir itself, or a temporary folder for a URL

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0] and not self.active:
      self._local = tempfile.mkdtemp(prefix="diffgemma-trace-") if storage.is_url(self.log_dir) else self.log_dir
      os.makedirs(self._local, exist_ok=True)
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, out) -> str | None:
    """Stops the trace after the last profiled step (waiting for it); returns the trace folder then."""
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(out)
      self.stop()
      return self.trace_dir
    return None

  def stop(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    runs = os.path.join(self._local, "plugins", "profile")
    if not os.path.isdir(runs):
      return
    latest = sorted(os.listdir(runs))[-1]
    self.trace_dir = os.path.join(runs, latest)
    if self._local != self.log_dir:
      self.trace_dir = storage.upload_folder(self.trace_dir, storage.join(self.log_dir, "plugins", "profile", latest))
      shutil.rmtree(self._local, ignore_errors=True)

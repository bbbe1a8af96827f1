"""`StopRequest`: a scheduler's preemption notice (SIGTERM) turned into a stop at the next step boundary, the same
step on every process; the trainer saves a checkpoint there, an evaluation its partial results."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """SIGTERM (a scheduler's preemption notice) asks the run to stop after the step in flight, its work saved.

  One process: a SIGTERM handler sets a flag while the loop runs (the previous handler comes back after). Several
  processes: JAX's distributed runtime already turns SIGTERM on any process into a sync step that every process
  reaches together (`multihost_utils.reached_preemption_sync_point`), so all of them stop after that same step.
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous = None

  def __enter__(self) -> "StopRequest":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.signal = signum

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the runtime's preemption service is off (jax_enable_preemption_service=False)
        return False
    return self.signal is not None

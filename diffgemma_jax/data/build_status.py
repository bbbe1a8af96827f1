"""Process 0's reports on a dataset build the other processes of its job wait for, and their waiting.

Some of a multi-process job's build is process 0's alone while the others wait: a dataset built into a bucket
(data/remote_dataset.py), the wait for another job's build lock on a local dataset folder (`data_recipes.
build_lock`: that job may build a 100 GB corpus for hours), an SFT dataset written by process 0. A barrier with a
fixed timeout kills the job then; one without a timeout waits for ever for a process 0 that died. So process 0
reports on a board that the others read (`JobBuild`):
  while it works   a heartbeat every `heartbeat_s` (30 s): {"building": true, "beat": n, "stage": the last of
                   the job's sync points it reached}, rewritten at once when it reaches one;
  when it ends     its outcome: {"ok": true}, or {"error": its one-line message}.
The others poll the board (50 ms after they start waiting or see a change, then twice as long each time, up to
`poll_s`, 5 s: a short step is not rounded up to 5 s, a long one costs a read every 5 s) and set no deadline on
the work itself: they wait while the beats advance, fail at once with process 0's message when its build failed,
and fail, saying so, once no beat has come for `stale_s` (10 minutes) by their own clock (process 0 killed, out
of memory, or its host gone).

Boards: `FileBoard`, a file or an object (the bucket build's `build-status.json`, beside the dataset it
builds); `KeyValueBoard`, a key of the job's own key-value store (the JAX distributed runtime's coordination
service), what a local build uses: it is this job's alone (a file beside `data.dir` would be shared by every
job that builds that folder, the very case of a lock held by another job).
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from typing import Callable, Protocol

from etils import epath

from diffgemma_jax.errors import ConfigError, DataError

POLL_S = 5.0
FIRST_POLL_S = 0.05  # the first poll after a change comes this soon, each next one twice as late, up to POLL_S
HEARTBEAT_S = 30.0
STALE_S = 600.0


class Board(Protocol):
  """Where process 0's state is published: `read` (None before any write), `write` and `clear`, each raising
  OSError when the medium fails; `name` says where, in messages."""
  name: str

  def read(self) -> str | None: ...

  def write(self, text: str) -> None: ...

  def clear(self) -> None: ...


class FileBoard:
  """A file or a bucket object (written whole)."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.name = self.path.name

  def read(self) -> str | None:
    try:
      return self.path.read_text()
    except FileNotFoundError:
      return None

  def write(self, text: str) -> None:
    self.path.write_text(text)

  def clear(self) -> None:
    self.path.unlink(missing_ok=True)


class KeyValueBoard:
  """A key of the job's key-value store: `client` is the JAX distributed runtime's client (or anything with its
  `key_value_try_get`, `key_value_set` and `key_value_delete`), whose errors are RuntimeErrors."""

  def __init__(self, client, key: str):
    self.client, self.key = client, key
    self.name = f"the job's key-value store (key {key})"

  def read(self) -> str | None:
    try:
      return self.client.key_value_try_get(self.key)
    except RuntimeError as e:
      if str(e).startswith("NOT_FOUND"):
        return None
      raise OSError(_first_line(e)) from None

  def write(self, text: str) -> None:
    try:
      self.client.key_value_set(self.key, text, allow_overwrite=True)
    except RuntimeError as e:
      raise OSError(_first_line(e)) from None

  def clear(self) -> None:
    try:
      self.client.key_value_delete(self.key)
    except RuntimeError as e:
      raise OSError(_first_line(e)) from None


def _first_line(error: Exception) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def one_line(error: BaseException) -> str:
  """The message of a ConfigError or DataError, else the exception's type and message, on one line."""
  text = str(error) if isinstance(error, (ConfigError, DataError)) and str(error) else \
      "".join(traceback.format_exception_only(error)).strip()
  return " ".join(text.split())


class Heartbeat:
  """Process 0's beats: written at `start`, every `every_s`, and at once when it reaches a stage (`reach`);
  `stop` returns once the last write finished, so no beat can overwrite the outcome written after it."""

  def __init__(self, board: Board, every_s: float):
    self.board, self.every_s = board, every_s
    self.beat, self.stage = 0, ""
    self.lock = threading.Lock()  # one write at a time, in order: a later stage is never overwritten by an earlier
    self.stopped = threading.Event()
    self.thread = threading.Thread(target=self._run, name="dataset-build-heartbeat", daemon=True)

  def _write(self, stage: str | None = None) -> None:
    with self.lock:
      if stage is not None:
        self.stage = stage
      try:
        self.board.write(json.dumps({"building": True, "beat": self.beat, "stage": self.stage}))
      except OSError:
        pass  # a missed beat is a late one; the waiting processes allow for several
      self.beat += 1

  def reach(self, stage: str) -> None:
    self._write(stage)

  def _run(self) -> None:
    while not self.stopped.wait(self.every_s):
      self._write()

  def start(self) -> Heartbeat:
    self._write()
    self.thread.start()
    return self

  def stop(self) -> None:
    self.stopped.set()
    self.thread.join()


class JobBuild:
  """A build that the processes of a job run together while process 0 reports on it (see the module doc).

  `with job:` on every process: process 0 clears the board, all meet at the barrier `start` (so what the others
  read after it is this build's), and process 0 beats until the block ends, then publishes how it ended (and
  raises what it raised). Inside the block, `job.barrier(name)` is the job's sync point: process 0 reports that
  it got there; the others first wait for that report, for as long as the beats advance, then all meet at the
  runtime's `barrier(name)`, which by then waits only for processes that work alongside. After the block, the
  other processes' `wait_outcome()` returns once process 0 published success. Process 0's failure reaches the
  others as a DataError naming `what` (`data.dir DIR`) with its message, at their next poll."""

  def __init__(self, board: Board, *, process_index: int, barrier: Callable[[str], None], what: str, start: str,
               poll_s: float = POLL_S, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
    self.board, self.process_index, self.runtime_barrier = board, process_index, barrier
    self.what, self.start = what, start
    self.poll_s, self.heartbeat_s, self.stale_s = poll_s, heartbeat_s, stale_s
    self.heartbeat: Heartbeat | None = None

  def __enter__(self):
    if self.process_index == 0:
      self.board.clear()
    self.runtime_barrier(self.start)
    if self.process_index == 0:
      self.heartbeat = Heartbeat(self.board, self.heartbeat_s).start()
    return self

  def __exit__(self, kind, error, tb) -> bool:
    if self.heartbeat is not None:
      self.heartbeat.stop()
      self.heartbeat = None
      try:
        self.board.write(json.dumps({"ok": True} if error is None else {"error": one_line(error)}))
      except OSError:
        if error is None:
          raise
        # else the build's own error goes on; the others learn of it when the beats stop
    return False

  def barrier(self, name: str) -> None:
    if self.process_index == 0:
      self.heartbeat.reach(name)
    else:
      self._wait(lambda state: state.get("stage") == name)
    self.runtime_barrier(name)

  def wait_outcome(self) -> None:
    self._wait(lambda state: False)

  def _wait(self, reached: Callable[[dict], bool]) -> dict:
    """Process 0's state once it is an outcome or `reached`, polled every `poll_s`; a DataError for its failure,
    or once its beats (or its first one) have not advanced for `stale_s` by this process's clock."""
    last, changed, read_error, pause = None, time.monotonic(), "", min(FIRST_POLL_S, self.poll_s)
    while True:
      try:
        published = self.board.read()
        state, read_error = (json.loads(published) if published else None), ""
      except (OSError, ValueError) as e:  # rewritten while read (an ETag that moved on, half an object): next poll
        state, read_error = last, f"; the last read failed: {one_line(e)}"
      if state and "error" in state:
        raise DataError(f"{self.what}: the dataset build failed on process 0: {state['error']}")
      if state and (not state.get("building") or reached(state)):
        return state
      if state != last:
        last, changed, pause = state, time.monotonic(), min(FIRST_POLL_S, self.poll_s)
      elif time.monotonic() - changed > self.stale_s:
        seen = f"its last beat ({last['beat']})" if last else "no beat at all"
        raise DataError(f"{self.what}: process 0 has stopped reporting on the dataset build: {seen} in "
                        f"{self.board.name}, nothing new for {self.stale_s:g} s (killed, out of memory, or its "
                        f"host gone?){read_error}; see its log")
      time.sleep(pause)
      pause = min(2 * pause, self.poll_s)

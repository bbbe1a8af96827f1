"""One process of a joined run failing alone ends every process at once, each printing that process's error.

JAX's runtime learns that a process is gone only when it stops sending heartbeats
(`distributed.heartbeat_timeout_s`) or when process 0, which serves the runtime, goes. A process that exits with a
one-line error (a dataset or an initial checkpoint its host cannot see, a bad flag given to one process only)
keeps sending them until its exit, and its exit waits at JAX's shutdown barrier for the others. Meanwhile the
others wait at their next collective: 30 s on CPU (gloo's timeout), without a bound on GPUs (NCCL), or an hour at
a barrier of ours (a dataset build's).

So every process of a joined run watches the job's key-value store (`watch_peers`, started when it joins):
  1. the failing process F writes FAILED_KEY (its index, the process count, its exit status and its error line;
     the first to write it wins) and the same under every other process's NOTICE_PREFIX key, through
     `fail_together`, which the entry points' error path and the uncaught-exception hook call;
  2. a thread on every other process, waiting on its own notice key since the join, prints `error: process F of N
     failed: <line>` (unless that process has printed a failure of its own: one line each, `claim_error_line`),
     acknowledges (SEEN_PREFIX + its index) and exits with F's status, except process 0;
  3. F waits for every acknowledgement (at most ACK_TIMEOUT_S: a process whose Python never runs again cannot
     answer; the heartbeat timeout ends it), says so (DONE_KEY) and exits;
  4. process 0, which serves the store, exits last: once every other process has acknowledged and F is done, and
     EXIT_GRACE_S later (a process whose runtime client loses the coordinator before its own exit aborts).
The exits are `os._exit`: the main thread may be blocked in a collective that will never complete, and JAX's
shutdown at exit would wait at a barrier for processes that are gone. The watching thread is blocked in the
runtime's long poll with the GIL released (no cost to the run). A process that ends normally wakes it with its own
notice key ("exit") and joins it at exit, before JAX shuts the runtime down: a thread still inside the runtime's
call when the interpreter finalizes aborts the process.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time

FAILED_KEY = "diffgemma/failed"
NOTICE_PREFIX = "diffgemma/failure_notice/"
EXIT_NOTICE = "exit"
SEEN_PREFIX = "diffgemma/failed_seen/"
DONE_KEY = "diffgemma/failed_done"
ACK_TIMEOUT_S = 10.0
EXIT_GRACE_S = 2.0  # process 0 outlives the failing process's exit by this much (`_watch`)
POLL_MS = 600_000  # the watcher's long poll, renewed; a process that ends wakes its own

_peer_failed = threading.Event()  # a failure of another process was read from the store
_failing = threading.Event()  # this process is reporting a failure of its own
_watching: list = []
_line_lock = threading.Lock()
_line_said: list = []  # holds True once this process has printed its one error line (`claim_error_line`)


def claim_error_line() -> bool:
  """In a joined run, True for the first caller in this process, False after: a process prints one `error:` line,
  its own failure's (the entry points' `fail`) or, when another process's failure reached it first, that one's
  (the watcher), even when both happen at once. Always True outside a joined multi-process run (a process may
  report many errors)."""
  if _runtime() is None:
    return True
  with _line_lock:
    if _line_said:
      return False
    _line_said.append(True)
    return True


def _runtime():
  """(client, process index, process count) of the joined runtime, or None. Read from JAX's state, not from
  `jax.process_index()`, which would start a backend from the watching thread."""
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel (no public API exposes the client)
  except ImportError:
    return None
  state = distributed.global_state
  if state.client is None or state.process_id is None or not state.num_processes or state.num_processes < 2:
    return None
  return state.client, int(state.process_id), int(state.num_processes)


def watch_peers() -> bool:
  """Starts this process's watcher of the others' failures and its uncaught-exception hook, once, after joining;
  False (nothing started) outside a joined multi-process run."""
  runtime = _runtime()
  if runtime is None:
    return False
  if not _watching:
    thread = threading.Thread(target=_watch, args=runtime, name="diffgemma-peer-failures", daemon=True)
    _watching.append(thread)
    sys.excepthook = _hook(sys.excepthook)
    thread.start()
    atexit.register(stop_watching)  # runs before JAX's own exit handler (registered earlier), which shuts down
  return True


def stop_watching() -> None:
  """Wakes this process's watcher with its own notice key and waits for it to end (a normal exit, or before
  shutting the runtime down); nothing to do if it was never started or has ended."""
  if not _watching or not _watching[0].is_alive() or threading.current_thread() is _watching[0]:
    return
  runtime = _runtime()
  if runtime is not None:
    _set(runtime[0], NOTICE_PREFIX + str(runtime[1]), EXIT_NOTICE)
  _watching[0].join(timeout=ACK_TIMEOUT_S)


def fail_together(message: str, code: int) -> None:
  """In a joined run: tells every other process that this one failed with `message` (one line), waits for them to
  read it, and exits with `code`; they print it and exit with the same status. Returns at once (nothing done)
  outside a joined run."""
  runtime = _runtime()
  if runtime is None:
    return
  client, me, count = runtime
  _failing.set()
  report = json.dumps(dict(process=me, count=count, code=int(code), message=message))
  try:
    client.key_value_set(FAILED_KEY, report)
  except Exception as e:  # pylint: disable=broad-except (the runtime raises JaxRuntimeError)
    if "ALREADY_EXISTS" in str(e):  # another process failed first: this process's watcher is ending it
      _await_watcher(code)
    _exit(code)  # the store is gone (process 0 ended): nobody is left to tell
  for p in range(count):
    if p != me:
      _set(client, NOTICE_PREFIX + str(p), report)
  _await(client, [SEEN_PREFIX + str(p) for p in range(count) if p != me])
  _set(client, DONE_KEY)
  if me == 0:  # the store's server: the others exit right after acknowledging; let them go first
    time.sleep(EXIT_GRACE_S)
  _exit(code)


def _watch(client, me: int, count: int) -> None:
  while True:
    try:
      value = client.blocking_key_value_get(NOTICE_PREFIX + str(me), POLL_MS)
    except Exception as e:  # pylint: disable=broad-except (the runtime raises JaxRuntimeError)
      if "DEADLINE_EXCEEDED" in str(e):
        continue
      return  # the runtime shut down
    if value == EXIT_NOTICE:
      return
    failure = _parse(value)
    if not _failing.is_set() and claim_error_line():  # else this process printed its own failure's line
      _say(f"error: process {failure['process']} of {failure['count']} failed: {failure['message']}")
    _peer_failed.set()
    _set(client, SEEN_PREFIX + str(me))
    if me == 0:  # the store's server: the last to go
      _await(client, [SEEN_PREFIX + str(p) for p in range(1, count) if p != failure["process"]] + [DONE_KEY])
      # F exits right after writing DONE_KEY; a runtime client that loses the coordinator first aborts its process
      # (SIGABRT instead of F's status: seen once in a loaded test run), so the coordinator lingers a moment
      time.sleep(EXIT_GRACE_S)
    _exit(failure["code"])


def _hook(previous):
  """sys.excepthook for a joined run: an exception that a peer's failure caused (a collective that lost its peer)
  waits for the watcher to exit with the peer's status, quietly; any other is printed as before and ends every
  process (status 1) with its last line."""
  def hook(kind, value, traceback):
    if _peer_failed.is_set() or _peer_failure() is not None:
      _await_watcher(1)
    previous(kind, value, traceback)
    line = f"{kind.__name__}: {value}".strip().splitlines()[0] if str(value) else kind.__name__
    fail_together(f"{line} (its traceback is in that process's log)", 1)
  return hook


def _peer_failure() -> dict | None:
  runtime = _runtime()
  if runtime is None:
    return None
  try:
    failure = _parse(runtime[0].key_value_try_get(FAILED_KEY))
  except Exception:  # pylint: disable=broad-except (NOT_FOUND)
    return None
  return failure if failure["process"] != runtime[1] else None


def _await_watcher(code: int) -> None:
  """Leaves the exit to the watcher, which is reading another process's failure; exits after ACK_TIMEOUT_S twice if
  it never does."""
  time.sleep(2 * ACK_TIMEOUT_S + POLL_MS / 1000)
  _exit(code)


def _await(client, keys: list[str]) -> None:
  deadline = time.monotonic() + ACK_TIMEOUT_S
  for key in keys:
    left_ms = int((deadline - time.monotonic()) * 1000)
    if left_ms <= 0:
      return
    try:
      client.blocking_key_value_get(key, left_ms)
    except Exception:  # pylint: disable=broad-except (a process that never answers: its heartbeat ends it)
      return


def _set(client, key: str, value: str = "1") -> None:
  try:
    client.key_value_set(key, value)
  except Exception:  # pylint: disable=broad-except (already set, or the store is gone: nothing left to tell)
    pass


def _parse(value) -> dict:
  failure = json.loads(value)
  return dict(process=int(failure["process"]), count=int(failure["count"]), code=int(failure["code"]),
              message=str(failure["message"]))


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _exit(code: int) -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except (a closed pipe)
      pass
  os._exit(int(code))  # pylint: disable=protected-access (see the module's docstring)

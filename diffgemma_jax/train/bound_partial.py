"""A held-out bound's partial results, kept in a file so that a long evaluation stopped part way (preempted, killed,
out of time) continues where it stopped instead of starting over.

An evaluation of one held-out set is a sequence of batches, batch b scored with the key fold_in(seed, b) whatever
ran before it, so the rows' results of the first n batches followed by those of batches n, n + 1, ... are exactly
the results of an evaluation that never stopped. The file holds those rows' arrays and a key: everything they
depend on (the checkpoint, the dataset's manifest, the rows and the batch shape, the seed, the number of noise
levels, the objective). A file written under another key is never mixed in: the evaluation says so and starts over.
Only process 0 touches the file (`distributed.is_first_process`: also the first of N copies of a command that
never joined the runtime): it writes it (atomically: a local rename, or one object written whole) and reads
it at a resume, checks its key, then hands the bytes to every other process through the collective channel the
evaluation runs on (`from_process_0`; nothing where the key differs). So every process continues from the same
batch with the same rows whether or not the others can see the file: a workdir on each host's own disk works as a
shared one or a bucket does. The file holds whole global batches (every process has every row's results), so a
stopped evaluation continues on any number of processes.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from typing import Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffgemma_jax import storage
from diffgemma_jax.parallel.distributed import is_first_process

SAVE_EVERY_S = 60.0
_ARRAYS = ("nelbo", "stderr", "tokens")


class PartialBound:
  """The per-row results (nelbo, stderr, tokens) of the first `done` batches of one held-out set. `path` None keeps
  them in memory only (the trainer's evaluations, which are short)."""

  def __init__(self, path: str | None = None, key: dict | None = None, *, save_every_s: float = SAVE_EVERY_S,
               log: Callable[[str], None] = lambda message: None):
    self.path, self.key = path, json.loads(json.dumps(key or {}, sort_keys=True, default=str))
    self.save_every_s, self.log = save_every_s, log
    self.batches: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    self._saved_done, self._saved_at = 0, time.monotonic()

  @property
  def done(self) -> int:
    return len(self.batches["nelbo"])

  def add(self, nelbo_B, stderr_B, tokens_B) -> None:
    for name, value in zip(_ARRAYS, (nelbo_B, stderr_B, tokens_B)):
      self.batches[name].append(np.asarray(value))

  def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nelbo, stderr, tokens) of every row of the batches done, in order."""
    return tuple(np.concatenate(self.batches[name]) for name in _ARRAYS)

  def resume(self, num_batches: int) -> int:
    """Takes the batches a file of this key holds (at most `num_batches`), the file as process 0 reads it, on every
    process (a collective: every process calls it); returns how many. 0 when there is no file, or it is unreadable
    or was written for other rows (it is then overwritten by this evaluation's). Process 0 alone decides: it sends
    the file only where it matches process 0's key, and the others take what it sent, so no process can continue
    from the file while another starts over (a key that differs between processes, say a checkpoint path mounted
    elsewhere on one host, would otherwise split them)."""
    if self.path is None:
      return 0
    data = b""
    if is_first_process():  # a read that fails must not leave the others waiting in the broadcast
      try:
        if storage.file_size(self.path) is not None:
          with storage.open_binary(self.path) as f:
            data = f.read()
      except OSError as e:
        self.log(f"{self.path}: unreadable partial results ({type(e).__name__}); evaluating from the first batch")
      if data and self._load(data) is None:
        data = b""
    data = from_process_0(data)
    loaded = self._load(data, check_key=False) if data else None
    if loaded is None:
      return 0
    arrays, batch_rows = loaded
    done = min(len(arrays["nelbo"]) // max(batch_rows, 1), num_batches)
    for name in _ARRAYS:
      self.batches[name] = list(arrays[name][:done * batch_rows].reshape(done, batch_rows))
    self._saved_done = done
    return done

  def _load(self, data: bytes, *, check_key: bool = True) -> tuple[dict[str, np.ndarray], int] | None:
    """(arrays, rows per batch) of a partial-results file's bytes; None, saying why, when they are unreadable or
    (`check_key`) were written under another key."""
    try:
      with np.load(io.BytesIO(data)) as saved:
        key = json.loads(str(saved["key"]))
        arrays = {name: saved[name] for name in _ARRAYS}
        batch_rows = int(saved["batch_rows"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      self.log(f"{self.path}: unreadable partial results ({type(e).__name__}); evaluating from the first batch")
      return None
    if check_key and key != self.key:
      differ = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
      self.log(f"{self.path}: partial results of another evaluation (differs in {', '.join(differ)}); "
               f"evaluating from the first batch")
      return None
    return arrays, batch_rows

  def save(self, *, force: bool = False) -> None:
    """Writes the batches done (process 0; at most every `save_every_s` unless `force`)."""
    due = force or time.monotonic() - self._saved_at >= self.save_every_s
    if self.path is None or not due or self.done == self._saved_done or not is_first_process():
      return
    buffer = io.BytesIO()
    nelbo, stderr, tokens = self.rows()
    np.savez(buffer, key=np.asarray(json.dumps(self.key, sort_keys=True)), batch_rows=np.asarray(len(nelbo) //
             self.done), nelbo=nelbo, stderr=stderr, tokens=tokens)
    if storage.is_url(self.path):
      epath.Path(self.path).write_bytes(buffer.getvalue())  # an object is replaced whole
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      temporary = f"{self.path}.{os.getpid()}.tmp"
      with open(temporary, "wb") as f:
        f.write(buffer.getvalue())
      os.replace(temporary, self.path)
    self._saved_done, self._saved_at = self.done, time.monotonic()

  def discard(self) -> None:
    """Removes the file once the evaluation it served is complete (process 0)."""
    if self.path is not None and is_first_process() and storage.file_size(self.path) is not None:
      epath.Path(self.path).unlink()


def from_process_0(data: bytes) -> bytes:
  """`data` as process 0 has it, on every process: a broadcast of its length, then of its bytes, over the devices of
  every process (one process: `data` itself). A collective: every process of a joined run calls it."""
  if jax.process_count() == 1:
    return data
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
  if not size:
    return b""
  mine = np.frombuffer(data, np.uint8) if jax.process_index() == 0 else np.zeros(size, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(mine)).astype(np.uint8).tobytes()

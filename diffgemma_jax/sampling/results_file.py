"""`diffgemma-generate --output FILE.jsonl`: a generation job's results kept as they come, and a rerun that
finishes the job.

One JSON object per request per line: the request's fields (`launch/generate.JSON_KEYS`, `index` its position
among the prompts) and `settings`, a digest of what decides its completion other than the prompt (the workdir,
the sampler and its options, the seed, the stop strings, the chat template and system turn). Each request's line is
appended, flushed and synced to disk as its batch ends, so a job killed at request 9,999 of 10,000 keeps 9,999.

Run again with the same flags, the job reads the file, keeps the lines whose index and prompt match the requests
and whose settings are the same, and generates only the others (each the same as in an uninterrupted run: a
request's sample depends on its own prompt and seed only, and a fitted gen_length on every prompt). A line cut short
by a kill is dropped. Lines of other prompts or other settings, or of another checkpoint step than the rerun reads,
are refused in one line rather than mixed in. When the job ends the file is rewritten in index order.

A bucket URL cannot be appended to: the object is rewritten whole at most every UPLOAD_EVERY_S seconds while the job
runs, and at its end, so a killed job loses at most that long of results there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError

UPLOAD_EVERY_S = 60.0
PART_POLL_S = 5.0  # how often process 0 of a split launch checks the other copies' parts (reading those changed)
PART_STALE_S = 1800.0  # and how long it waits for a part that does not grow before it gives up
LINE_START = b'{"index": '  # how each line of a results file starts (its first key), cut short or not


def settings_digest(settings: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_results_file(path: str | None) -> bool:
  return bool(path) and str(path).endswith(".jsonl")


class ResultsFile:
  """The results of a generation job in `path` (see the module doc); `write=False` (a process other than the
  launch's first) reads it to skip the same requests and writes nothing."""

  def __init__(self, path: str, prompts: Sequence[str], settings: dict[str, Any], *, flag: str = "--output",
               write: bool = True, upload_every_s: float = UPLOAD_EVERY_S):
    self.path, self.flag, self.write = str(path), flag, write
    self.remote = storage.is_url(path)
    self.digest = settings_digest(settings)
    self.upload_every_s, self._uploaded = upload_every_s, time.monotonic()
    self.records: dict[int, dict] = {}
    good_bytes = self._read(prompts)
    self.kept = len(self.records)
    first = next(iter(self.records.values()), None)
    self.kept_run = None if first is None else (first.get("step"), first.get("weights"))
    if write and not self.remote and os.path.isfile(self.path) and os.path.getsize(self.path) != good_bytes:
      with open(self.path, "r+b") as f:  # a line a kill cut short: gone before anything is appended
        f.truncate(good_bytes)

  def _read(self, prompts: Sequence[str]) -> int:
    """Reads the lines already there into `records`; returns the bytes of its whole lines."""
    try:
      data = epath.Path(self.path).read_bytes() if self.remote else open(self.path, "rb").read()
    except FileNotFoundError:
      return 0
    good, where = 0, f"{self.flag} {self.path}"
    for number, line in enumerate(data.split(b"\n"), 1):
      if good + len(line) >= len(data):  # the last piece: no newline after it, a line a kill cut short
        if line.strip() and not line.startswith(LINE_START):  # not one of ours: never cut someone's file
          raise ConfigError(f"{where}:{number} is not a line of diffgemma-generate's results; use a new --output "
                            f"or delete the file")
        break
      good += len(line) + 1
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        raise ConfigError(f"{where}:{number} is not a JSON line of diffgemma-generate's results; use a new "
                          f"--output or delete the file") from None
      index = record.get("index") if isinstance(record, dict) else None
      if not isinstance(index, int) or not 0 <= index < len(prompts) or record.get("prompt") != prompts[index]:
        raise ConfigError(f"{where}:{number} holds a result for another prompt than request {index} of these "
                          f"(another --prompts file?); use a new --output or delete the file")
      if record.get("settings") != self.digest:
        raise ConfigError(f"{where}:{number} was generated with other settings (workdir, sampler options, --seed, "
                          f"--stop, --chat or --system differ); rerun with those, or use a new --output")
      self.records[index] = record
    return good

  def pending(self, positions: Sequence[int]) -> list[int]:
    """The positions of `positions` without a result yet."""
    return [i for i in positions if i not in self.records]

  def add(self, index: int, record: dict) -> None:
    """Keeps the result of request `index` (appended to a local file at once)."""
    record = dict(record, index=index, settings=self.digest)
    self._take_run(record, lambda held, run: (
        f"{self.flag} {self.path} holds results of checkpoint step {held[0]} ({held[1]} weights) and this run reads "
        f"step {run[0]} ({run[1]} weights); pass --step {held[0]} to finish that job, or use a new --output"))
    self.records[index] = record
    if not self.write:
      return
    if not self.remote:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    elif time.monotonic() - self._uploaded >= self.upload_every_s:
      self._rewrite()

  def _rewrite(self) -> None:
    text = "".join(json.dumps(self.records[i], allow_nan=False) + "\n" for i in sorted(self.records))
    if self.remote:
      storage.write_text(self.path, text)
      self._uploaded = time.monotonic()
      return
    storage.write_file_atomic(self.path, text.encode("utf-8"), sync=True)

  def finish(self) -> list[dict]:
    """Rewrites the file in index order (when writing); returns every record in that order."""
    if self.write:
      self._rewrite()
    return [self.records[i] for i in sorted(self.records)]

  def absorb(self, other: ResultsFile) -> None:
    """Takes the records of `other` (another file of the same prompts and settings) that this one lacks, held in
    memory until `finish` writes them; refuses those of another checkpoint step, as `add` does."""
    for index in sorted(set(other.records) - set(self.records)):
      record = other.records[index]
      self._take_run(record, lambda held, run: (
          f"{other.path} holds results of checkpoint step {run[0]} ({run[1]} weights) and {self.path} of step "
          f"{held[0]} ({held[1]} weights): the copies read other checkpoints (a run still training?); pass the same "
          f"--step to every copy"))
      self.records[index] = record

  def _take_run(self, record: dict, refusal) -> None:
    """Records the checkpoint run (step, weights) of `record` as the file's; a ConfigError with `refusal(the file's
    run, the record's)` when the file already holds another's."""
    run = (record.get("step"), record.get("weights"))
    if self.kept_run is not None and run != self.kept_run:
      raise ConfigError(refusal(self.kept_run, run))
    self.kept_run = run


def part_path(path: str, index: int, count: int) -> str:
  """The results file of copy `index` of a launch of `count` copies that split the job of `path` (FILE.jsonl):
  FILE.part-<index>-of-<count>.jsonl beside it."""
  return f"{str(path)[:-len('.jsonl')]}.part-{index}-of-{count}.jsonl"


def gather_parts(merged: ResultsFile, prompts: Sequence[str], settings: dict[str, Any], count: int, *,
                 poll_s: float = PART_POLL_S, stale_s: float = PART_STALE_S, say=None) -> None:
  """Process 0 of a launch of `count` copies that split a job (launch/generate.py): waits until every other copy's
  part (`part_path`) holds each request of its share that `merged` lacks, takes them into `merged`, and deletes
  the parts once `merged` is written (`finish`, by the caller: call it before `delete_parts`). A ConfigError when
  the parts still lacking requests have not grown for `stale_s` (a copy stopped or failed: its log says why; the
  same command run again finishes the job from what the files hold). `say(text)`: a line of progress, at most once
  a minute."""
  wanted = {q: [i for i in range(q, len(prompts), count) if i not in merged.records] for q in range(1, count)}
  seen, changed, said, read = None, time.monotonic(), 0.0, {}
  while True:
    left = {}
    for q, positions in wanted.items():
      path = part_path(merged.path, q, count)
      try:
        version = storage.stamp(path)  # a part is read again only once it changed
      except FileNotFoundError:
        version = None
      if version is not None and read.get(q) != version:
        merged.absorb(ResultsFile(path, prompts, settings, flag=merged.flag, write=False))
        read[q] = version
      missing = [i for i in positions if i not in merged.records]
      if missing:
        left[q] = missing
    if not left:
      return
    state = {q: len(missing) for q, missing in left.items()}
    if state != seen:
      seen, changed = state, time.monotonic()
    elif time.monotonic() - changed > stale_s:
      names = ", ".join(f"{part_path(merged.path, q, count)} ({n} left)" for q, n in sorted(state.items()))
      raise ConfigError(f"{merged.flag} {merged.path}: the shares of other copies of this launch have not grown for "
                        f"{stale_s:g} s: {names}; a copy stopped or failed (see its log); run the same command "
                        f"again to finish the job")
    if say is not None and time.monotonic() - said >= 60:
      say(f"{merged.flag} {merged.path}: waiting for the other copies' shares: {sum(state.values())} request(s) "
          f"left in {len(state)} part(s)")
      said = time.monotonic()
    time.sleep(poll_s)


def delete_parts(path: str, count: int) -> None:
  """Deletes the part files of a merged job (`gather_parts`)."""
  for q in range(count):
    epath.Path(part_path(path, q, count)).unlink(missing_ok=True)

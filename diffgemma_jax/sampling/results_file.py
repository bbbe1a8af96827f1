"""`diffgemma-generate --output FILE.jsonl`: a generation job's results kept as they come, and a rerun that
finishes the job.

One JSON object per request per line: the request's fields (`launch/generate.JSON_KEYS`, `index` its position
among the prompts) and `settings`, a digest of what decides its completion other than the prompt (the workdir,
the sampler and its options, the seed, the stop strings, the chat template and system turn). Each request's line is
appended and flushed as its batch ends, so a job killed at request 9,999 of 10,000 keeps 9,999; the file is synced
to disk at most every SYNC_EVERY_S seconds (a sync per line cost a batch of 32 results 32 syncs, each milliseconds
on a network filesystem), so a machine that loses power loses at most that long of results.

Run again with the same flags, the job reads the file, keeps the lines whose index and prompt match the requests
and whose settings are the same, and generates only the others (each the same as in an uninterrupted run: a
request's sample depends on its own prompt and seed only, and a fitted gen_length on every prompt). A line cut short
by a kill is dropped. Lines of other prompts or other settings, or of another checkpoint step than the rerun reads,
are refused in one line rather than mixed in. When the job ends the file is rewritten in index order.

A bucket object cannot be appended to. While the job runs, the results added since the last upload go up at most
every UPLOAD_EVERY_S seconds as one new object under FILE.jsonl.chunks/ (numbered, `chunk_folder`), so each upload
costs what is new: rewriting the whole object every minute cost a job of 100,000 results of 2 KB almost a second of
serialising and 236 MB of upload a minute, growing with the job. A rerun reads the object and its chunks; the job's
end writes the object whole, in index order, and then deletes the chunks. A killed job loses at most the last
interval's results there.

A job's results are held as their JSON lines (`records`, index -> the line's bytes, a `SpooledLines`: the lines
in an unnamed spool file on disk beside the results file, or in the temporary folder for a bucket's, and only
where each one lies in memory), not as parsed objects, and the end's in-order rewrite streams them to the file;
`finish` returns them as `Results`, parsed one at a time as they are iterated. Held as objects (a result's token
ids as Python ints), in the file and in the generator's list of results, then the rewrite and the printed document
as single strings, a million requests of 128 new tokens took about 6.6 GB as the job ran and 23 GB at its end; as
lines in memory, about 2.1 GB throughout; spooled, about 0.1 GB (the index; bench/results_memory.py), for as much
disk as the results file takes. Process 0 of a split launch gathers every copy's results into one file this way
too.

Reading is incremental (`refresh`): a local file from where the last read ended (read whole again only once it was
replaced), a bucket object only once it changed, and each chunk once, so process 0 of a split launch
(`gather_parts`), which polls the other copies' parts every few seconds, reads each result about once.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.sampling.spool import SpoolFile

UPLOAD_EVERY_S = 60.0
SYNC_EVERY_S = 1.0
PART_POLL_S = 5.0  # how often process 0 of a split launch checks the other copies' parts (reading what is new)
PART_STALE_S = 1800.0  # and how long it waits for a part that does not grow before it gives up
LINE_START = b'{"index": '  # how each line of a results file starts (its first key), cut short or not


@dataclasses.dataclass(frozen=True)
class JobKind:
  """Whose results a file holds, for its checks and messages: the command, what one input is called, where the
  inputs come from, what the settings digest covers, and a line's identity (compared with the input's)."""
  command: str
  unit: str
  inputs: str
  settings: str
  identity: Callable[[dict], Any]


GENERATION = JobKind("diffgemma-generate", "request", "--prompts file",
                     "workdir, sampler options, --seed, --stop, --chat or --system", lambda r: r.get("prompt"))
SCORING = JobKind("diffgemma-score", "record", "--records file", "workdir, --num_t_samples, --seed or --layout",
                  lambda r: (r.get("prompt"), r.get("continuation")))


def settings_digest(settings: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spool_folder(path: str | None) -> str | None:
  """Where a job with results file `path` spools what it holds (its results, its inputs): the file's folder, the disk
  chosen for the job (the temporary folder may be small, or a tmpfs in memory); None (the temporary folder, $TMPDIR)
  for a bucket's, no file, or a folder this host cannot write (a reader on a host without it)."""
  if path is None or storage.is_url(path):
    return None
  folder = os.path.dirname(os.path.abspath(path))
  return folder if os.access(folder, os.W_OK | os.X_OK) else None


def is_results_file(path: str | None) -> bool:
  return bool(path) and str(path).endswith(".jsonl")


def chunk_folder(path: str) -> str:
  """The folder of a bucket results file's uploads while its job runs: FILE.jsonl.chunks beside it."""
  return f"{path}.chunks"


def _chunk_name(number: int) -> str:
  return f"{number:08d}.jsonl"


class SpooledLines:
  """Lines of bytes by index, the lines in an unnamed temporary file in `folder` (gone when this is), in memory only
  where each lies (one int a line: about 100 bytes, against a result line's 2 kB). A mapping: `lines[i] = line`
  (a line given again is written again), `lines[i]`, `i in lines`, `len(lines)`, iteration over the indices in
  the order they were first given, `values()`."""

  def __init__(self, folder: str | None = None):
    self._spool = SpoolFile(folder, "results spool")
    self._where: dict[int, int] = {}  # index -> offset << 32 | length

  def __setitem__(self, index: int, line: bytes) -> None:
    if len(line) >= 1 << 32:
      raise ValueError(f"a result line of {len(line)} bytes")
    self._where[index] = self._spool.append(line) << 32 | len(line)

  def __getitem__(self, index: int) -> bytes:
    where = self._where[index]
    return self._spool.read(where >> 32, where & 0xFFFFFFFF)

  def __contains__(self, index) -> bool:
    return index in self._where

  def __len__(self) -> int:
    return len(self._where)

  def __iter__(self) -> Iterator[int]:
    return iter(self._where)

  def values(self) -> Iterator[bytes]:
    return (self[index] for index in self._where)


class ResultsFile:
  """The results of a generation job in `path` (see the module doc); `write=False` (a process other than the
  launch's first, or process 0 reading another copy's part) reads it to skip the same requests and writes
  nothing."""

  def __init__(self, path: str, prompts: Sequence[Any], settings: dict[str, Any], *, flag: str = "--output",
               write: bool = True, upload_every_s: float | None = None, sync_every_s: float | None = None,
               kind: JobKind = GENERATION):
    self.path, self.flag, self.write, self.kind = str(path), flag, write, kind
    self.prompts = prompts  # each input's identity (`kind.identity` of its line): a prompt, a (prompt, continuation)
    self.remote = storage.is_url(path)
    self.digest = settings_digest(settings)
    self.upload_every_s = UPLOAD_EVERY_S if upload_every_s is None else upload_every_s
    self.sync_every_s = SYNC_EVERY_S if sync_every_s is None else sync_every_s
    self._uploaded = self._synced = time.monotonic()
    # each result's JSON line (its newline not included), spooled beside a local file (`spool_folder`)
    self.records = SpooledLines(spool_folder(self.path))
    self.kept_run = None
    # what has been read: a local file's identity, the bytes of its whole lines and their count; a bucket object's
    # stamp and the chunks read
    self._identity, self._offset, self._lines = None, 0, 0
    self._stamp, self._chunks_read, self._next_chunk = None, set(), 0
    self._unsent: list[bytes] = []  # a bucket file's records since the last upload
    self.refresh()
    self.kept = len(self.records)
    first = next(iter(self.records.values()), None)
    first = None if first is None else json.loads(first)
    self.kept_run = None if first is None else (first.get("step"), first.get("weights"))
    if write and not self.remote and os.path.isfile(self.path) and os.path.getsize(self.path) != self._offset:
      with open(self.path, "r+b") as f:  # a line a kill cut short: gone before anything is appended
        f.truncate(self._offset)

  def refresh(self) -> list[int]:
    """Reads what was added to the file since the last read (see the module doc); returns the indices read."""
    return self._refresh_remote() if self.remote else self._refresh_local()

  def _refresh_local(self) -> list[int]:
    try:
      status = os.stat(self.path)
    except FileNotFoundError:
      return []
    identity = (status.st_dev, status.st_ino)
    if identity != self._identity or status.st_size < self._offset:  # replaced (a job's end) or cut: from the start
      self._identity, self._offset, self._lines = identity, 0, 0
    if status.st_size == self._offset:
      return []
    with open(self.path, "rb") as f:
      f.seek(self._offset)
      data = f.read()
    used, read, self._lines = self._parse(data, self.path, self._lines)
    self._offset += used
    return read

  def _refresh_remote(self) -> list[int]:
    read = []
    try:
      version = storage.stamp(self.path)  # before the listing: a job's end writes the object, then deletes chunks
    except FileNotFoundError:
      version = None
    if version is not None and version != self._stamp:
      read += self._parse(epath.Path(self.path).read_bytes(), self.path, 0)[1]
      self._stamp = version
    folder = chunk_folder(self.path)
    for name in sorted(storage.folder_sizes(folder)):
      url = storage.join(folder, name)
      if url in self._chunks_read:
        continue
      try:
        data = epath.Path(url).read_bytes()
      except FileNotFoundError:  # deleted since the listing, by a job's end that wrote the object first
        data = b""
      read += self._parse(data, url, 0)[1]
      self._chunks_read.add(url)
      if name.endswith(".jsonl") and name[:-len(".jsonl")].isdigit():
        self._next_chunk = max(self._next_chunk, int(name[:-len(".jsonl")]) + 1)
    return read

  def _parse(self, data: bytes, where: str, lines: int) -> tuple[int, list[int], int]:
    """Takes the whole lines of `data` (line `lines` + 1 of `where` on) into `records`: (the bytes of those
    lines, the indices read, the lines counted)."""
    good, read, where = 0, [], f"{self.flag} {where}"
    for line in data.split(b"\n"):
      if good + len(line) >= len(data):  # the last piece: no newline after it, a line a kill cut short
        if line.strip() and not (line.startswith(LINE_START) or LINE_START.startswith(line)):
          raise ConfigError(f"{where}:{lines + 1} is not a line of {self.kind.command}'s results; use a new "
                            f"--output or delete the file")  # not one of ours: never cut someone's file
        break
      good += len(line) + 1
      lines += 1
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        raise ConfigError(f"{where}:{lines} is not a JSON line of {self.kind.command}'s results; use a new "
                          f"--output or delete the file") from None
      index = record.get("index") if isinstance(record, dict) else None
      prompts, kind = self.prompts, self.kind
      if not isinstance(index, int) or not 0 <= index < len(prompts) or kind.identity(record) != prompts[index]:
        raise ConfigError(f"{where}:{lines} holds a result for another {kind.unit} than {kind.unit} {index} of "
                          f"these (another {kind.inputs}?); use a new --output or delete the file")
      if record.get("settings") != self.digest:
        raise ConfigError(f"{where}:{lines} was made with other settings ({kind.settings} differ); rerun with "
                          f"those, or use a new --output")
      self.records[index] = line
      read.append(index)
    return good, read, lines

  def pending(self, positions: Iterable[int]) -> array.array:
    """The positions of `positions` without a result yet (8 bytes each: a job may have ten million)."""
    return array.array("q", (i for i in positions if i not in self.records))

  def add(self, index: int, record: dict) -> None:
    """Keeps the result of request `index`: appended to a local file at once, uploaded with the others of its
    interval to a bucket."""
    record = dict(record, index=index, settings=self.digest)
    self._take_run(record, lambda held, run: (
        f"{self.flag} {self.path} holds results of checkpoint step {held[0]} ({held[1]} weights) and this run reads "
        f"step {run[0]} ({run[1]} weights); pass --step {held[0]} to finish that job, or use a new --output"))
    line = json.dumps(record, allow_nan=False).encode("utf-8")
    self.records[index] = line
    if not self.write:
      return
    if self.remote:
      self._unsent.append(line)
      if time.monotonic() - self._uploaded >= self.upload_every_s:
        self._upload()
      return
    with open(self.path, "ab") as f:
      f.write(line + b"\n")
      f.flush()
      if time.monotonic() - self._synced >= self.sync_every_s:
        os.fsync(f.fileno())
        self._synced = time.monotonic()

  def _upload(self) -> None:
    """A bucket file: the records since the last upload, as the next chunk."""
    if self._unsent:
      url = storage.join(chunk_folder(self.path), _chunk_name(self._next_chunk))
      epath.Path(url).write_bytes(b"".join(line + b"\n" for line in self._unsent))
      self._chunks_read.add(url)
      self._next_chunk += 1
      self._unsent = []
    self._uploaded = time.monotonic()

  def finish(self) -> Results:
    """Writes the file whole in index order (when writing; a bucket file's chunks deleted after it), a line at a
    time; returns every record in that order (`Results`)."""
    order = sorted(self.records)
    if self.write:
      lines = (self.records[i] + b"\n" for i in order)
      if self.remote:
        with tempfile.NamedTemporaryFile(prefix="diffgemma-results-", suffix=".jsonl") as f:
          f.writelines(lines)
          f.flush()
          storage.upload_many([(f.name, self.path)])
        delete_chunks(self.path)
        self._unsent, self._chunks_read, self._stamp = [], set(), storage.stamp(self.path)
      else:
        storage.write_file_atomic(self.path, lines, sync=True)
        status = os.stat(self.path)
        self._identity, self._offset, self._lines = (status.st_dev, status.st_ino), status.st_size, len(order)
      self._synced = self._uploaded = time.monotonic()
    return Results(self.records, order)

  def absorb(self, other: ResultsFile, indices: Iterable[int] | None = None) -> list[int]:
    """Takes the records of `other` (another file of the same prompts and settings; of `indices` of it, those it
    just read) that this one lacks, spooled with its own until `finish` writes them; refuses those of another checkpoint
    step, as `add` does. Returns the indices taken."""
    taken = sorted({i for i in (other.records if indices is None else indices) if i not in self.records})
    for index in taken:
      line = other.records[index]
      self._take_run(json.loads(line), lambda held, run: (
          f"{other.path} holds results of checkpoint step {run[0]} ({run[1]} weights) and {self.path} of step "
          f"{held[0]} ({held[1]} weights): the copies read other checkpoints (a run still training?); pass the same "
          f"--step to every copy"))
      self.records[index] = line
    return taken

  def _take_run(self, record: dict, refusal) -> None:
    """Records the checkpoint run (step, weights) of `record` as the file's; a ConfigError with `refusal(the file's
    run, the record's)` when the file already holds another's."""
    run = (record.get("step"), record.get("weights"))
    if self.kept_run is not None and run != self.kept_run:
      raise ConfigError(refusal(self.kept_run, run))
    self.kept_run = run


class Results:
  """A results file's records in index order (`ResultsFile.finish`): its length, and each record parsed as it is
  iterated (the file's lines stay the only copy)."""

  def __init__(self, lines: SpooledLines, order: Sequence[int]):
    self._lines, self._order = lines, list(order)

  def __len__(self) -> int:
    return len(self._order)

  def __iter__(self) -> Iterator[dict]:
    return (json.loads(self._lines[i]) for i in self._order)


def delete_chunks(path: str) -> None:
  """Deletes a bucket results file's chunks (`chunk_folder`); nothing for a local file."""
  if storage.is_url(path):
    folder = chunk_folder(path)
    for name in storage.folder_sizes(folder):
      epath.Path(storage.join(folder, name)).unlink(missing_ok=True)


def part_path(path: str, index: int, count: int) -> str:
  """The results file of copy `index` of a launch of `count` copies that split the job of `path` (FILE.jsonl):
  FILE.part-<index>-of-<count>.jsonl beside it."""
  return f"{str(path)[:-len('.jsonl')]}.part-{index}-of-{count}.jsonl"


def gather_parts(merged: ResultsFile, prompts: Sequence[str], settings: dict[str, Any], count: int, *,
                 poll_s: float = PART_POLL_S, stale_s: float = PART_STALE_S, say=None) -> None:
  """Process 0 of a launch of `count` copies that split a job (launch/generate.py): waits until every other copy's
  part (`part_path`) holds each request of its share that `merged` lacks, takes them into `merged` (reading each
  part's new results only, `ResultsFile.refresh`), and deletes the parts once `merged` is written (`finish`, by the
  caller: call it before `delete_parts`). A ConfigError when the parts still lacking requests have not grown for
  `stale_s` (a copy stopped or failed: its log says why; the same command run again finishes the job from what the
  files hold). `say(text)`: a line of progress, at most once a minute."""
  # how many of each copy's share `merged` lacks, counted down as results come in (no list of them: a share may
  # hold millions of requests, and each poll would test every one)
  held = [0] * count
  for i in merged.records:
    held[i % count] += 1
  wanted = {q: len(range(q, len(prompts), count)) - held[q] for q in range(1, count)}
  seen, changed, said, parts = None, time.monotonic(), 0.0, {}
  while True:
    for q in wanted:
      if q not in parts:
        parts[q] = ResultsFile(part_path(merged.path, q, count), prompts, settings, flag=merged.flag, write=False)
        taken = merged.absorb(parts[q])
      else:
        taken = merged.absorb(parts[q], parts[q].refresh())
      for i in taken:
        if i % count in wanted:
          wanted[i % count] -= 1
    state = {q: n for q, n in wanted.items() if n > 0}  # the shares still lacking requests, and how many
    if not state:
      return
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
  """Deletes the part files of a merged job (`gather_parts`), a bucket part's chunks too."""
  for q in range(count):
    part = part_path(path, q, count)
    epath.Path(part).unlink(missing_ok=True)
    delete_chunks(part)

"""The streaming pretraining build: source files -> held-out split -> tokenizer -> token store, in bounded memory.

The corpus is cut into tasks (runs of consecutive file spans, data/sources.py, of about `task_bytes`: a large
file is several spans, small files share a task) and built in five phases. A
multi-process run splits the tasks over its processes (task i goes to process i mod P), every process works on
its own tasks only, and process 0 does what is global; a barrier separates the phases, and a process that fails
leaves its error for the others to raise after the next barrier (no process waits forever for a dead one). The
processes share one staging folder (a shared filesystem), or, with `BuildOptions.exchange` (a dataset built
into a bucket), each has its own and they pass what crosses between them through the exchange (data/exchange.py):
a process's folder then ends with its own tasks' shards, process 0's with the rest of the dataset.

  0. plan      the reads that cut the large files into spans (a JSONL file's chunks, for their first line starts,
               and for an evaluation set, which is not scanned, their line counts; a Parquet or ArrayRecord file's
               metadata), spread over the processes and their workers; every process then has every part's result
               and the same tasks.
  1. scan      each task reads its documents and writes a (key digest, bytes) table (data/split.py), keeps its
               candidates for the tokenizer sample (none under the process's sample floor so far: `Sample`), and
               counts its spans' lines.
  2. decide    process 0: the spans' first line numbers where the plan did not count them, and the digests of
               their documents; the held-out threshold (or the recipe's own held-out keys), and (unless a tokenizer is
               given) the tokenizer, trained on a uniform sample of the training documents: those with the
               largest sample keys, the key digest or in a span not numbered a digest of the place (a hash puts
               the documents in random order, whatever their file or position), until the sample holds
               `sample_lines` non-empty lines.
  3. tokenise  each task encodes its documents and writes one shard per split (data/store.py).
  4. finish    process 0: the manifest (shards in task order, counts, unigram counts) and the atomic rename.

Within a process, tasks run in `workers` spawned processes, started once for both parallel phases. Tasks are small
enough (at least MIN_TASKS of them up to TASK_BYTES each) for the workers to finish together: the last task
to end, not the mean, sets the build time. Documents keep the order of the files (sorted by path) and of the
records in each file, which is the order rows are cut in, whatever the worker or process count.

Process 0 prints on stderr, terminal or not (a scheduler's log shows a long build as it goes, as it shows the
trainer's plain step lines): what it builds, where the scan and tokenise phases stand at most every
PROGRESS_EVERY_S seconds (tasks and megabytes done, the rate and the time the phase has left), and what it built.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import heapq
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import threading
import time
import traceback
from typing import Callable

import numpy as np

from diffgemma_jax import storage
from diffgemma_jax.data.exchange import Exchange
from diffgemma_jax.data.sources import (
  ReadStats,
  Span,
  check_bad_lines,
  read_documents,
  read_span_part,
  span_parts,
  spans_from_parts,
)
from diffgemma_jax.data.split import (
  DIGEST_TABLE,
  SPLIT_BY,
  HeldOut,
  heldout_threshold,
  key_digest,
  keyed_bytes,
  split_key,
  write_digest_table,
)
from diffgemma_jax.data.store import ShardWriter, token_dtype
from diffgemma_jax.data.tokenizer import Tokenizer, train_tokenizer
from diffgemma_jax.errors import DataError

SPLITS = ("train", "heldout")
# An interrupted build (killed, preempted, a worker or disk failing) leaves its staging folder, and the next build
# of the same corpus and settings (BUILD_FILE's key) takes up its tokenise phase where it stopped: the decision
# (held-out split and tokenizer) is kept, and every task whose shards were whole (its mark in TOKENISED) is not
# encoded again. A build stopped in its scan keeps the tasks scanned (`scan/<task>.json`: what each read skipped,
# its tokenizer-sample candidates under the sample floor, its spans' counts; its digest table beside it) and scans
# the rest. A bad input (a DataError) or a changed corpus or setting starts afresh.
BUILD_FILE, TOKENISED, PLAN_FILE = "build.json", "tokenised", "plan.json"
READ = "read"  # a task's mark: what its read skipped (ReadStats); an evaluation set's only read (build_store)
TASK_BYTES = 16 << 20
MIN_TASK_BYTES = 1 << 20
MIN_TASKS = 64
ENCODE_BATCH_BYTES = 4 << 20
MAX_LISTED = 10  # non-UTF-8 files and bad lines named in the report; the rest are counted
PROGRESS_EVERY_S = 30.0  # at most one progress line this often between a build's first and last line


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Source files (relative to `root`, in document order) and how to split them. `name` labels errors."""
  root: str
  files: tuple[str, ...]
  name: str
  split_by: str = "document"
  heldout_fraction: float = 0.04
  text_field: str = "text"
  max_bad_lines: int = 10
  # The split keys to hold out, chosen by the recipe (python_packages keeps big packages out of the held-out
  # side); empty: keys in digest order until `heldout_fraction` of the bytes.
  heldout_keys: tuple[str, ...] = ()
  # An evaluation set: every document held out (`heldout_keys` names every file), no training split, a given
  # tokenizer (the run's it is read for); its manifest says so (`evaluation_only`)
  evaluation_only: bool = False

  def __post_init__(self):
    if self.split_by not in SPLIT_BY:
      raise DataError(f"split_by={self.split_by!r}; valid: {SPLIT_BY}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise DataError(f"heldout_fraction={self.heldout_fraction} must lie in (0, 1)")
    if self.evaluation_only and set(self.heldout_keys) != set(self.files):
      raise DataError(f"{self.name}: an evaluation set holds out every file (heldout_keys: every one of files)")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """`workers`: processes per machine (0: every core); `sample_lines`: the tokenizer sample (data.tokenizer_sample_
  lines); `process_index` / `process_count` / `barrier(name)`: a multi-process run's share and its sync point;
  `exchange`: where its processes pass files when each builds in a staging folder of its own (data/exchange.py,
  the build of a dataset in a bucket); None: they share one (a shared filesystem)."""
  workers: int = 0
  sample_lines: int = 120_000
  process_index: int = 0
  process_count: int = 1
  barrier: Callable[[str], None] | None = None
  exchange: Exchange | None = None


def agree_to_build(options: BuildOptions, *, current: bool) -> None:
  """The processes of a build that pass files through an exchange (a dataset in a bucket) each decide from what they
  read whether the dataset is current (the recipe compares the bucket's manifest and tokenizer, and the sources'
  sizes and versions); a dataset rewritten between their reads (another job building the same data.dir) would
  have some of them build while the others went on, and the builders wait at a barrier no one else reaches. Each
  names its decision in the exchange (`found/<process>.current` or `.build`) and, after the phase's barrier, reads
  them all: a split decision fails every process in one line. Called by the builders as their build starts
  (`build_store`) and by the others (`remote_dataset`), which then delete the names (`agreed_current`)."""
  p, exchange = options.process_index, options.exchange
  exchange.found = "current" if current else "build"
  Phases("", options).run("found", lambda: exchange.write_text(f"found/{p}.{exchange.found}", ""))
  found = [rel.rsplit(".", 1)[-1] for rel in exchange.listing("found")]
  if len(set(found)) > 1:
    raise DataError(f"the processes of this job disagree on whether the dataset is current ({found.count('current')} "
                    f"found it current, {found.count('build')} must build it): it or its sources changed while they "
                    f"read them (another job building the same data.dir?); run again once that build is done")


def agreed_current(options: BuildOptions) -> None:
  """The processes that all found their dataset current (`agree_to_build`) meet once more, and process 0 deletes
  their names from the exchange."""
  Phases("", options).run("agreed", lambda: None)
  if options.process_index == 0:
    options.exchange.clear()


def file_sizes(corpus: Corpus) -> dict[str, int]:
  return {rel: storage.file_size(storage.join(corpus.root, rel)) or 0 for rel in corpus.files}


def task_bytes(sizes: dict[str, int]) -> int:
  """About MIN_TASKS tasks, none over TASK_BYTES nor (unless TASK_BYTES is smaller) under MIN_TASK_BYTES; from the
  corpus's file sizes alone, so the shards are the same for any worker or process count."""
  return min(TASK_BYTES, max(MIN_TASK_BYTES, sum(sizes.values()) // MIN_TASKS))


def plan_parts(corpus: Corpus, sizes: dict[str, int]) -> list[tuple[str, tuple[int, int]]]:
  """The reads that cut the corpus's large files into spans (`sources.span_parts`), as (file, part)."""
  limit = task_bytes(sizes)
  return [(rel, part) for rel in corpus.files for part in span_parts(rel, sizes[rel], limit)]


def _read_part(index: int, root: str, rel: str, part: tuple[int, int], limit: int, count_lines: bool = True):
  return index, read_span_part(root, rel, part, limit, count_lines=count_lines)


def tasks_from_parts(corpus: Corpus, sizes: dict[str, int], found: list) -> list[tuple[Span, ...]]:
  """The tasks: runs of consecutive spans of about `task_bytes` each (a task ends once it holds three quarters of
  that: a large JSONL file's spans, cut at the first line start of each chunk, are within a line of the size either
  side, and one a few bytes short would have made a task of two), the spans from what each of `plan_parts` found
  (`found`, in its order)."""
  limit = task_bytes(sizes)
  by_file: dict[str, list] = {}
  for (rel, _), result in zip(plan_parts(corpus, sizes), found, strict=True):
    by_file.setdefault(rel, []).append(result)
  tasks, current, size = [], [], 0
  for rel in corpus.files:
    for span in spans_from_parts(rel, sizes[rel], by_file.get(rel, [])):
      current.append(span)
      size += span.size
      if size >= limit - limit // 4:
        tasks.append(tuple(current))
        current, size = [], 0
  return tasks + [tuple(current)] if current else tasks


def plan_tasks(corpus: Corpus) -> list[tuple[Span, ...]]:
  """The build's tasks, the parts of the plan read one after the other (a build reads them in parallel)."""
  sizes = file_sizes(corpus)
  limit = task_bytes(sizes)
  return tasks_from_parts(corpus, sizes, [read_span_part(corpus.root, rel, part, limit)
                                          for rel, part in plan_parts(corpus, sizes)])


def _documents(corpus: Corpus, spans, stats: ReadStats):
  for span in spans:
    for identity, text in read_documents(corpus.root, span.rel, text_field=corpus.text_field,
                                         max_bad_lines=corpus.max_bad_lines, stats=stats, span=span):
      yield key_digest(split_key(span.rel, identity, corpus.split_by)), identity, text


class Sample:
  """The documents with the largest (key, order) whose non-empty lines reach `budget` and a quarter more (room for
  the held-out ones `texts` leaves out): a uniform sample, mergeable across tasks and processes (the global sample
  is inside the union of the parts' samples). A document's key is its key digest; where that is not known yet (a
  span the plan did not number) it is a digest of the document's place (`place_key`), and the document's digest
  is a locator (task, span, line within the span) until `resolve` makes it one."""

  def __init__(self, budget: int, floor: tuple | None = None):
    self.budget, self.keep, self.heap, self.lines = budget, budget + budget // 4, [], 0
    self.floor = floor  # (key, order) below which no document reaches the whole build's sample (`floor_now`)

  def offer(self, key: int, order: tuple[int, int], lines: list[str] | str, digest=None) -> None:
    if self.budget <= 0 or (self.floor is not None and (key, order) < self.floor):
      return
    if self.heap and self.lines >= self.keep and (key, order) < self.heap[0][:2]:
      return
    if isinstance(lines, str):
      lines = [line for line in lines.split("\n") if line.strip()]
    heapq.heappush(self.heap, (key, tuple(order), lines, digest))
    self.lines += len(lines)
    while self.lines - len(self.heap[0][2]) >= self.keep:
      self.lines -= len(heapq.heappop(self.heap)[2])

  def floor_now(self) -> tuple | None:
    """The (key, order) below which an offered document is refused now, once the sample holds its lines (else
    None): the heap's least. It only rises as documents come, and a sample merged from more documents refuses at
    least as much, so a task that drops the documents under a floor of the process's merged sample so far
    (`_scan_task`) changes no sample, and does not split, keep and send back text that cannot be in it (a task
    whose lines are longer than its text divided by `keep` sent all of it)."""
    return self.heap[0][:2] if self.heap and self.lines >= self.keep else None

  def resolve(self, digest_of: Callable[[int, int, int], int]) -> None:
    """Each locator made its document's digest, `digest_of(task, span, line)` (the heap's order is the keys')."""
    self.heap = [(key, order, lines, digest_of(*digest) if isinstance(digest, (list, tuple)) else digest)
                 for key, order, lines, digest in self.heap]

  def texts(self, heldout: HeldOut) -> list[str]:
    """The sample's training documents (not held out) until `budget` lines."""
    out, lines = [], 0
    for key, _, doc_lines, digest in sorted(self.heap, reverse=True):
      if lines >= self.budget:
        break
      if heldout(key if digest is None else digest):
        continue
      out.append("\n".join(doc_lines))
      lines += len(doc_lines)
    return out


def place_key(span: Span, line: int) -> int:
  """The sample key of the document on line `line` of `span` (counted from the span's start), a span whose first
  line's number is not known while it is scanned: a digest of its place, as uniform as its key digest."""
  return key_digest(f"{span.rel}:{span.start}+{line}")


def _scan_task(corpus: Corpus, index: int, spans, staging: str, sample_lines: int, floor_file: str | None = None):
  """A task's (key digest, bytes) table and tokenizer-sample candidates, and each span's (lines gone through,
  documents). The documents of a span whose first line's number is not known (Span.first None) have their line
  numbers within the span in the digest column, made digests by `_number_documents` once every span's lines are
  counted, and are sampled by their place (`Sample`). `floor_file`: the process's sample floor so far, if written
  (`Sample.floor_now`): documents under it are not candidates."""
  stats, sample = ReadStats(), Sample(sample_lines, _read_floor(floor_file) if sample_lines > 0 else None)
  digests, sizes, counted = [], [], []
  for k, span in enumerate(spans):
    lines, documents = stats.lines, len(digests)
    for identity, text in read_documents(corpus.root, span.rel, text_field=corpus.text_field,
                                         max_bad_lines=corpus.max_bad_lines, stats=stats, span=span):
      if span.first is None:
        line = stats.lines - lines  # the document's line, counted from the span's start (read up to it)
        digests.append(line)
        if sample.budget > 0:  # (a tokenizer given: no sample, no place digest per document)
          sample.offer(place_key(span, line), (index, len(digests) - 1), text, (index, k, line))
      else:
        digests.append(key_digest(split_key(span.rel, identity, corpus.split_by)))
        sample.offer(digests[-1], (index, len(digests) - 1), text)
      sizes.append(len(text) if text.isascii() else len(text.encode("utf-8")))
    counted.append((stats.lines - lines, len(digests) - documents))
  write_digest_table(os.path.join(staging, "scan", f"{index:05d}.digests"), digests, sizes)
  return index, stats, sample.heap, counted


def _scanned(staging: str, indices) -> dict[int, dict]:
  """The scan results ({"stats", "heap", "counted"}) of the tasks among `indices` that an interrupted build kept
  (`scan/<task>.json`, written once the task's digest table was whole)."""
  return {i: _read_json(_scan_result(staging, i)) for i in indices if os.path.isfile(_scan_result(staging, i))}


def _scan_result(staging: str, index: int) -> str:
  return os.path.join(staging, "scan", f"{index:05d}.json")


def _read_floor(path: str | None) -> tuple | None:
  """The sample floor in `path` ([key, [task, document]]), or None where none was given or written yet."""
  if path is None:
    return None
  try:
    with open(path, encoding="utf-8") as f:
      key, order = json.load(f)
  except FileNotFoundError:
    return None
  return key, tuple(order)


def number_spans(tasks: list[tuple[Span, ...]], counted: list) -> list[list[int]]:
  """Each task's spans' first record numbers: a span's own, or (None: a JSONL span cut without counting the lines
  before it) the first number of the span before it in its file plus the lines that span's scan went through
  (`counted`, per task, per span: (lines, documents))."""
  firsts, previous = [], None  # the span before: (file, first number, lines)
  for spans, counts in zip(tasks, counted, strict=True):
    row = []
    for span, (lines, _) in zip(spans, counts, strict=True):
      first = span.first
      if first is None:  # never a file's first span (its first line is line 1)
        rel, before, went = previous
        assert rel == span.rel, (rel, span.rel)
        first = before + went
      row.append(first)
      previous = (span.rel, first, lines)
    firsts.append(row)
  return firsts


def line_digest(rel: str, first: int, line: int, split_by: str) -> int:
  """The key digest of the document on line `line` (counted from 1 at the span's start) of a JSONL span of `rel`
  whose first line is line `first` of the file: its identity `rel:LINE` as the file's reader names it."""
  return key_digest(split_key(rel, f"{rel}:{first - 1 + line}", split_by))


def _number_documents(path: str, runs: list[tuple[int, int, str, int]], split_by: str) -> None:
  """Rows [start, stop) of the digest table at `path`, documents of the span of `rel` whose first line is `first`,
  hold their line numbers within that span (`_scan_task`): replaced by their key digests, for each run."""
  table = np.memmap(path, DIGEST_TABLE, "r+")
  for start, stop, rel, first in runs:
    table["digest"][start:stop] = np.fromiter(
        (line_digest(rel, first, line, split_by) for line in table["digest"][start:stop].tolist()), np.uint64,
        stop - start)
  table.flush()
  del table


@functools.lru_cache(maxsize=1)
def _tokenizer(path: str, mtime_ns: int) -> Tokenizer:
  """Loaded once per worker (tens of ms for a large vocabulary, against a task of about 1 MB); `mtime_ns` tells
  a rebuilt model at the same path apart."""
  del mtime_ns
  return Tokenizer(path)


def _tokenize_task(corpus: Corpus, index: int, spans, staging: str, heldout: HeldOut, tokenizer_path: str):
  tokenizer = _tokenizer(tokenizer_path, os.stat(tokenizer_path).st_mtime_ns)
  writers = {split: ShardWriter(os.path.join(staging, split), f"{index:05d}", tokenizer.vocab_size)
             for split in SPLITS}
  pending, size = [], 0

  def flush():
    packed, lengths = tokenizer.encode_packed([text for _, _, text in pending])
    splits = {s for s, _, _ in pending}
    if len(splits) == 1:  # the usual batch: one split
      writers[splits.pop()].add_packed([doc[1:] for doc in pending], packed, lengths)
      return
    starts = np.cumsum(lengths) - lengths
    for split in SPLITS:
      chosen = [k for k, (s, _, _) in enumerate(pending) if s == split]
      writers[split].add([pending[k][1:] for k in chosen],
                         [packed[starts[k]:starts[k] + lengths[k]] for k in chosen])

  stats = ReadStats()
  for digest, identity, text in _documents(corpus, spans, stats):
    pending.append(("heldout" if heldout(digest) else "train", identity, text))
    size += len(text)
    if size >= ENCODE_BATCH_BYTES:
      flush()
      pending, size = [], 0
  flush()
  result = {split: (writer.close(), writer.counts) for split, writer in writers.items()}
  # the task's mark, written once its shards are whole: a resumed build keeps the task (_tokenised)
  _write_json(os.path.join(staging, TOKENISED, f"{index:05d}.json"),
              {**{split: entry for split, (entry, _) in result.items()}, READ: dataclasses.asdict(stats)})
  return index, result, stats


def _tokenised(staging: str, index: int, vocab_size: int):
  """A task an interrupted build tokenised (its mark and its shards are there): its shards' entries and token
  counts, read back from the shards, and what its read skipped; None when the task must run."""
  try:
    entries = _read_json(os.path.join(staging, TOKENISED, f"{index:05d}.json"))
  except (OSError, ValueError):
    return None
  if READ not in entries:  # an older version's mark: what its read skipped unknown (an evaluation set counts it)
    return None
  dtype = token_dtype(vocab_size)
  result = {}
  for split in SPLITS:
    entry = entries.get(split)
    counts = np.zeros((vocab_size,), np.int64)
    if entry is not None:
      path = os.path.join(staging, entry["name"] + ".tokens")
      if not os.path.isfile(path) or os.path.getsize(path) != entry["num_tokens"] * dtype.itemsize:
        return None
      counts += np.bincount(np.fromfile(path, dtype), minlength=vocab_size)
    result[split] = (entry, counts)
  return result, ReadStats(**entries[READ])


def build_key(corpus: Corpus, sizes: dict[str, int], *, vocab_size: int | None, tokenizer: str | None,
              sample_lines: int) -> str:
  """What an interrupted build's staging folder must match to be resumed: the corpus's settings, its files' sizes
  and versions, the task size (with the files, what the plan follows from), the tokenizer given (its digest) or the
  one to train (vocabulary and sample)."""
  files = hashlib.sha256()
  for rel in corpus.files:
    files.update(json.dumps([rel, storage.stamp(storage.join(corpus.root, rel))]).encode())
  settings = dataclasses.asdict(dataclasses.replace(corpus, files=(), heldout_keys=()))
  settings["heldout_keys"] = hashlib.sha256("\0".join(corpus.heldout_keys).encode()).hexdigest()
  return hashlib.sha256(json.dumps({
      "format": 2, "corpus": settings, "files": files.hexdigest(), "task_bytes": task_bytes(sizes),
      "tokenizer": storage.file_sha256(tokenizer) if tokenizer else None,
      "vocab_size": None if tokenizer else vocab_size, "sample_lines": None if tokenizer else sample_lines},
      sort_keys=True, default=str).encode()).hexdigest()


def _exit_with_parent() -> None:
  """A build worker's start: it exits when the build's process does. A worker waits on its pool's queue, whose
  writing end every worker holds too, so a build killed outright (SIGKILL, the OOM killer) left its workers idle
  for good, each holding its tokenizer and the build's stdout and stderr (a caller reading them never saw their end)."""
  parent = multiprocessing.parent_process()
  if parent is None:
    return

  def watch():
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _Workers:
  """Up to `count` spawned processes, started at the first phase that needs them and kept for the next (each
  start imports numpy and sentencepiece); with one worker, or one job, jobs run in this process."""

  def __init__(self, count: int):
    self.count, self.pool = count, None

  def run(self, fn, jobs: list[tuple]):
    """fn(*job) for every job; results as they come."""
    if self.count <= 1 or len(jobs) <= 1:
      for job in jobs:
        yield fn(*job)
      return
    if self.pool is None:
      self.pool = concurrent.futures.ProcessPoolExecutor(
          min(self.count, len(jobs)), mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent)
    futures = {self.pool.submit(fn, *job) for job in jobs}
    try:
      for future in concurrent.futures.as_completed(futures):
        futures.discard(future)  # a future holds its result: a scan's sample would stay for the whole phase
        yield future.result()
    finally:
      for future in futures:
        future.cancel()

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)


class Phases:
  """Runs each phase on every process and meets at a barrier; an error on any process is raised on all of them
  after that barrier (process 0's message where it failed, else the first failing process's). The errors are
  files `error-<process>` in the shared staging folder, or `errors/<process>` in the options' exchange."""

  def __init__(self, staging: str, options: BuildOptions):
    self.staging, self.options = staging, options

  def _report(self, detail: str) -> None:
    p, exchange = self.options.process_index, self.options.exchange
    if exchange is not None:
      exchange.write_text(f"errors/{p}", detail)
    elif os.path.isdir(self.staging):
      with open(os.path.join(self.staging, f"error-{p}"), "w") as f:
        f.write(detail)

  def _reported(self) -> dict[int, str]:
    if self.options.exchange is not None:
      exchange = self.options.exchange  # a line gone once listed: process 0's own, its exchange cleared as it stopped
      return {int(rel.split("/")[1]): exchange.read_text(rel) or f"its line is in process {rel.split('/')[1]}'s log"
              for rel in exchange.listing("errors")}
    found = {}
    for p in range(self.options.process_count):
      path = os.path.join(self.staging, f"error-{p}")
      if os.path.isfile(path):
        with open(path) as f:
          found[p] = f.read()
    return found

  def run(self, name: str, fn: Callable[[], None]) -> None:
    error = None
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
      if self.options.process_count > 1:
        try:
          self._report(str(e) if isinstance(e, DataError) else "".join(traceback.format_exception_only(e)).strip())
        except Exception:  # pylint: disable=broad-except (the medium failed too: the others time out at the barrier)
          pass
    if self.options.process_count > 1:
      self.options.barrier(f"diffgemma_build_{name}")
    if error is not None:
      raise error
    if self.options.process_count > 1:
      for p, detail in sorted(self._reported().items()):
        raise DataError(f"the dataset build failed on process {p}: {detail}")


def build_store(output_dir: str, corpus: Corpus, *, vocab_size: int | None, tokenizer: str | None,
                manifest: dict, options: BuildOptions = BuildOptions()) -> dict:
  """Builds `corpus` into `output_dir` (replaced atomically at the end) and returns its manifest; `manifest`: the
  recipe's fields (recipe, source, notes), completed here with the store's."""
  start = time.time()
  if corpus.evaluation_only and not tokenizer:
    raise DataError(f"{corpus.name}: an evaluation set is read with the tokenizer of the model it evaluates; give "
                    f"that tokenizer (data.tokenizer; a recipe command's --tokenizer)")
  p, count, exchange = options.process_index, options.process_count, options.exchange
  if count > 1 and options.barrier is None:
    raise DataError("a multi-process build needs a barrier")
  own = exchange is not None and count > 1  # a staging folder per process, files passed through the exchange
  staging = output_dir.rstrip("/") + ".partial"
  if own:
    agree_to_build(options, current=False)
  workers = _Workers(options.workers or os.cpu_count() or 1)
  sizes = file_sizes(corpus)
  limit, parts = task_bytes(sizes), plan_parts(corpus, sizes)
  tasks: list[tuple[Span, ...]] = []  # the plan's (`planned`), then each process's share of them
  mine: list[tuple[int, tuple[Span, ...]]] = []
  task_size: dict[int, int] = {}
  job_corpus = dataclasses.replace(corpus, files=(), heldout_keys=())  # what a task needs, pickled per task
  phases = Phases(staging, options)
  progress = _Progress(output_dir, enabled=p == 0, shared=count > 1)
  # resumable where the processes share the staging folder (one process, or a shared filesystem)
  key = None if own else build_key(corpus, sizes, vocab_size=vocab_size, tokenizer=tokenizer,
                                   sample_lines=options.sample_lines)
  decided = lambda: os.path.isfile(os.path.join(staging, "decision.json"))  # noqa: E731
  plan_file = os.path.join(staging, PLAN_FILE)
  resumed = False
  # A build with a scan does not count a large JSONL file's lines in its plan, which would read the whole corpus
  # once more: the plan finds each chunk's first line start (a read of a line or so), the scan counts each span's
  # lines as it reads them, and process 0 numbers the spans and makes the documents' digests from those counts
  # (`number_spans`, `_number_documents`) before it decides. An evaluation set is not scanned (its files are read
  # once, by the tokenise phase): its plan counts lines.
  count_lines = corpus.evaluation_only

  def begin():
    nonlocal resumed
    resumed = p == 0 and not own and _staged_key(staging) == key
    if (p == 0 or own) and not resumed:
      shutil.rmtree(staging, ignore_errors=True)
      for folder in ("scan", TOKENISED, "plan"):
        os.makedirs(os.path.join(staging, folder))
      if key is not None:
        _write_json(os.path.join(staging, BUILD_FILE), {"key": key})
    if resumed:
      _delete_entries(staging, lambda name: name.startswith("error-"))  # the interrupted build's (Phases)
    progress.say(f"building a dataset of {corpus.name} in {output_dir}: {len(corpus.files)} file(s), "
                 f"{sum(sizes.values()) / 1e6:.1f} MB on {options.workers or os.cpu_count() or 1} worker(s) per "
                 "process" + ("" if tokenizer else ", a tokenizer trained on a sample first"))

  def plan():
    # Each process reads its share of the parts (the large files' line ends and row groups), in its workers: a
    # corpus's plan was read by every process, one file after the other (the whole of every JSONL file)
    if os.path.isfile(plan_file):  # a resumed build's
      return
    jobs = [(j, corpus.root, rel, part, limit, count_lines) for j, (rel, part) in enumerate(parts) if j % count == p]
    progress.phase("plan", {job[0]: job[3][1] - job[3][0] for job in jobs}, unit="part(s)")
    found = {}
    for j, result in workers.run(_read_part, jobs):
      progress.done(j)
      found[j] = result
    _write_json(os.path.join(staging, "plan", f"{p}.json"), found)
    if own:
      exchange.put([(os.path.join(staging, "plan", f"{p}.json"), f"plan/{p}.json")])

  def planned():
    """Every process's plan parts, as the build's tasks; process 0 keeps them (a resumed build reads them back)."""
    nonlocal tasks, mine, task_size
    if os.path.isfile(plan_file):
      tasks = [tuple(Span(*span) for span in spans) for spans in _read_json(plan_file)]
    else:
      if own:
        exchange.get([f"plan/{q}.json" for q in range(count) if q != p], staging)
      found = {}
      for q in range(count):
        found.update({int(j): result for j, result in _read_json(os.path.join(staging, "plan", f"{q}.json")).items()})
      tasks = tasks_from_parts(corpus, sizes, [found[j] for j in range(len(parts))])
      if p == 0 and not own:
        _write_json(plan_file, [[dataclasses.astuple(span) for span in spans] for spans in tasks])
    mine = [(i, spans) for i, spans in enumerate(tasks) if i % count == p]
    task_size = {i: sum(span.size for span in spans) for i, spans in mine}
    if resumed:
      done = sum(name.endswith(".json") for name in os.listdir(os.path.join(staging, TOKENISED)))
      progress.say(f"resuming the interrupted build in {staging}: " + (
          f"its held-out split and tokenizer kept, {done} of {len(tasks)} task(s) already tokenised" if decided()
          else f"it stopped in its scan: {sum(os.path.isfile(_scan_result(staging, i)) for i in range(len(tasks)))} "
          f"of {len(tasks)} task(s) already scanned"))

  def scan():
    # A resumed build that had made its decision; an evaluation set, whose every document is held out with a given
    # tokenizer: nothing to decide, so its files are read once, by the tokenise phase (a set in a bucket: one download)
    if decided() or corpus.evaluation_only:
      return
    stats, sample = ReadStats(), Sample(options.sample_lines if not tokenizer else 0)
    floor_file, floor = os.path.join(staging, "scan", f"sample-floor-{p}.json"), None
    counted = {}

    def take(index: int, task_stats: ReadStats, heap, spans_read) -> None:
      nonlocal floor
      counted[index] = spans_read
      stats.add(task_stats)
      check_bad_lines(stats, corpus.max_bad_lines)
      for candidate in heap:
        sample.offer(*candidate)
      if sample.floor_now() != floor:  # the tasks that start from now on send back only what can be sampled
        floor = sample.floor_now()
        _write_json(floor_file, floor)

    scanned_before = _scanned(staging, [i for i, _ in mine]) if key is not None else {}
    for index, entry in scanned_before.items():  # a resumed build's tasks that ended before it stopped
      take(index, ReadStats(**entry["stats"]), entry["heap"], entry["counted"])
    jobs = [(job_corpus, i, spans, staging, sample.budget, floor_file) for i, spans in mine
            if i not in scanned_before]
    progress.phase("scan", {job[1]: task_size[job[1]] for job in jobs})
    for index, task_stats, heap, spans_read in workers.run(_scan_task, jobs):
      progress.done(index)
      if key is not None:  # kept for a resume (its digest table was whole before the task returned)
        _write_json(_scan_result(staging, index),
                    {"stats": dataclasses.asdict(task_stats), "heap": heap, "counted": spans_read})
      take(index, task_stats, heap, spans_read)
    _write_json(os.path.join(staging, "scan", f"process-{p}.json"),
                {"stats": dataclasses.asdict(stats), "sample": sample.heap, "counted": counted})
    if own and p != 0:  # this process's tables as one file (thousands of tasks: one request, not thousands)
      bundle = os.path.join(staging, "scan", f"process-{p}.digests")
      with open(bundle, "wb") as out:
        for i, _ in mine:
          with open(os.path.join(staging, "scan", f"{i:05d}.digests"), "rb") as f:
            shutil.copyfileobj(f, out)
      exchange.put([(os.path.join(staging, "scan", name), f"scan/{name}")
                    for name in (f"process-{p}.json", f"process-{p}.digests")])

  def decide():
    if p != 0 or decided():
      return
    firsts = None
    if corpus.evaluation_only:  # every file's documents held out; what the read skipped is counted as it tokenises
      heldout, stats = HeldOut(digests=frozenset(key_digest(key) for key in corpus.heldout_keys)), ReadStats()
    else:
      heldout, stats, sample, firsts = scanned()
    if tokenizer:
      shutil.copyfile(tokenizer, os.path.join(staging, "tokenizer.model"))
    else:
      texts = sample.texts(heldout)
      progress.note(f"training the tokenizer ({vocab_size} pieces) on {len(texts):,} sampled document(s)")
      train_tokenizer(texts, os.path.join(staging, "tokenizer"), vocab_size, max_sentences=options.sample_lines)
    _write_json(os.path.join(staging, "decision.json"),
                {"heldout": heldout.to_json(), "stats": dataclasses.asdict(stats), "firsts": firsts})
    if own:
      exchange.put([(os.path.join(staging, name), name) for name in ("decision.json", "tokenizer.model")])

  def scanned() -> tuple[HeldOut, ReadStats, Sample, list | None]:
    """The decision from the scan's tables and samples (every process's): the held-out split, what the reads
    skipped, the tokenizer sample, and the tasks' spans' first record numbers where the plan did not count them
    (else None)."""
    if own:
      exchange.get([f"scan/process-{q}.{kind}" for q in range(1, count) for kind in ("json", "digests")], staging)
    stats, sample = ReadStats(), Sample(options.sample_lines if not tokenizer else 0)
    counted = {}
    for q in range(count):
      part = _read_json(os.path.join(staging, "scan", f"process-{q}.json"))
      stats.add(ReadStats(**part["stats"]))
      for key, order, lines, digest in part["sample"]:
        sample.offer(key, tuple(order), lines, digest)
      counted.update({int(i): spans for i, spans in part["counted"].items()})
    check_read(stats)
    own_tables = [i for i, _ in mine] if own else range(len(tasks))  # the others' tables: one file per process
    tables = [os.path.join(staging, "scan", f"{i:05d}.digests") for i in own_tables] + \
        [os.path.join(staging, "scan", f"process-{q}.digests") for q in range(1, count) if own]
    firsts = None
    if any(span.first is None for spans in tasks for span in spans):
      firsts = number_spans(tasks, [counted[i] for i in range(len(tasks))])
      list(workers.run(_number_documents, number_jobs(firsts, counted)))
      sample.resolve(lambda task, k, line: line_digest(tasks[task][k].rel, firsts[task][k], line, corpus.split_by))
    if corpus.heldout_keys:
      heldout = HeldOut(digests=frozenset(key_digest(key) for key in corpus.heldout_keys))
      held, total = keyed_bytes(tables, heldout.digests)
    else:
      threshold, held, total = heldout_threshold(tables, corpus.heldout_fraction)
      heldout = HeldOut(threshold)
    if held == 0 or held == total:
      raise DataError(f"{corpus.name}: the {'heldout' if held == 0 else 'train'} split is empty; the corpus is "
                      f"too small to split")
    return heldout, stats, sample, firsts

  def number_jobs(firsts: list[list[int]], counted: dict) -> list[tuple]:
    """`_number_documents`' jobs: per task with a span the plan did not number, its table (process 0's own, or
    where it lies in its process's bundle) and the rows of those spans."""
    jobs, offsets = [], {}  # rows of each bundle before the task
    for i, spans in enumerate(tasks):
      q = i % count
      if own and q != 0:
        path, row = os.path.join(staging, "scan", f"process-{q}.digests"), offsets.get(q, 0)
      else:
        path, row = os.path.join(staging, "scan", f"{i:05d}.digests"), 0
      runs = []
      for span, first, (_, documents) in zip(spans, firsts[i], counted[i]):
        if span.first is None and documents:
          runs.append((row, row + documents, span.rel, first))
        row += documents
      offsets[q] = row
      if runs:
        jobs.append((path, runs, corpus.split_by))
    return jobs

  def tokenize():
    if own and p != 0:
      exchange.get(["decision.json", "tokenizer.model"], staging)
    decision = _read_json(os.path.join(staging, "decision.json"))
    tokenizer_path = os.path.join(staging, "tokenizer.model")
    vocab = Tokenizer(tokenizer_path).vocab_size
    firsts = decision.get("firsts")  # the spans' first line numbers, where the plan did not count them
    numbered = mine if not firsts else [
        (i, tuple(dataclasses.replace(span, first=first) for span, first in zip(spans, firsts[i], strict=True)))
        for i, spans in mine]
    counts = {split: np.zeros((vocab,), np.int64) for split in SPLITS}
    shards = {}
    heldout = HeldOut.from_json(decision["heldout"])
    stats = ReadStats()  # an evaluation set's (its only read); the scan's otherwise

    def add(index, result, task_stats):
      shards[index] = {split: entry for split, (entry, _) in result.items()}
      for split, (_, task_counts) in result.items():
        counts[split] += task_counts
      stats.add(task_stats)
      if corpus.evaluation_only:
        check_bad_lines(stats, corpus.max_bad_lines)

    jobs = []
    for i, spans in numbered:
      kept = _tokenised(staging, i, vocab) if key is not None else None
      if kept is None:
        jobs.append((job_corpus, i, spans, staging, heldout, tokenizer_path))
      else:
        add(i, *kept)
    progress.phase("tokenise", {job[1]: task_size[job[1]] for job in jobs})
    for index, result, task_stats in workers.run(_tokenize_task, jobs):
      progress.done(index)
      add(index, result, task_stats)
    for split in SPLITS:
      counts[split].tofile(os.path.join(staging, f"counts-{p}.{split}"))
    _write_json(os.path.join(staging, f"shards-{p}.json"), {"shards": shards, READ: dataclasses.asdict(stats)})
    if own and p != 0:
      exchange.put([(os.path.join(staging, name), name)
                    for name in [f"counts-{p}.{split}" for split in SPLITS] + [f"shards-{p}.json"]])

  def finish():
    if p != 0:
      if own:  # this process's shards are its output; process 0 publishes the rest
        _delete_entries(staging, lambda name: name not in SPLITS)
        shutil.rmtree(output_dir, ignore_errors=True)
        os.replace(staging, output_dir)
      return
    if own:
      exchange.get([name for q in range(1, count)
                    for name in [f"counts-{q}.{split}" for split in SPLITS] + [f"shards-{q}.json"]], staging)
    decision = _read_json(os.path.join(staging, "decision.json"))
    tok = Tokenizer(os.path.join(staging, "tokenizer.model"))
    per_task: dict[int, dict] = {}
    stats = ReadStats(**decision["stats"])
    for q in range(count):
      part = _read_json(os.path.join(staging, f"shards-{q}.json"))
      per_task.update({int(i): entry for i, entry in part["shards"].items()})
      if corpus.evaluation_only:  # read once, by the tokenise phase
        stats.add(ReadStats(**part[READ]))
    if corpus.evaluation_only:
      check_read(stats)
    store = {"format": 1, "dtype": token_dtype(tok.vocab_size).str, "splits": {}}
    digest = hashlib.sha256()
    for split in SPLITS:
      entries = [per_task[i][split] for i in range(len(tasks)) if per_task[i][split]]
      counts = sum(np.fromfile(os.path.join(staging, f"counts-{q}.{split}"), np.int64) for q in range(count))
      counts.astype("<i8").tofile(os.path.join(staging, f"{split}.unigram"))
      store["splits"][split] = {"shards": entries, "unigram_counts": f"{split}.unigram"}
      for entry in entries:
        digest.update(f"{split}\0{entry['sha256']}\0".encode())
    splits = {split: {key: sum(e[field] for e in store["splits"][split]["shards"])
                      for key, field in (("documents", "num_documents"), ("bytes", "bytes"),
                                         ("tokens", "num_tokens"))} for split in SPLITS}
    full = dict(manifest, kind="text", vocab_size=tok.vocab_size, splits=splits, store=store,
                sha256=digest.hexdigest(), special_ids=special_ids(tok),
                skipped_empty=stats.empty, skipped_non_utf8=len(stats.non_utf8_files),
                skipped_bad_lines=len(stats.bad_lines), text_field=corpus.text_field,
                split_by=corpus.split_by, heldout_fraction=corpus.heldout_fraction,
                **({"evaluation_only": True} if corpus.evaluation_only else {}),
                tokenizer_sample_lines=None if tokenizer else options.sample_lines,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                build_seconds=round(time.time() - start, 2))
    _delete_entries(staging, lambda name: name in ("scan", "plan", PLAN_FILE, "decision.json", BUILD_FILE,
                                                   TOKENISED) or name.startswith(("counts-", "shards-", "error-")))
    _write_json(os.path.join(staging, "manifest.json"), full)
    if own:
      exchange.put([(os.path.join(staging, "manifest.json"), "manifest.json")])
    # The manifest reaches the target only with everything else: a killed build is rebuilt.
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    progress.say(f"built {output_dir} in {full['build_seconds']:.0f} s: {splits['train']['tokens']:,} train and "
         f"{splits['heldout']['tokens']:,} held-out tokens")

  def check_read(stats: ReadStats) -> None:
    """Process 0, once every file was read: too many bad lines, or no document, fail the build; the rest is
    reported."""
    check_bad_lines(stats, corpus.max_bad_lines)
    _report(corpus, stats)
    if not stats.documents:
      raise DataError(f"{corpus.name} holds no non-empty documents ({len(corpus.files)} file(s) found, "
                      f"{len(stats.non_utf8_files)} not UTF-8, {stats.empty} empty)")

  try:
    for name, fn in (("begin", begin), ("plan", plan), ("scan", lambda: (planned(), scan())), ("decide", decide),
                     ("tokenize", tokenize), ("finish", finish)):
      phases.run(name, fn)
  except BaseException as e:
    workers.close()  # no task still writes into the staging folder
    # A bad input leaves nothing behind (the target, if any, is untouched); an interruption leaves what a rerun
    # resumes (BUILD_FILE), where the processes share the staging folder.
    if (p == 0 or own) and (key is None or isinstance(e, DataError)):
      shutil.rmtree(staging, ignore_errors=True)
    elif p == 0 and os.path.isdir(staging):
      print(f"the build of {output_dir} stopped ({type(e).__name__}); its staging folder {staging} is kept: the same "
            "build again resumes it", file=sys.stderr, flush=True)
    raise
  finally:
    workers.close()
  if own and p != 0:
    return json.loads(exchange.read_text("manifest.json"))
  return _read_json(os.path.join(output_dir, "manifest.json"))


class _Progress:
  """Process 0's lines on stderr: `say` always; `note` and a phase's task lines (`phase`, then `done` per task) only
  when PROGRESS_EVERY_S has passed since the last line, so a build of a few seconds prints its first and last line
  alone and a long one a line every half minute or so, never more often. `shared`: a multi-process build, whose
  process 0 counts its own tasks."""

  def __init__(self, output_dir: str, *, enabled: bool, shared: bool = False, every_s: float | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.output_dir, self.enabled, self.shared, self.clock = output_dir, enabled, shared, clock
    self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
    self.last = clock()
    self.name, self.sizes, self.finished, self.bytes, self.start = "", {}, 0, 0, self.last
    self.unit = "task(s)"

  def say(self, text: str) -> None:
    if self.enabled:
      print(text, file=sys.stderr, flush=True)
      self.last = self.clock()

  def note(self, text: str) -> None:
    if self.clock() - self.last >= self.every_s:
      self.say(f"building {self.output_dir}: {text}")

  def phase(self, name: str, sizes: dict[int, int], unit: str = "task(s)") -> None:
    """A phase over the tasks (or other `unit`) `sizes` ({index: bytes}) begins."""
    self.name, self.sizes, self.finished, self.bytes, self.start = name, sizes, 0, 0, self.clock()
    self.unit = unit

  def done(self, index: int) -> None:
    self.finished += 1
    self.bytes += self.sizes[index]
    now = self.clock()
    if now - self.last < self.every_s:
      return
    total = sum(self.sizes.values())
    rate = self.bytes / max(now - self.start, 1e-9)
    left = f", {(total - self.bytes) / rate / 60:.1f} min left" if rate > 0 else ""
    whose = " of this process" if self.shared else ""
    self.say(f"building {self.output_dir}: {self.name} {self.finished}/{len(self.sizes)} {self.unit}{whose}, "
             f"{self.bytes / 1e6:.1f} of {total / 1e6:.1f} MB, {rate / 1e6:.2f} MB/s{left}")


def special_ids(tok: Tokenizer) -> dict[str, int]:
  return {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id, "mask": tok.mask_id,
          "start_of_turn": tok.start_of_turn_id, "end_of_turn": tok.end_of_turn_id}


def _report(corpus: Corpus, stats: ReadStats) -> None:
  for line in stats.bad_lines[:MAX_LISTED]:
    print(f"skipped bad line: {line}", file=sys.stderr)
  skipped = stats.non_utf8_files
  if skipped:
    listed = ", ".join(skipped[:MAX_LISTED]) + (f" and {len(skipped) - MAX_LISTED} more"
                                                 if len(skipped) > MAX_LISTED else "")
    print(f"skipped {len(skipped)} non-UTF-8 file(s) in {corpus.name}: {listed}", file=sys.stderr)


def _delete_entries(folder: str, which: Callable[[str], bool]) -> None:
  """Deletes the files and folders of `folder` whose names `which` picks."""
  for name in os.listdir(folder):
    if which(name):
      path = os.path.join(folder, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _staged_key(staging: str) -> str | None:
  """The key of the interrupted build whose staging folder this is (build_key), or None."""
  try:
    return _read_json(os.path.join(staging, BUILD_FILE))["key"]
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)

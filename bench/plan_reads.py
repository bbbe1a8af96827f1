"""A build's task plan of a JSONL corpus in a bucket: each process's reads and seconds, the plan's parts spread over the
processes and their workers against the serial pass every process made before.

    python bench/plan_reads.py [--json] [--size_mb 256] [--processes 4] [--workers 2] [--url s3://bucket/folder]

A build cuts each large JSONL file into spans at line starts, each knowing its first line number, before any worker
starts (data/build.py's plan). Before, every process of a build did it alone, reading the whole of every file in one
pass, one file after the other (the baseline here: that pass, as data/sources.py made it, through the buffered
stream `storage.open_binary`). Now the cuts are found by parts, one ranged read per span-sized chunk
(`sources.span_parts`), part j read by process j mod P in its workers. The corpus is real source text
(bench/data_pipeline.py's `make_corpus`, 64 MB JSONL shards) in a local S3-compatible server (moto's, in a process of
its own) or `--url`, and the same files on local disk; bytes are counted at s3fs's two fetch calls, in this process
(the parts are read in it for the count, then timed again in `--workers` spawned workers, started beforehand as a
build starts them once for all its phases), and process 0's share of a job of `--processes` is read alone (its
time in its workers against a process's serial pass is the plan's wall time in such a job, before and now). Both
plans are checked to give every file's same lines: each span starts at a line start and its first line number is
the count of newlines before it (read from the local copy). moto's server copies the whole object for a ranged
GET (about 36 ms for any range of a 64 MB object, 4.5 ms of a 4 MB one, on the 2-core VM), which a store's
ranged reads do not: its times for many ranged reads of large objects are worse than a real store's.

A build plans from line starts alone (the lines are counted by its scan): part (a) reads those parts too, in this
process, and checks they give the same spans; part (b) builds the bucket corpus (a
4096-piece tokenizer trained beforehand and given) in this process, one build worker, with the plan counting lines
(the baseline: what a build did before, and an evaluation set's build still does) and without, and
reports the bytes each build fetched from the bucket (and in how many requests) and its seconds; the two datasets
must be the same (their sha256). `--no_builds` skips it. The machine's load average before and after is part of
the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import MachineLoad, bucket_and_scratch, commit, counted_s3_fetches  # noqa: E402
from data_pipeline import make_corpus  # noqa: E402

from diffgemma_jax import storage  # noqa: E402
from diffgemma_jax.data import build  # noqa: E402


def _serial_spans(path: str, rel: str, span_bytes: int, size: int) -> list[tuple[int, int]]:
  """The baseline: a JSONL file's (span start, first line number) from one pass over the whole file, as the plan of
  every process was made before (the span closed at the end of the line where it reached `span_bytes`)."""
  spans, start, first, lines, position = [], 0, 1, 0, 0
  with storage.open_binary(path) as f:
    while chunk := f.read(8 << 20):
      offset = 0
      while True:
        reached = start + span_bytes - position
        cut = chunk.find(b"\n", max(reached, offset)) if reached < len(chunk) else -1
        if cut < 0:
          break
        lines += chunk.count(b"\n", offset, cut + 1)
        spans.append((start, first))
        start, first, lines, offset = position + cut + 1, first + lines, 0, cut + 1
      lines += chunk.count(b"\n", offset)
      position += len(chunk)
  return spans + [(start, first)] if start < size else spans


def _check(local: str, spans: list[tuple[int, int]], what: str) -> None:
  """Every span starts at a line start and its first line number counts the newlines before it."""
  with open(local, "rb") as f:
    data = f.read()
  for start, first in spans:
    if (start and data[start - 1:start] != b"\n") or first != 1 + data.count(b"\n", 0, start):
      raise SystemExit(f"{what}: span at byte {start} (line {first}) is not at a line start of {local}")


def _measure(root: str, names: tuple, processes: int, workers, fetched: list, local: str) -> dict:
  """Both plans of the corpus `names` under `root` (a bucket folder or the local copy): the bytes fetched (in a bucket)
  and seconds of every process's serial pass before; of the parts now, in this process, in the warm workers, and
  process 0's share of a job of `processes`."""
  spec = build.Corpus(root, names, "bench")
  sizes = build.file_sizes(spec)
  limit = build.task_bytes(sizes)
  parts = build.plan_parts(spec, sizes)
  remote = storage.is_url(root)

  def timed(fn):
    fetched.clear()
    start = time.perf_counter()
    result = fn()
    return result, {"seconds": round(time.perf_counter() - start, 3),
                    "fetched_mb": round(sum(fetched) / 2**20, 1) if remote else None}

  serial, before = timed(lambda: {rel: _serial_spans(storage.join(root, rel), rel, limit, size)
                                  for rel, size in sizes.items()})
  found, in_process = timed(lambda: [build.read_span_part(root, rel, part, limit) for rel, part in parts])
  jobs = [(j, root, rel, part, limit) for j, (rel, part) in enumerate(parts)]
  pooled, pooled_time = timed(lambda: dict(workers.run(build._read_part, jobs)))  # pylint: disable=protected-access
  share = [job for job in jobs if job[0] % processes == 0]
  _, share_time = timed(lambda: [build.read_span_part(root, *parts[job[0]], limit) for job in share])
  _, share_pooled = timed(lambda: dict(workers.run(build._read_part, share)))  # pylint: disable=protected-access
  if [pooled[j] for j in range(len(parts))] != found:
    raise SystemExit("the workers' parts differ from this process's")
  tasks = build.tasks_from_parts(spec, sizes, found)
  starts, line_starts = timed(lambda: [build.read_span_part(root, rel, part, limit, count_lines=False)
                                       for rel, part in parts])
  cut = build.tasks_from_parts(spec, sizes, starts)  # a build's plan now: line starts alone, the same cuts
  if [[(s.start, s.stop) for s in t] for t in cut] != [[(s.start, s.stop) for s in t] for t in tasks]:
    raise SystemExit("the line-start plan's spans differ from the counting plan's")
  for rel in names:
    _check(os.path.join(local, rel), serial[rel], "before")
    _check(os.path.join(local, rel), [(s.start, s.first) for t in tasks for s in t if s.rel == rel], "now")
  return {"span_mb": round(limit / 2**20, 2), "parts": len(parts), "tasks": len(tasks),
          "before_per_process": before, "now_in_process": in_process,
          "now_workers": {"seconds": pooled_time["seconds"]}, "line_starts_in_process": line_starts,
          "now_process_0": {"parts": len(share), "fetched_mb": share_time["fetched_mb"],
                            "seconds_in_workers": share_pooled["seconds"]},
          "job_time_ratio": round(share_pooled["seconds"] / max(before["seconds"], 1e-3), 3),
          "job_fetched_ratio": round(in_process["fetched_mb"] / max(processes * before["fetched_mb"], 1e-3), 3)
          if remote else None}


def _builds(url: str, names: tuple, scratch: str, tokenizer: str, fetched: list) -> dict:
  """(b): the bucket corpus built twice in this process (one worker), its plan counting lines and not: the bytes
  each build fetched and its seconds."""
  from data_recipes import build_dataset  # pylint: disable=import-outside-toplevel
  read_part, rows = build._read_part, {}  # pylint: disable=protected-access
  source = ",".join(f"{url}/{name}" for name in names)
  for name, count in (("counting plan (before)", True), ("line-start plan (now)", False)):
    # the baseline: the plan reads each part counting its lines, as it did before (an evaluation set's still does)
    build._read_part = (lambda *a: read_part(*a[:-1], True)) if count else read_part  # pylint: disable=protected-access
    try:
      fetched.clear()
      start = time.perf_counter()
      manifest = build_dataset("text_files", os.path.join(scratch, f"built-{count}"), None, source=source,
                               tokenizer=tokenizer, build_workers=1)
      rows[name] = {"seconds": round(time.perf_counter() - start, 2), "fetched_mb": round(sum(fetched) / 2**20, 1),
                    "requests": len(fetched), "sha256": manifest["sha256"]}
    finally:
      build._read_part = read_part  # pylint: disable=protected-access
  before, now = rows.values()
  if before["sha256"] != now["sha256"]:
    raise SystemExit("the line-start plan's dataset differs from the counting plan's")
  return {**rows, "fetched_ratio": round(now["fetched_mb"] / max(before["fetched_mb"], 1e-3), 3),
          "time_ratio": round(now["seconds"] / max(before["seconds"], 1e-3), 3)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--size_mb", type=float, default=256)
  parser.add_argument("--processes", type=int, default=4, help="the job's processes P (process 0's share is read)")
  parser.add_argument("--workers", type=int, default=2, help="build workers per process")
  parser.add_argument("--url", default="", help="a bucket folder for the corpus (default: a local S3 server)")
  parser.add_argument("--no_builds", action="store_true", help="skip (b), the two builds of the bucket corpus")
  args = parser.parse_args(argv)
  with bucket_and_scratch(args.url, "s3://bench/plan", "plan_reads_") as (url, scratch), \
      counted_s3_fetches() as fetched:
    corpus = os.path.join(scratch, "corpus")
    make_corpus(corpus, int(args.size_mb * 2**20))
    names = tuple(sorted(os.listdir(corpus)))
    storage.upload_many([(os.path.join(corpus, name), f"{url}/{name}") for name in names])
    workers = build._Workers(args.workers)  # pylint: disable=protected-access
    # started before the timing, as a build starts them once for all its phases
    warm = [(j, corpus, names[0], (0, 1), 1) for j in range(args.workers)]
    list(workers.run(build._read_part, warm))  # pylint: disable=protected-access
    tokenizer = None
    if not args.no_builds:
      from data_pipeline import _source_texts  # pylint: disable=import-outside-toplevel

      from diffgemma_jax.data.tokenizer import train_tokenizer  # pylint: disable=import-outside-toplevel
      sample = [text for _, text in zip(range(400), (t for _, t in _source_texts()))]
      tokenizer = train_tokenizer(sample, os.path.join(scratch, "tokenizer"), 4096, max_sentences=60_000).path
    with MachineLoad() as load:
      rows = {where: _measure(root, names, args.processes, workers, fetched, corpus)
              for where, root in (("local files", corpus), ("bucket", url))}
      workers.close()
      builds = None if args.no_builds else _builds(url, names, scratch, tokenizer, fetched)
    report = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "bucket": url if args.url else "local S3 server (moto)", "files": len(names),
              "corpus_mb": round(sum(os.path.getsize(os.path.join(corpus, n)) for n in names) / 2**20, 1),
              "processes": args.processes, "workers": args.workers, "rows": rows, "builds": builds,
              **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  print(f"{report['corpus_mb']} MB of JSONL in {len(names)} files; a job of {args.processes} processes, "
        f"{args.workers} workers each")
  for where, row in rows.items():
    before, now, share = row["before_per_process"], row["now_in_process"], row["now_process_0"]
    mb = (lambda x: f"{x} MB fetched, ") if row["job_fetched_ratio"] is not None else (lambda x: "")  # noqa: E731
    print(f"{where}: spans of {row['span_mb']} MB, {row['parts']} parts, {row['tasks']} tasks. Before, every "
          f"process: {mb(before['fetched_mb'])}{before['seconds']} s (one pass). Now: {mb(now['fetched_mb'])}"
          f"{now['seconds']} s in one process, {row['now_workers']['seconds']} s in the workers; process 0 of the job: "
          f"{mb(share['fetched_mb'])}{share['seconds_in_workers']} s in its workers ({row['job_time_ratio']:.2f}x "
          "the time" + (f"; the job fetches {row['job_fetched_ratio']:.2f}x the bytes)" if row["job_fetched_ratio"]
                        is not None else ")"))
    starts = row["line_starts_in_process"]
    print(f"  the line-start plan (a build's now, its lines counted by the scan): {mb(starts['fetched_mb'])}"
          f"{starts['seconds']} s in one process, the same spans")
  if builds:
    before, now = builds["counting plan (before)"], builds["line-start plan (now)"]
    print(f"a build of the bucket corpus (one worker, tokenizer given): counting plan {before['fetched_mb']} MB "
          f"fetched in {before['requests']} requests, {before['seconds']} s; line-start plan {now['fetched_mb']} MB "
          f"in {now['requests']}, {now['seconds']} s "
          f"({builds['fetched_ratio']:.2f}x the bytes, {builds['time_ratio']:.2f}x the time; the same dataset)")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""A build's task plan of a JSONL corpus in a bucket: each process's reads and seconds, the plan's parts spread over the
processes and their workers against the serial pass every process made before.

    python bench/plan_reads.py [--json] [--size_mb 256] [--processes 4] [--workers 2] [--url s3://bucket/folder]

A build cuts each large JSONL file into spans at line starts, each knowing its first line number, before any worker
starts (data/build.py's plan). Before, every process of a build did it alone, reading the whole of every file in one
pass, one file after the other (the baseline here: that pass, as data/sources.py made it, through the buffered
stream `storage.open_binary`). Now the cuts are found by parts, one ranged read per span-sized chunk
(`sources.span_parts`), part j read by process j mod P in its workers. The corpus is real source text
(bench/data_pipeline.py's `make_corpus`, 64 MB JSONL shards) in a local S3-compatible server (moto's, in a process of
its own) or `--url`; bytes are counted at s3fs's two fetch calls, in this process (the parts are read in it for the
count, then timed again in `--workers` spawned workers, their start included, as a build's first phase starts
them). Both plans are checked to give every file's same lines: the spans tile the file, each starts at a line
start, and each one's first line number is the count of newlines before it (read from the local copy). The
machine's load average before and after is part of the report.
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


def _serial_spans(path: str, rel: str, span_bytes: int, size: int) -> list[tuple[int, int]]:
  """The baseline: a JSONL file's (span start, first line number) from one pass over the whole file, as the plan of
  every process was made before (the span closed at the end of the line where it reached `span_bytes`)."""
  from diffgemma_jax import storage  # pylint: disable=import-outside-toplevel
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--size_mb", type=float, default=256)
  parser.add_argument("--processes", type=int, default=4, help="the job's processes P (process 0's share is read)")
  parser.add_argument("--workers", type=int, default=2, help="build workers per process")
  parser.add_argument("--url", default="", help="a bucket folder for the corpus (default: a local S3 server)")
  args = parser.parse_args(argv)
  from diffgemma_jax import storage  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.data import build  # pylint: disable=import-outside-toplevel
  with bucket_and_scratch(args.url, "s3://bench/plan", "plan_reads_") as (url, scratch), \
      counted_s3_fetches() as fetched:
    corpus = os.path.join(scratch, "corpus")
    make_corpus(corpus, int(args.size_mb * 2**20))
    names = tuple(sorted(os.listdir(corpus)))
    storage.upload_many([(os.path.join(corpus, name), f"{url}/{name}") for name in names])
    spec = build.Corpus(url, names, "bench")
    sizes = build.file_sizes(spec)
    total, limit = sum(sizes.values()), build.task_bytes(sizes)
    parts = build.plan_parts(spec, sizes)
    with MachineLoad() as load:
      fetched.clear()
      start = time.perf_counter()
      serial = {rel: _serial_spans(f"{url}/{rel}", rel, limit, size) for rel, size in sizes.items()}
      before = {"seconds": round(time.perf_counter() - start, 3), "fetched_mb": round(sum(fetched) / 2**20, 1)}
      fetched.clear()
      start = time.perf_counter()
      found = [build.read_span_part(url, rel, part, limit) for rel, part in parts]
      in_process = {"seconds": round(time.perf_counter() - start, 3), "fetched_mb": round(sum(fetched) / 2**20, 1)}
      share = [j for j in range(len(parts)) if j % args.processes == 0]
      fetched.clear()
      for j in share:
        build.read_span_part(url, *parts[j], limit)
      share_mb = round(sum(fetched) / 2**20, 1)
      workers = build._Workers(args.workers)  # pylint: disable=protected-access
      start = time.perf_counter()
      pooled = dict(workers.run(build._read_part, [(j, url, rel, part, limit)  # pylint: disable=protected-access
                                                   for j, (rel, part) in enumerate(parts)]))
      pooled_s = round(time.perf_counter() - start, 3)
      workers.close()
    if [pooled[j] for j in range(len(parts))] != found:
      raise SystemExit("the workers' parts differ from this process's")
    tasks = build.tasks_from_parts(spec, sizes, found)
    for rel in names:
      _check(os.path.join(corpus, rel), serial[rel], "before")
      _check(os.path.join(corpus, rel), [(s.start, s.first) for t in tasks for s in t if s.rel == rel], "now")
    report = {
        "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "bucket": url if args.url else "local S3 server (moto)", "corpus_mb": round(total / 2**20, 1),
        "files": len(names), "span_mb": round(limit / 2**20, 2), "parts": len(parts), "tasks": len(tasks),
        "before_per_process": before, "now_in_process": in_process,
        "now_workers": {"workers": args.workers, "seconds": pooled_s},
        "now_process_0_of": {"processes": args.processes, "parts": len(share), "fetched_mb": share_mb},
        "time_ratio_workers": round(pooled_s / max(before["seconds"], 1e-3), 3),
        "job_fetched_ratio": round(in_process["fetched_mb"] / (args.processes * before["fetched_mb"]), 3),
        **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  print(f"{report['corpus_mb']} MB of JSONL in {len(names)} files, spans of {report['span_mb']} MB: {len(parts)} "
        f"parts, {len(tasks)} tasks")
  print(f"before, every process: {before['fetched_mb']} MB fetched in {before['seconds']} s (serial)")
  print(f"now: {in_process['fetched_mb']} MB in all, {in_process['seconds']} s in one process; {pooled_s} s in "
        f"{args.workers} workers ({report['time_ratio_workers']:.2f}x); process 0 of {args.processes}: "
        f"{share_mb} MB (the job: {report['job_fetched_ratio']:.2f}x the bytes)")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

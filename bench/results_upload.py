"""What keeping a large generation job's results costs the generating loop: uploads of what is new against
rewriting the whole object, and syncing a local file at most every second against syncing every line.

    python bench/results_upload.py [--json] [--results 50000] [--record_kb 2] [--uploads 20] [--url s3://b/dir]

(a) A bucket `--output`: `--results` records of about `--record_kb` KB each (real text: the standard library's
    sources) are added to a `ResultsFile` (sampling/results_file.py) as a generation job adds them, on a clock
    that spans `--uploads` upload intervals over the job, then the job ends (`finish`). Timed: the seconds spent
    inside `add` (the loop waits for them: the accelerator idles) and in `finish`. Ours uploads each interval's new
    records as one chunk object; the baseline is the previous behaviour, the whole object serialised and uploaded
    again every interval (a subclass here). Against `--url`, or a local S3-compatible server (moto's, a process of
    its own): its uploads are faster than a real bucket's, which favours the baseline.
(b) A local `--output` (a temporary folder on this machine's disk): `--local_results` records appended with a
    sync to disk every line (before) against at most every second (now), the seconds spent in `add`.

The machine's load average before and after is part of the report (bench/benchlib.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import MachineLoad, bucket_and_scratch, commit  # noqa: E402

from diffgemma_jax import storage  # noqa: E402
from diffgemma_jax.sampling import results_file  # noqa: E402
from diffgemma_jax.sampling.results_file import ResultsFile  # noqa: E402


class WholeRewrite(ResultsFile):
  """The baseline: every upload serialises every record and writes the object whole (commit bbb99b3's add)."""

  def _upload(self) -> None:
    storage.write_text(self.path, "".join(self.records[i].decode("utf-8") + "\n" for i in sorted(self.records)))
    self._unsent = []
    self._uploaded = results_file.time.monotonic()  # the job's clock


class Clock:
  """`time.monotonic` for results_file: advanced by the job, so each run makes the same uploads."""

  def __init__(self):
    self.now = 0.0

  def monotonic(self) -> float:
    return self.now


def texts(count: int, size: int) -> list[str]:
  """`count` pieces of `size` characters of the standard library's sources, cycled."""
  source = "".join(open(p, encoding="utf-8", errors="replace").read()
                   for p in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:200])
  return [source[(i * size) % (len(source) - size):][:size] for i in range(count)]


def run_job(kind, path: str, completions: list[str], uploads: int, **kw) -> dict:
  """Adds every result to `kind(path, ...)` on the job's clock, then finishes; the seconds in each."""
  clock = Clock()
  saved, results_file.time = results_file.time, clock  # results_file reads time.monotonic() only
  try:
    prompts = [f"prompt {i}" for i in range(len(completions))]
    job = kind(path, prompts, {"sampler": "bench"}, **kw)
    step = results_file.UPLOAD_EVERY_S * uploads / len(completions)
    in_add = 0.0
    for i, completion in enumerate(completions):
      clock.now += step
      record = {"prompt": prompts[i], "completion": completion, "step": 1, "weights": "params"}
      start = time.perf_counter()
      job.add(i, record)
      in_add += time.perf_counter() - start
    start = time.perf_counter()
    job.finish()
    return {"add_s": round(in_add, 3), "finish_s": round(time.perf_counter() - start, 3)}
  finally:
    results_file.time = saved


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--results", type=int, default=50000)
  parser.add_argument("--record_kb", type=float, default=2.0)
  parser.add_argument("--uploads", type=int, default=20)
  parser.add_argument("--local_results", type=int, default=5000)
  parser.add_argument("--url", default="")
  args = parser.parse_args()
  completions = texts(args.results, int(args.record_kb * 1024))
  with bucket_and_scratch(args.url, "s3://bench/results", "results_upload_") as (url, scratch):
    storage.use_object_storage()
    with MachineLoad() as load:
      bucket = {name: run_job(kind, f"{url}/{name}.jsonl", completions, args.uploads, upload_every_s=60.0)
                for name, kind in (("chunks", ResultsFile), ("whole", WholeRewrite))}
      local = {name: run_job(ResultsFile, os.path.join(scratch, f"{name}.jsonl"),
                             completions[:args.local_results], 1, sync_every_s=every)
               for name, every in (("every_line", 0.0), ("every_second", 1.0))}
  # (the local job's clock spans one upload interval, 60 s: syncing every second makes about 60 syncs)
  report = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "store": args.url or "local S3 server (moto, its own process)", "results": args.results,
            "record_bytes": int(args.record_kb * 1024), "uploads": args.uploads, "bucket": bucket,
            "bucket_add_ratio": round(bucket["whole"]["add_s"] / max(bucket["chunks"]["add_s"], 1e-9), 1),
            "local_results": args.local_results, "local": local,
            "local_add_ratio": round(local["every_line"]["add_s"] / max(local["every_second"]["add_s"], 1e-9), 1),
            **load.report()}
  if args.json:
    print(json.dumps(report, indent=1))
    return
  print(f"{report['store']}, commit {report['commit']}: {args.results} results of {report['record_bytes']} bytes "
        f"over {args.uploads} upload intervals")
  for name in ("whole", "chunks"):
    print(f"  {name:>6}: {bucket[name]['add_s']:.2f} s in add, {bucket[name]['finish_s']:.2f} s to finish")
  print(f"  whole / chunks, in add: {report['bucket_add_ratio']}x")
  print(f"local file, {args.local_results} results:")
  for name in ("every_line", "every_second"):
    print(f"  sync {name}: {local[name]['add_s']:.3f} s in add")
  print(f"  every line / every second: {report['local_add_ratio']}x")
  print(MachineLoad.line(load))


if __name__ == "__main__":
  main()

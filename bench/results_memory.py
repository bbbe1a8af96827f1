"""What a large generation job's results take in memory while it runs and as it ends: held as their JSON lines and
streamed to the file and the output, against held as objects three times over.

    python bench/results_memory.py [--json] [--results 20000] [--new_tokens 128]

A `diffgemma-generate --output FILE.jsonl --json` job of `--results` requests, each with `--new_tokens` token ids
(random, from a 262k vocabulary as Gemma's) and their text (real text: the standard library's sources), run
without a model: each batch's results are handed to the results file as the generator hands them
(sampling/requests.py, sampling/results_file.py), then the job ends (`finish`) and its JSON document is printed
(to /dev/null). Now: the generator keeps no list of them, the file keeps each result's JSON line in a spool file
on disk and where it lies in memory (`SpooledLines`), the end's rewrite writes a line at a time and the document
is printed an item at a time (launch/generate.py). The baseline
is the previous behaviour (a subclass here): the generator's list of every result, the file's parsed objects, the
rewrite as one string and the document as one string. Measured: the peak of Python's allocations (tracemalloc)
over the whole job and at its end, and the seconds. The machine's load average before and after is part of the
report (bench/benchlib.py).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import MachineLoad, before_now_report  # noqa: E402

from diffgemma_jax import storage  # noqa: E402
from diffgemma_jax.sampling.results_file import ResultsFile  # noqa: E402
from launch.common import json_array, json_safe  # noqa: E402
from launch.generate import JSON_KEYS  # noqa: E402

BATCH = 64


class ObjectRecords(ResultsFile):
  """The baseline: each record kept as its parsed object, the end's rewrite and its result list built whole."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.records = {}  # objects in memory, not spooled lines

  def add(self, index: int, record: dict) -> None:
    super().add(index, record)
    self.records[index] = dict(record, index=index, settings=self.digest)

  def finish(self):
    records = [self.records[i] for i in sorted(self.records)]
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("utf-8")
    storage.write_file_atomic(self.path, data, sync=True)
    return records


def _texts(count: int) -> list[str]:
  root = os.path.dirname(json.__file__).rsplit("/", 1)[0]
  source = "".join(open(p, encoding="utf-8", errors="replace").read() for p in sorted(glob.glob(f"{root}/*.py"))[:40])
  return [source[(i * 997) % (len(source) - 700):][:600] for i in range(count)]


def _job(kind: type, path: str, prompts: list[str], completions: list[str], new_tokens: int, now: bool) -> dict:
  rng = random.Random(0)
  tracemalloc.start()
  start = time.perf_counter()
  kept = kind(path, prompts, {"bench": 1})
  held = []  # the generator's list of every result (before)
  for first in range(0, len(prompts), BATCH):
    batch = [{"prompt": prompts[i], "completion": completions[i], "sampler": "threshold", "step": 800,
              "weights": "params", "prompt_tokens": 40, "gen_length": new_tokens, "new_tokens": new_tokens,
              "model_calls": 40, "seconds": 0.5, "tokens_per_s": 256.0, "compile_seconds": 3.0,
              "steps_per_canvas": [5] * (new_tokens // 32), "ids": [rng.randrange(262144) for _ in range(new_tokens)],
              "batch_size": BATCH, "batch_tokens_per_s": 8192.0}
             for i in range(first, min(first + BATCH, len(prompts)))]
    for offset, result in enumerate(batch):
      result["index"] = first + offset
      kept.add(first + offset, json_safe({k: result[k] for k in JSON_KEYS}))  # as launch/generate.py's finish
    if not now:
      held += batch
  during = tracemalloc.get_traced_memory()[1]
  results = kept.finish()
  with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
    if now:
      for piece in json_array(json_safe({k: r[k] for k in JSON_KEYS}) for r in results):
        print(piece)
    else:
      print(json.dumps(json_safe([{k: r[k] for k in JSON_KEYS} for r in results]), indent=2, allow_nan=False))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  del held
  return {"seconds": round(time.perf_counter() - start, 2), "peak_mb_while_running": round(during / 2**20, 1),
          "peak_mb": round(peak / 2**20, 1), "file_mb": round(os.path.getsize(path) / 2**20, 1)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--results", type=int, default=20000)
  parser.add_argument("--new_tokens", type=int, default=128)
  args = parser.parse_args(argv)
  texts = _texts(2 * args.results)
  prompts, completions = [t[:200] for t in texts[::2]], [t[:500] for t in texts[1::2]]
  with tempfile.TemporaryDirectory(prefix="results_memory_") as folder, MachineLoad() as load:
    rows = {"before": _job(ObjectRecords, os.path.join(folder, "before.jsonl"), prompts, completions,
                           args.new_tokens, now=False),
            "now": _job(ResultsFile, os.path.join(folder, "now.jsonl"), prompts, completions, args.new_tokens,
                        now=True)}
    with open(os.path.join(folder, "before.jsonl"), "rb") as a, open(os.path.join(folder, "now.jsonl"), "rb") as b:
      if a.read() != b.read():
        raise SystemExit("the two jobs wrote different files")
  report = before_now_report(rows, load, results=args.results, new_tokens=args.new_tokens)
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  for name, row in rows.items():
    print(f"{name}: peak {row['peak_mb']} MB ({row['peak_mb_while_running']} MB while running), {row['seconds']} s, "
          f"file {row['file_mb']} MB")
  print(f"{args.results} results of {args.new_tokens} tokens: {report['peak_ratio']:.2f}x the peak, "
        f"{report['time_ratio']:.2f}x the time")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

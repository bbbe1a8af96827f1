"""A build that trains its tokenizer: what the scan's tasks send back for the tokenizer sample, with the sample's
floor against without it.

    python bench/sample_floor.py [--json] [--size_mb 256] [--workers 2] [--rounds 2] [--sample_lines 120000]

A build with no tokenizer given trains one on a uniform sample of the training documents (the largest key digests
until `data.tokenizer_sample_lines` lines, and a quarter more: data/build.py's `Sample`). Each scan task keeps its
own candidates, up to that many lines, and sends them to its process, which merges them: a task of 16 MB whose lines
average over 16 MB / 150,000 (107 bytes) sent its whole text back, split into lines, and the process unpickled and
merged the whole corpus on one core. Now the process writes the least (key, order) of its merged sample once it
holds its lines (`Sample.floor_now`) and a task that starts after reads it and drops what falls under it, which no
sample merged from more documents could take: the same sample, the same tokenizer, the same dataset. The baseline
here: the process never writes a floor (its `floor_now` patched to None; the tasks read none).

The corpus is bench/data_pipeline.py's (real source text, one file a JSON line, 64 MB shards). Each round builds
it both ways with `--workers` build workers (the order alternating between rounds), the build's default tokenizer
size (`--vocab_size`) and sample; measured: each build's wall seconds, the candidate documents and lines its
process merged (the tasks' answers), and checked: the two tokenizers and datasets are byte for byte the same. The
machine's load average before and after is part of the report (bench/benchlib.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import MachineLoad, commit  # noqa: E402
from data_pipeline import make_corpus  # noqa: E402

from data_recipes import build_dataset  # noqa: E402
from diffgemma_jax.data import build  # noqa: E402


def _build(source: str, out: str, *, floors: bool, workers: int, vocab_size: int, sample_lines: int) -> dict:
  merged = {"documents": 0, "lines": 0}
  offer = build.Sample.offer

  def counted(self, key, order, lines, digest=None):
    if not isinstance(lines, str):  # a task's candidate, merged by the process (a task's own offers pass text)
      merged["documents"] += 1
      merged["lines"] += len(lines)
    return offer(self, key, order, lines, digest)

  shutil.rmtree(out, ignore_errors=True)
  patches = [mock.patch.object(build.Sample, "offer", counted)]
  if not floors:
    patches.append(mock.patch.object(build.Sample, "floor_now", lambda self: None))
  start = time.perf_counter()
  with contextlib.ExitStack() as stack:
    for patch in patches:
      stack.enter_context(patch)
    manifest = build_dataset("text_files", out, vocab_size, source=source, build_workers=workers,
                             tokenizer_sample_lines=sample_lines)
  seconds = time.perf_counter() - start
  with open(os.path.join(out, "tokenizer.model"), "rb") as f:
    tokenizer = f.read()
  return {"seconds": round(seconds, 2), "merged_documents": merged["documents"], "merged_lines": merged["lines"],
          "sha256": manifest["sha256"], "tokenizer_bytes": len(tokenizer), "_tokenizer": tokenizer}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--size_mb", type=float, default=256)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--vocab_size", type=int, default=4096)
  parser.add_argument("--sample_lines", type=int, default=120_000)
  args = parser.parse_args(argv)
  rounds = []
  with tempfile.TemporaryDirectory(prefix="sample_floor_") as folder, MachineLoad() as load:
    source = os.path.join(folder, "corpus")
    text_bytes = make_corpus(source, int(args.size_mb * 2**20))
    for r in range(args.rounds):
      runs = {}
      for floors in ((True, False) if r % 2 == 0 else (False, True)):
        runs["now" if floors else "before"] = _build(source, os.path.join(folder, "ds"), floors=floors,
                                                      workers=args.workers, vocab_size=args.vocab_size,
                                                      sample_lines=args.sample_lines)
      if runs["now"]["sha256"] != runs["before"]["sha256"] or \
          runs["now"].pop("_tokenizer") != runs["before"].pop("_tokenizer"):
        raise SystemExit("the builds with and without the floor made different datasets or tokenizers")
      runs["seconds_ratio"] = round(runs["now"]["seconds"] / runs["before"]["seconds"], 3)
      runs["merged_lines_ratio"] = round(runs["now"]["merged_lines"] / max(runs["before"]["merged_lines"], 1), 4)
      rounds.append(runs)
  report = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "text_mb": round(text_bytes / 2**20, 1), "workers": args.workers, "vocab_size": args.vocab_size,
            "sample_lines": args.sample_lines, "rounds": rounds, **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  for i, runs in enumerate(rounds):
    for name in ("before", "now"):
      row = runs[name]
      print(f"round {i + 1} {name}: {row['seconds']} s, merged {row['merged_documents']} candidate documents, "
            f"{row['merged_lines']} lines")
    print(f"round {i + 1}: {runs['seconds_ratio']:.3f}x the time, {runs['merged_lines_ratio']:.4f}x the lines "
          "merged; the same tokenizer and dataset")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

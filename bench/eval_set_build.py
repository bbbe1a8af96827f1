"""An evaluation set built from one read of its files, against the scanned build of the same files.

    python bench/eval_set_build.py [--json] [--size_mb 100] [--rounds 3] [--url s3://bucket/folder]

`diffgemma-eval --heldout FILES` and `eval.heldout_sets` build an evaluation set: every document of FILES held out,
read with the run's tokenizer (`data_recipes.text_files`, `Corpus.evaluation_only`). Such a set has nothing to
decide, so its build reads the files once (the tokenise phase). The baseline is the build a set had before, which a
pretraining build with a held-out source still makes: a scan (a first read, per-document digests) and then the
tokenise phase; here the same files as `data.heldout_source` beside a one-line `data.source` (every set document
held out in both, the same tokens). The corpus is real source text (bench/data_pipeline.py's `make_corpus`: the
venv's site-packages and the standard library, cycled into 64 MB JSONL shards) with a 1024-piece tokenizer trained
once beforehand; two build workers. Each round builds both, alternating, from local files and from the same files
in a bucket (`--url`, or a local S3-compatible server: moto's, in a process of its own), each build into a fresh
folder. The machine's load average before and after is part of the report (bench/benchlib.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import MachineLoad, bucket_and_scratch, commit  # noqa: E402
from data_pipeline import make_corpus  # noqa: E402

VOCAB = 1024


def _build(out: str, files: str, tokenizer: str, train_file: str | None) -> tuple[float, int]:
  from data_recipes import build_dataset  # pylint: disable=import-outside-toplevel
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  manifest = build_dataset("text_files", out, VOCAB, source=train_file, heldout_source=files, tokenizer=tokenizer,
                           build_workers=2)  # (what diffgemma-eval --heldout and the trainer call)
  seconds = time.perf_counter() - start
  shutil.rmtree(out, ignore_errors=True)
  return seconds, manifest["splits"]["heldout"]["tokens"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--size_mb", type=float, default=100)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--url", default="", help="a bucket folder for the set's files (default: a local S3 server)")
  args = parser.parse_args(argv)
  from diffgemma_jax import storage  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.data.tokenizer import train_tokenizer  # pylint: disable=import-outside-toplevel
  with bucket_and_scratch(args.url, "s3://bench/eval-set", "eval_set_build_") as (url, scratch):
    corpus = os.path.join(scratch, "set")
    text_bytes = make_corpus(corpus, int(args.size_mb * 2**20))
    with open(os.path.join(corpus, os.listdir(corpus)[0])) as f:
      sample = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    tokenizer = train_tokenizer(sample, os.path.join(scratch, "tok"), VOCAB).path
    train_file = os.path.join(scratch, "train", "one.txt")  # the baseline's data.source: one line, trained on
    os.makedirs(os.path.dirname(train_file))
    with open(train_file, "w") as f:
      f.write("x = 1\n")
    train_url = f"{url}-train/one.txt"  # (a build's files lie in one bucket)
    storage.upload_many([(os.path.join(corpus, name), f"{url}/{name}") for name in sorted(os.listdir(corpus))]
                        + [(train_file, train_url)])
    sources = {"local": (corpus, train_file), "bucket": (url, train_url)}
    rows = []
    with MachineLoad() as load:
      for round_ in range(args.rounds):
        for where, (files, train) in sources.items():
          one, tokens = _build(os.path.join(scratch, "out"), files, tokenizer, None)
          scanned, scanned_tokens = _build(os.path.join(scratch, "out"), files, tokenizer, train)
          assert tokens == scanned_tokens, (tokens, scanned_tokens)
          rows.append({"round": round_ + 1, "files": where, "one_read_s": round(one, 3),
                       "scanned_s": round(scanned, 3), "ratio": round(one / scanned, 3), "tokens": tokens,
                       "load_1min": round(os.getloadavg()[0], 2)})
          if not args.json:
            print(f"round {round_ + 1}, {where} files: one read {one:.2f} s, scanned {scanned:.2f} s: "
                  f"{one / scanned:.2f}x the time ({tokens:,} tokens)", flush=True)
    medians = {where: statistics.median(r["ratio"] for r in rows if r["files"] == where) for where in sources}
    report = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "text_mb": round(text_bytes / 2**20, 1), "bucket": url if args.url else "local S3 server (moto)",
              "rows": rows, "median_ratio": medians, **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print("median one read / scanned: " + ", ".join(f"{k} {v:.2f}x" for k, v in medians.items()))
    print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

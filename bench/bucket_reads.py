"""A corpus's spans read from a bucket: the bytes fetched and the seconds, ranged reads against buffered files.

    python bench/bucket_reads.py [--json] [--size_mb 64] [--url s3://bucket/folder]

A dataset build reads each source file as spans of 1-16 MB (data/build.py's tasks; a 64th of the corpus each,
so 1 MB spans below 64 MB of corpus), twice (the scan, then the tokenise phase). From a bucket, a span is now one
ranged request for exactly its bytes (JSONL) and a Parquet object's reads fetch exactly what pyarrow asks for
(`data/sources.py`); the baseline is what they did before, reading through the store client's buffered file
(`epath.Path(url).open("rb")`: s3fs fetches its 50 MB block from every new position). The corpus is real source
text (bench/data_pipeline.py's `make_corpus`, 64 MB JSONL shards) and the same documents as one Parquet file (row
groups of about 1 MB, uncompressed); the spans are the build's (`plan_tasks`). One pass over every span each way,
alternating JSONL and Parquet, in a local S3-compatible server (moto's, in a process of its own) or `--url`; bytes
are counted at s3fs's two fetch calls. The machine's load average before and after is part of the report.
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


def _buffered_documents(url: str, rel: str, span) -> int:
  """The baseline: the span's documents read through the client's buffered file, as data/sources.py did."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  path, count = f"{url}/{rel}", 0
  with epath.Path(path).open("rb") as f:
    if rel.endswith(".parquet"):
      stop = span.stop
      for batch in pq.ParquetFile(f).iter_batches(columns=["text"], row_groups=list(range(span.start, stop))):
        count += batch.num_rows
      return count
    f.seek(span.start)
    position = span.start
    for raw in f:
      if span.stop is not None and position >= span.stop:
        break
      position += len(raw)
      count += bool(json.loads(raw)["text"])
  return count


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--size_mb", type=float, default=64)
  parser.add_argument("--url", default="", help="a bucket folder for the corpus (default: a local S3 server)")
  args = parser.parse_args(argv)
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  from diffgemma_jax import storage  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.data.build import Corpus, plan_tasks  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.data.sources import read_documents  # pylint: disable=import-outside-toplevel
  with bucket_and_scratch(args.url, "s3://bench/reads", "bucket_reads_") as (url, scratch), \
      counted_s3_fetches() as fetched:
    corpus = os.path.join(scratch, "corpus")
    make_corpus(corpus, int(args.size_mb * 2**20))
    texts = [json.loads(line)["text"] for name in sorted(os.listdir(corpus))
             for line in open(os.path.join(corpus, name), encoding="utf-8")]
    group = max(1, len(texts) * 2**20 // sum(len(t) for t in texts))  # rows of about 1 MB
    pq.write_table(pa.table({"text": texts}), os.path.join(corpus, "all.parquet"), row_group_size=group,
                   compression="none")
    names = sorted(os.listdir(corpus))
    storage.upload_many([(os.path.join(corpus, name), f"{url}/{name}") for name in names])
    rows = []
    with MachineLoad() as load:
      for kind in ("jsonl", "parquet"):
        files = tuple(name for name in names if name.endswith(kind))
        spans = [span for task in plan_tasks(Corpus(url, files, "bench")) for span in task]
        size = sum(os.path.getsize(os.path.join(corpus, name)) for name in files)
        row = {"kind": kind, "mb": round(size / 2**20, 1), "spans": len(spans)}
        for way, read in (("buffered", lambda s: _buffered_documents(url, s.rel, s)),
                          ("ranged", lambda s: sum(1 for _ in read_documents(url, s.rel, span=s)))):
          fetched.clear()
          start = time.perf_counter()
          documents = sum(read(span) for span in spans)
          row[way] = {"seconds": round(time.perf_counter() - start, 2), "fetched_mb": round(sum(fetched) / 2**20, 1),
                      "requests": len(fetched), "documents": documents, "x_size": round(sum(fetched) / size, 2)}
        row["fetched_ratio"] = round(row["ranged"]["fetched_mb"] / row["buffered"]["fetched_mb"], 3)
        row["time_ratio"] = round(row["ranged"]["seconds"] / row["buffered"]["seconds"], 3)
        rows.append(row)
        if not args.json:
          print(f"{kind}: {row['mb']} MB in {len(spans)} spans: buffered {row['buffered']['fetched_mb']} MB fetched "
                f"({row['buffered']['x_size']}x) in {row['buffered']['seconds']} s; ranged "
                f"{row['ranged']['fetched_mb']} MB ({row['ranged']['x_size']}x) in {row['ranged']['seconds']} s: "
                f"{row['time_ratio']:.2f}x the time", flush=True)
    report = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "bucket": url if args.url else "local S3 server (moto)", "rows": rows, **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

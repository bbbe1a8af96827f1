"""A pretraining dataset in a bucket, its token shards read in place (`data.stream_tokens`) against its local copy.

    python bench/stream_rows.py [--json] [--size_mb 256] [--url s3://bucket/folder] [--seconds 10] [--workers 0,2]

The dataset is a token store of random documents (100 to 3,000 tokens, a 32,768-piece vocabulary: uint16) in
shards of 16 MB, a build's largest task, uploaded to the bucket folder `--url`; without it, to a local
S3-compatible server (moto's, started here in a process of its own: a Python server on the same cores, far slower
per request than a cloud store, so the streamed figures are a floor). In one run:

(a) Time to the first batch from a fresh cache: copy (`data.stream_tokens=False`: every file fetched, then the
    split opened and a batch read) against stream (the small files fetched, then the same); the bytes each leaves
    on the local disk.
(b) Training input, pretrain_gpu_1b's batch (32 rows of 2048 tokens, read and `jax.device_put`), for each
    `data.num_workers` of `--workers`: streamed against the local copy (memory-mapped, after (a), so from the page
    cache), tokens/s and their ratio, and against what the 1B's train step consumes on one H100 (its FLOPs per token
    at 40% of the bf16 peak) and on a host of 8; and the CPU time the training process spent per streamed batch
    (with no workers, the whole client-side cost of its requests).
(c) Consecutive rows (an evaluation reads its held-out batches in order), streamed: touching rows merged into one
    ranged request against a request per row (what the reader did before; `SplitStore.merge_ranges=False`),
    tokens/s and requests per batch.

The machine's load average before and after is part of the report (bench/benchlib.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import MachineLoad, bucket_and_scratch, commit, gpu_1b_consumption  # noqa: E402

VOCAB = 32_768
SHARD_TOKENS = 8 << 20  # 16 MB of uint16 ids
SEQ_LEN, BATCH = 2048, 32  # pretrain_gpu_1b's rows


def write_store(folder: str, size_mb: int, seed: int = 0) -> dict:
  """A token store of about `size_mb` MB of train tokens (and a held-out shard of 1 MB) with its manifest."""
  from diffgemma_jax.data.store import ShardWriter
  rng = np.random.default_rng(seed)
  entries = {"train": [], "heldout": []}
  left = {"train": (size_mb << 20) // 2, "heldout": (1 << 20) // 2}
  for split in entries:
    index = 0
    while left[split] > 0:
      writer = ShardWriter(os.path.join(folder, split), f"{index:05d}", VOCAB)
      count = min(SHARD_TOKENS, left[split])
      lengths = rng.integers(100, 3_000, size=count // 1_500 + 1)
      lengths = lengths[np.cumsum(lengths) <= count]
      if lengths.sum() < count:
        lengths = np.append(lengths, count - lengths.sum())
      packed = rng.integers(0, VOCAB, size=count, dtype=np.int32)
      writer.add_packed([("d", "")] * len(lengths), packed, lengths)
      entries[split].append(writer.close())
      left[split] -= count
      index += 1
  manifest = {"recipe": "bench", "kind": "text", "vocab_size": VOCAB,
              "store": {"dtype": "<u2", "splits": {k: {"shards": v} for k, v in entries.items()}}}
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  return manifest


def folder_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def first_batch(url: str, cache: str, stream: bool) -> dict:
  """Seconds from a fresh cache to the first training batch, and the bytes left in the cache."""
  from diffgemma_jax.data import make_train_iterator, remote_dataset
  shutil.rmtree(cache, ignore_errors=True)
  start = time.perf_counter()
  local = remote_dataset.fetch(url, cache, stream=stream)
  fetched = time.perf_counter() - start
  next(make_train_iterator(local, seq_len=SEQ_LEN, batch_size=BATCH, seed=0))
  return {"seconds": round(time.perf_counter() - start, 3), "fetch_seconds": round(fetched, 3),
          "local_bytes": folder_bytes(local), "folder": local}


def input_throughput(data_dir: str, workers: int, seconds: float) -> tuple[float, float]:
  """(tokens/s, this process's CPU milliseconds per batch: with no workers, the reading's whole cost)."""
  import jax

  from diffgemma_jax.data import make_train_iterator
  it = make_train_iterator(data_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, num_workers=workers)
  jax.block_until_ready(jax.device_put(next(it)))  # workers started, first batch out
  start, cpu, batches = time.perf_counter(), time.process_time(), 0
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(jax.device_put(next(it)))
    batches += 1
  return batches * BATCH * SEQ_LEN / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / batches


def sequential_reads(data_dir: str, manifest: dict, seconds: float, merge: bool) -> tuple[float, float]:
  """(tokens/s, requests per batch) reading batches of consecutive rows (an evaluation's order) from a streamed
  split: touching rows merged into one range (`merge`), or each row's range its own request (the reader before)."""
  from diffgemma_jax.data.store import open_split
  store = open_split(data_dir, manifest, "train")
  store.merge_ranges = merge
  rows, asked = store.num_rows(SEQ_LEN, False), []
  read = store._read_ranges  # pylint: disable=protected-access
  store._read_ranges = lambda names, starts, ends: asked.append(len(names)) or read(names, starts, ends)
  store.rows(range(BATCH), SEQ_LEN)  # connections open
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    store.rows([(batches * BATCH + i) % rows for i in range(BATCH)], SEQ_LEN)
    batches += 1
  return batches * BATCH * SEQ_LEN / (time.perf_counter() - start), float(np.mean(asked[1:]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--size_mb", type=int, default=256, help="train tokens of the dataset, in MB")
  parser.add_argument("--url", default="", help="the bucket folder to upload it to (default: a local S3 server)")
  parser.add_argument("--seconds", type=float, default=10.0, help="(b): seconds per throughput measurement")
  parser.add_argument("--workers", default="0,2", help="(b): data.num_workers settings, comma-separated")
  args = parser.parse_args(argv)
  with bucket_and_scratch(args.url, "s3://bench/stream-rows", "diffgemma_stream_bench_") as (url, scratch):
    from diffgemma_jax.data import remote_dataset
    local = os.path.join(scratch, "dataset")
    manifest = write_store(local, args.size_mb)
    start = time.perf_counter()
    remote_dataset.upload(local, url)
    upload_s = time.perf_counter() - start
    load = MachineLoad()
    copy = first_batch(url, os.path.join(scratch, "cache-copy"), stream=False)
    streamed = first_batch(url, os.path.join(scratch, "cache-stream"), stream=True)
    need = gpu_1b_consumption()
    rows = []
    for workers in [int(w) for w in args.workers.split(",") if w.strip()]:
      local_rate, _ = input_throughput(copy["folder"], workers, args.seconds)
      stream_rate, cpu_ms = input_throughput(streamed["folder"], workers, args.seconds)
      rows.append({"num_workers": workers, "local_tokens_per_s": round(local_rate), "stream_tokens_per_s":
                   round(stream_rate), "stream_vs_local": round(stream_rate / local_rate, 3),
                   "stream_cpu_ms_per_batch_in_process": round(cpu_ms, 1),
                   "stream_vs_1b_h100": round(stream_rate / need, 1),
                   "stream_vs_1b_8_h100": round(stream_rate / (8 * need), 2)})
    merged_rate, merged_requests = sequential_reads(streamed["folder"], manifest, args.seconds, merge=True)
    row_rate, row_requests = sequential_reads(streamed["folder"], manifest, args.seconds, merge=False)
    sequential = {"merged_tokens_per_s": round(merged_rate), "per_row_tokens_per_s": round(row_rate),
                  "merged_vs_per_row": round(merged_rate / row_rate, 2),
                  "requests_per_batch": {"merged": round(merged_requests, 2), "per_row": round(row_requests, 2)}}
    train_bytes = sum(s["num_tokens"] for s in manifest["store"]["splits"]["train"]["shards"]) * 2
    report = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "store": url if args.url else "local S3 server (moto, its own process)", "train_bytes": train_bytes,
              "upload_seconds": round(upload_s, 2),
              "first_batch": {"copy": {k: v for k, v in copy.items() if k != "folder"},
                              "stream": {k: v for k, v in streamed.items() if k != "folder"},
                              "copy_vs_stream": round(copy["seconds"] / streamed["seconds"], 2)},
              "input": rows, "sequential": sequential, "pretrain_gpu_1b_h100_tokens_per_s": round(need),
              **load.report()}
  if args.json:
    print(json.dumps(report, indent=1))
    return 0
  first = report["first_batch"]
  print(f"{report['store']}: {train_bytes / 2**20:.0f} MB of train tokens (uploaded in {upload_s:.1f} s), commit "
        f"{report['commit']}, {report['date']}")
  print(f"(a) first batch from a fresh cache: copy {first['copy']['seconds']:.2f} s "
        f"({first['copy']['local_bytes'] / 2**20:.1f} MB on disk), stream {first['stream']['seconds']:.2f} s "
        f"({first['stream']['local_bytes'] / 2**20:.2f} MB on disk): copy / stream {first['copy_vs_stream']:.1f}x")
  print(f"(b) input, {BATCH} x {SEQ_LEN} tokens per batch (the 1B on one H100 needs about {need:,.0f} tokens/s):")
  for row in rows:
    print(f"  num_workers={row['num_workers']}: local {row['local_tokens_per_s']:,} tokens/s, stream "
          f"{row['stream_tokens_per_s']:,} ({row['stream_vs_local']:.3f}x local, {row['stream_vs_1b_h100']}x one "
          f"H100's need, {row['stream_vs_1b_8_h100']}x eight's; {row['stream_cpu_ms_per_batch_in_process']} ms of "
          f"this process's CPU per streamed batch)")
  print(f"(c) consecutive rows (an evaluation's order), streamed: touching rows merged "
        f"{sequential['merged_tokens_per_s']:,} tokens/s ({sequential['requests_per_batch']['merged']} requests a "
        f"batch), a request per row {sequential['per_row_tokens_per_s']:,} "
        f"({sequential['requests_per_batch']['per_row']}): {sequential['merged_vs_per_row']:.2f}x")
  print(MachineLoad.line(load))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""A pretraining dataset built into a bucket by one process against two processes of a job building it together.

    python bench/bucket_build.py [--json] [--size_mb 128] [--url s3://bucket/folder]

The corpus is real source text (the venv's site-packages and the standard library, cycled into 64 MB JSONL
shards, as bench/data_pipeline.py makes it) with a 4096-piece tokenizer trained once beforehand and given to the
builds. Each build is `prepare_dataset` (what the trainer runs) with `data.dir` in the bucket: `--url`, or a local
S3-compatible server (moto's, in a process of its own, as bench/stream_rows.py starts it). In one run:

(a) one process with two build workers against two processes (joined by `jax.distributed` on CPU, one build
    worker each, a cache of its own each: hosts without a shared disk) building the same corpus: the wall-clock
    seconds of the build (the slower process's; JAX's start is not counted), and the bytes of token shards each
    process built and keeps on its disk. On one machine both use the same two cores, so the time ratio is the
    price of building together (the exchange through the bucket, the barriers, each process's own upload); across
    hosts each host builds its share with its own cores.
(b) the two processes started again on the dataset they built (current: nothing is built): the seconds to find it
    current and return its copy, with the other processes following process 0's reports from 50 ms on (now)
    against polling every 5 s (before).

The machine's load average before and after is part of the report (bench/benchlib.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import MachineLoad, bucket_and_scratch, commit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 4096

# One process of a build: prepare_dataset on the tiny config pointed at the corpus, the tokenizer and the bucket;
# prints the seconds it took and the bytes of token shards its copy holds.
PROCESS = """
import json, os, sys, time
address, count, rank, corpus, tokenizer, url, cache, workers, old_polls = sys.argv[1:]
count, rank = int(count), int(rank)
import jax
if count > 1:
  jax.distributed.initialize(address, num_processes=count, process_id=rank)
from diffgemma_jax.config import load_config
from diffgemma_jax.data import build_status
from diffgemma_jax.train.dataset import prepare_dataset
if old_polls == "1":  # the waiting processes' polls before: every 5 s from the start
  build_status.FIRST_POLL_S = build_status.POLL_S
config = load_config("configs/pretrain_tiny.py", {
    "data.recipe": "text_files", "data.source": corpus, "data.tokenizer": tokenizer, "data.dir": url,
    "data.cache_dir": cache, "data.build_workers": workers, "model.vocab_size": "%d"})
start = time.perf_counter()
directory, _ = prepare_dataset(config)
seconds = time.perf_counter() - start
held = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files
           if f.endswith((".tokens", ".starts")))
print("RESULT " + json.dumps({"seconds": seconds, "shard_bytes": held}), flush=True)
if count > 1:
  jax.distributed.shutdown()
""" % VOCAB


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def build(count: int, corpus: str, tokenizer: str, url: str, scratch: str, *, workers: int,
          old_polls: bool = False) -> list[dict]:
  """Runs `count` processes of one build; each one's {"seconds", "shard_bytes"}."""
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  procs = [subprocess.Popen([sys.executable, "-c", PROCESS, address, str(count), str(rank), corpus, tokenizer, url,
                             os.path.join(scratch, f"cache-{count}-{rank}"), str(workers), "1" if old_polls else "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for rank in range(count)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
      raise RuntimeError(err[-3000:])
    results.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):]))
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--size_mb", type=int, default=128, help="text bytes of the corpus, in MB")
  parser.add_argument("--url", default="", help="the bucket folder to build in (default: a local S3 server)")
  parser.add_argument("--skip_current", action="store_true", help="skip (b)")
  args = parser.parse_args(argv)
  from data_pipeline import _source_texts, make_corpus

  from diffgemma_jax.data.tokenizer import train_tokenizer
  with bucket_and_scratch(args.url, "s3://bench/bucket-build", "diffgemma_bucket_build_bench_") as (url, scratch):
    corpus = os.path.join(scratch, "corpus")
    text_bytes = make_corpus(corpus, args.size_mb << 20)
    sample = [text for _, text in zip(range(400), (t for _, t in _source_texts()))]
    tokenizer = train_tokenizer(sample, os.path.join(scratch, "tokenizer"), VOCAB, max_sentences=60_000).path
    load = MachineLoad()
    one = build(1, corpus, tokenizer, f"{url}/one", scratch, workers=2)
    two = build(2, corpus, tokenizer, f"{url}/two", scratch, workers=1)
    current = None
    if not args.skip_current:
      now = build(2, corpus, tokenizer, f"{url}/two", scratch, workers=1)
      before = build(2, corpus, tokenizer, f"{url}/two", scratch, workers=1, old_polls=True)
      current = {"polls_from_50ms": round(max(r["seconds"] for r in now), 2),
                 "polls_every_5s": round(max(r["seconds"] for r in before), 2)}
    seconds = {"one_process": round(one[0]["seconds"], 2), "two_processes": round(max(r["seconds"] for r in two), 2)}
    report = {
        "commit": commit(), "store": args.url or "local S3 server (moto, its own process)",
        "text_bytes": text_bytes,
        "build": {**seconds, "two_vs_one": round(seconds["two_processes"] / seconds["one_process"], 2),
                  "shard_bytes": {"one_process": one[0]["shard_bytes"],
                                  "two_processes": [r["shard_bytes"] for r in two]}},
        "current": current,
        **load.report()}
  if args.json:
    print(json.dumps(report, indent=1))
    return 0
  b, c = report["build"], report["current"]
  print(f"{report['store']}: {text_bytes / 2**20:.0f} MB of text, commit {report['commit']}")
  print(f"(a) built by one process (2 workers) in {b['one_process']:.1f} s, by two processes together (1 worker "
        f"each) in {b['two_processes']:.1f} s: {b['two_vs_one']:.2f}x; token shards on each disk: "
        f"{b['shard_bytes']['one_process'] / 2**20:.1f} MB against "
        + " and ".join(f"{x / 2**20:.1f}" for x in b["shard_bytes"]["two_processes"]) + " MB")
  if c:
    print(f"(b) two processes finding it current: {c['polls_from_50ms']:.2f} s (polls from 50 ms), "
          f"{c['polls_every_5s']:.2f} s (polls every 5 s)")
  print(MachineLoad.line(load))
  return 0


if __name__ == "__main__":
  sys.exit(main())

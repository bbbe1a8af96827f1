"""The pretraining data path at corpus scale (issue 19), three measurements in one run:

(a) build throughput: tokens/s of building a token store (scan, split, tokenise, write; a given tokenizer)
    against sentencepiece's own batch encode (into numpy arrays, as the build asks for them) of the same
    documents on the same cores, right after the build (--rounds pairs: the median ratio), in wall-clock time
    and in CPU time (the build's processes and workers against the encode's threads: the work each does, which
    a loaded machine's scheduling does not change);
(b) training input throughput: tokens/s delivered as device-ready batches (numpy rows read from the store,
    `jax.device_put`) at pretrain_gpu_1b's batch shape, without and with grain workers, against what the train
    step consumes: pretrain_tiny on this CPU (`--tiny_tokens_per_s`, BENCHMARKS.md's main job) and
    pretrain_gpu_1b on one H100 (its train FLOPs per token at 40% of the 989 TFLOP/s dense bf16 peak, until a GPU
    measurement replaces it);
(c) peak resident memory (VmHWM) of the build and of a 20-step pretrain_tiny training run, for corpora of
    about 0.1, 1 and 4 GB of text, each run in a fresh process (the build's worker processes: their ru_maxrss).

Corpora are made by concatenating real text found on the machine, cycled until the size is reached, into JSONL
shards, one source file per record, under --tmp, and deleted afterwards: the .py files of the running
interpreter's site-packages and standard library, or (--text DIR) the "text" of every record of the JSONL files
in DIR, for instance the extracted pypi_code corpus (~/.cache/diffgemma_jax/pypi_code/corpus-*), 1.6 GB of code.

  python bench/data_pipeline.py [--json] [--sizes_gb 0.1,1,4] [--workers N] [--tmp DIR] [--text DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import gpu_1b_consumption  # noqa: E402


SHARD_BYTES = 64 << 20


def _source_texts(text_dir: str | None = None):
  """(name, text) of real text: the records of the JSONL files in `text_dir`, else the installed .py files."""
  if text_dir:
    yield from _jsonl_texts(text_dir)
    return
  roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]]
  for root in roots:
    for directory, dirs, files in os.walk(root):
      dirs.sort()
      for name in sorted(files):
        if name.endswith(".py"):
          try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
              text = f.read()
          except (UnicodeDecodeError, OSError):
            continue
          if text.strip():
            yield os.path.relpath(os.path.join(directory, name), root), text


def _jsonl_texts(directory: str):
  for name in sorted(os.listdir(directory)):
    if name.endswith(".jsonl"):
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          text = json.loads(line)["text"]
          if text.strip():
            yield f"{name}:{number}", text


def make_corpus(directory: str, size_bytes: int, text_dir: str | None = None) -> int:
  """JSONL shards of real source files (cycled) until `size_bytes` of text; returns the text bytes written."""
  os.makedirs(directory, exist_ok=True)
  written, shard, shard_bytes, lap = 0, None, 0, 0
  while written < size_bytes:
    for rel, text in _source_texts(text_dir):
      if shard is None or shard_bytes >= SHARD_BYTES:
        if shard:
          shard.close()
        shard = open(os.path.join(directory, f"part-{lap:02d}-{written:013d}.jsonl"), "w", encoding="utf-8")
        shard_bytes = 0
      line = json.dumps({"text": text, "path": f"{lap}/{rel}"}, ensure_ascii=False)
      shard.write(line + "\n")
      size = len(text.encode("utf-8"))
      written += size
      shard_bytes += size
      if written >= size_bytes:
        break
    lap += 1
  shard.close()
  return written


def _peak_child(code: str) -> dict:
  """Runs `code` in a fresh interpreter that prints a JSON dict; adds its peak RSS and its children's (MB)."""
  # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's size before the exec.
  wrapper = (code + "\nimport resource, json as _j\n"
             "_hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
             "print('RESULT', _j.dumps(dict(result, peak_rss_mb=_hwm / 1024, "
             "peak_child_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)))")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env=env, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-3000:])
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


def build_in_child(corpus: str, out: str, tokenizer: str, workers: int) -> dict:
  code = f"""
import resource, time
from data_recipes import build_dataset
start, cpu_start = time.perf_counter(), time.process_time()
m = build_dataset("text_files", {out!r}, None, source={corpus!r}, tokenizer={tokenizer!r}, build_workers={workers})
seconds = time.perf_counter() - start
workers = resource.getrusage(resource.RUSAGE_CHILDREN)  # the build's worker processes, joined by now
cpu = time.process_time() - cpu_start + workers.ru_utime + workers.ru_stime
tokens = sum(m["splits"][s]["tokens"] for s in m["splits"])
result = dict(seconds=seconds, cpu_seconds=cpu, tokens=tokens, bytes=sum(m["splits"][s]["bytes"] for s in m["splits"]))
"""
  return _peak_child(code)


def train_in_child(data_dir: str, workdir: str, vocab: int, corpus: str, tokenizer: str) -> dict:
  code = f"""
import time
from diffgemma_jax.config import load_config
from diffgemma_jax.train import train
config = load_config({os.path.join(REPO, "configs", "pretrain_tiny.py")!r}, {{
    "data.recipe": "text_files", "data.dir": {data_dir!r}, "model.vocab_size": "{vocab}",
    "data.source": {corpus!r}, "data.tokenizer": {tokenizer!r},
    "train.num_steps": "20", "checkpoint.every_steps": "1000", "eval.every_steps": "0", "eval.max_sequences": "8",
    "eval.num_t_samples": "1", "train.log_every_steps": "10"}})
start = time.perf_counter()
summary = train(config, {workdir!r}, show_progress=False)
result = dict(seconds=time.perf_counter() - start)
"""
  return _peak_child(code)


def encode_baseline(corpus: str, tokenizer: str, threads: int, limit_bytes: int) -> dict:
  """sentencepiece's batch encode of the corpus's documents (read beforehand, not timed), `threads` threads."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  texts, size = [], 0
  for name in sorted(os.listdir(corpus)):
    with open(os.path.join(corpus, name), encoding="utf-8") as f:
      for line in f:
        texts.append(json.loads(line)["text"])
        size += len(texts[-1].encode("utf-8"))
        if size >= limit_bytes:
          break
    if size >= limit_bytes:
      break
  start, cpu_start = time.perf_counter(), time.process_time()
  ids = sp.encode(texts, num_threads=threads, out_type="numpy")  # as the build calls it (no Python int per id)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  return {"tokens": sum(len(x) + 2 for x in ids), "seconds": seconds, "cpu_seconds": cpu, "bytes": size}


def build_against_encode(corpus: str, out: str, tokenizer: str, workers: int, text_bytes: int, first_build: dict,
                         rounds: int) -> dict:
  """`rounds` pairs of (build, sentencepiece encode), each pair back to back (the load moves between pairs);
  the ratio of their token rates per pair and the median."""
  pairs = []
  for r in range(rounds):
    if r:
      shutil.rmtree(out)
      build = build_in_child(corpus, out, tokenizer, workers)
    else:
      build = first_build
    base = encode_baseline(corpus, tokenizer, workers, text_bytes)
    pairs.append({"build": build, "encode": base, "load": os.getloadavg(),
                  "ratio": (build["tokens"] / build["seconds"]) / (base["tokens"] / base["seconds"]),
                  "cpu_ratio": base["cpu_seconds"] / build["cpu_seconds"]})
  median = lambda key: sorted(p[key] for p in pairs)[len(pairs) // 2]
  return {"encode_baseline": pairs[0]["encode"], "pairs": pairs, "build_vs_encode": median("ratio"),
          "build_vs_encode_cpu": median("cpu_ratio")}


def input_throughput(data_dir: str, workers: int, seconds: float = 20.0) -> float:
  import jax
  from configs.pretrain_gpu_1b import get_config
  from diffgemma_jax.data import make_train_iterator
  c = get_config()
  seq_len, batch = int(c.train.seq_len), int(c.train.batch_size)
  it = make_train_iterator(data_dir, seq_len=seq_len, batch_size=batch, seed=0, num_workers=workers)
  jax.block_until_ready(jax.device_put(next(it)))  # workers started, first batch out
  start, tokens = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(jax.device_put(next(it)))
    tokens += batch * seq_len
  return tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--sizes_gb", default="0.1,1,4")
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--tmp", default="/tmp/diffgemma_data_bench")
  parser.add_argument("--tiny_tokens_per_s", type=float, default=4900.0,
                      help="pretrain_tiny's training tokens/s on this machine (BENCHMARKS.md main job)")
  parser.add_argument("--input_seconds", type=float, default=20.0)
  parser.add_argument("--memory_only", action="store_true", help="only (c): no encode or input throughput")
  parser.add_argument("--rounds", type=int, default=1, help="(a): build/encode pairs on the smallest corpus; "
                      "the median ratio is reported")
  parser.add_argument("--text", default=None, help="a folder of JSONL files whose records' text makes the corpora "
                      "(default: the installed .py files)")
  args = parser.parse_args(argv)
  from diffgemma_jax.data.tokenizer import train_tokenizer
  os.makedirs(args.tmp, exist_ok=True)
  load_before = os.getloadavg()
  report = {"cores": os.cpu_count(), "workers": args.workers, "load_before": load_before, "text": args.text,
            "sizes": []}
  try:
    sample = [t for _, t in zip(range(400), (text for _, text in _source_texts(args.text)))]
    tokenizer = train_tokenizer(sample, os.path.join(args.tmp, "tokenizer"), 4096, max_sentences=60_000).path
    for gb in (float(x) for x in args.sizes_gb.split(",")):
      corpus, out = os.path.join(args.tmp, f"corpus-{gb}"), os.path.join(args.tmp, f"store-{gb}")
      run_dir = os.path.join(args.tmp, f"run-{gb}")
      try:
        text_bytes = make_corpus(corpus, int(gb * 1e9), args.text)
        build = build_in_child(corpus, out, tokenizer, args.workers)
        entry = {"gb": gb, "text_bytes": text_bytes, "build": build}
        if not report["sizes"] and not args.memory_only:  # throughput on the smallest corpus
          entry.update(build_against_encode(corpus, out, tokenizer, args.workers, text_bytes, build, args.rounds))
          rates = {w: input_throughput(out, w, args.input_seconds) for w in (0, args.workers)}
          gpu = gpu_1b_consumption()
          report["input"] = {"tokens_per_s": rates, "gpu_1b_consumes": gpu,
                             "tiny_consumes": args.tiny_tokens_per_s,
                             "ratio_gpu_1b": {w: r / gpu for w, r in rates.items()},
                             "ratio_tiny": {w: r / args.tiny_tokens_per_s for w, r in rates.items()}}
        entry["train"] = train_in_child(out, run_dir, 4096, corpus, tokenizer)
        report["sizes"].append(entry)
      finally:
        for path in (corpus, out, out + ".partial", run_dir):
          shutil.rmtree(path, ignore_errors=True)
  finally:
    report["load_after"] = os.getloadavg()
  if args.json:
    print(json.dumps(report, indent=1))
    return 0
  print(f"cores {report['cores']}, build workers {args.workers}, load {load_before} -> {report['load_after']}")
  for e in report["sizes"]:
    b, t = e["build"], e["train"]
    print(f"{e['gb']:>5} GB: build {b['tokens'] / b['seconds']:,.0f} tokens/s, peak RSS {b['peak_rss_mb']:.0f} MB "
          f"(largest worker {b['peak_child_rss_mb']:.0f} MB); 20-step train peak RSS {t['peak_rss_mb']:.0f} MB")
    for pair in e.get("pairs", ()):
      b, base = pair["build"], pair["encode"]
      print(f"       build {b['tokens'] / b['seconds']:,.0f} tokens/s, sentencepiece encode "
            f"{base['tokens'] / base['seconds']:,.0f} tokens/s: build/encode {pair['ratio']:.2f}x, in CPU time "
            f"{pair['cpu_ratio']:.2f}x (load {pair['load'][0]:.1f})")
    if "build_vs_encode" in e:
      print(f"       median build/encode {e['build_vs_encode']:.2f}x, in CPU time {e['build_vs_encode_cpu']:.2f}x")
  if "input" in report:
    i = report["input"]
    for w, r in i["tokens_per_s"].items():
      print(f"input, {w} workers: {r:,.0f} tokens/s = {i['ratio_gpu_1b'][w]:.1f}x pretrain_gpu_1b on one H100 "
            f"({i['gpu_1b_consumes']:,.0f} tokens/s), {i['ratio_tiny'][w]:.0f}x pretrain_tiny here")
  return 0


if __name__ == "__main__":
  sys.exit(main())

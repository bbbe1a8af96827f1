"""What a large generation job's prompts take in memory: spooled to disk as they are read and encoded, against
held as Python objects (the previous behaviour).

    python bench/prompts_memory.py [--json] [--prompts 50000] [--chars 500]

A `diffgemma-generate --prompts FILE.jsonl --batch_size 32` job of `--prompts` requests of `--chars` characters
each (real text: the standard library's sources; a third with their own gen_length), run through the real code
(launch/generate.py's `_read_requests`, sampling/requests.py's `generate_completions`, `Generator.run_requests` and
`run_batches`) without a model: the tokenizer is a stand-in that gives one id per 4 characters from a 262k
vocabulary (Gemma's: most ids are Python ints of 28 bytes, as a real tokenizer's), the restore gives no model, and
each batch's `run` returns empty completions. Now: the texts and the ids are spooled (sampling/spool.py). The
baseline is the previous behaviour, made here by swapping the spools for what the code held before: the prompts, a
string naming each one's line and the gen_lengths as lists, each prompt's ids as an int32 array, and the run's
prompts as one list of lists of ints (`[encoded[i].tolist() for i in positions]`). Measured: the peak of Python's
allocations (tracemalloc) over the job, its seconds, and the spool's bytes on disk. The machine's load average before
and after is part of the report (bench/benchlib.py).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
import tempfile
import time
import tracemalloc
import types
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from benchlib import MachineLoad, before_now_report  # noqa: E402

from diffgemma_jax.sampling import requests, spool  # noqa: E402
from diffgemma_jax.sampling.samplers import GenerationOptions  # noqa: E402
from launch import generate  # noqa: E402

BATCH = 32
VOCAB = 262144
TAKE = spool.Take  # the view the baseline swaps out


class StandInTokenizer:
  """One id per 4 characters, from a 262k vocabulary; nothing decodes."""
  bos_id, eos_id, pad_id, mask_id, unk_id = 2, 1, 0, 4, 3

  def encode(self, text: str) -> list[int]:
    return [(hash(text[i:i + 4]) % (VOCAB - 8)) + 8 for i in range(0, len(text), 4)]

  def decode_continuation(self, prefix_ids, ids) -> str:
    return ""


class NoModel(requests.Generator):
  """The real batching (`run_requests`, `run_batches`) around a `run` that returns empty completions."""

  def __init__(self, *args, **kwargs):  # pylint: disable=super-init-not-called
    pass

  def run(self, prompts, options, seeds=None):
    return [{"ids": [], "new_tokens": 0, "prompt_rows": len(p)} for p in prompts]


class ListRows(list):
  """The baseline's ids: each prompt's int32 array in a list."""

  def append(self, ids) -> None:
    super().append(np.asarray(ids, np.int32))

  def lengths(self) -> np.ndarray:
    return np.asarray([len(row) for row in self], np.int64)


def _baseline_take(items, positions):
  """The baseline's run prompts: every position's ids as a list of ints, made at once."""
  if isinstance(items, ListRows):
    return [items[i].tolist() for i in positions]
  return TAKE(items, positions)


def _write_prompts(path: str, count: int, chars: int) -> None:
  root = os.path.dirname(json.__file__).rsplit("/", 1)[0]
  source = "".join(open(p, encoding="utf-8", errors="replace").read() for p in sorted(glob.glob(f"{root}/*.py"))[:60])
  with open(path, "w", encoding="utf-8") as f:
    for i in range(count):
      text = source[(i * 997) % (len(source) - chars - 1):][:chars]
      record = {"prompt": text, **({"gen_length": 64} if i % 3 == 0 else {})}
      f.write(json.dumps(record) + "\n")


def _job(path: str, before: bool) -> dict:
  config = types.SimpleNamespace(objective=types.SimpleNamespace(name="masked", block_size=32),
                                 train=types.SimpleNamespace(seq_len=4096))
  seen = {"results": 0, "rows": 0}

  def keep(index, result):
    seen["results"] += 1
    seen["rows"] += result["prompt_rows"]

  patches = [mock.patch.object(requests, "load_tokenizer", lambda *a: StandInTokenizer()),
             mock.patch.object(requests, "check_workdir", lambda *a, **k: None),
             mock.patch.object(requests, "restore_model_run",
                               lambda *a: (None, types.SimpleNamespace(step=1, weights="params"))),
             mock.patch.object(requests, "Generator", NoModel)]
  if before:
    patches += [mock.patch.object(spool, "TokenRows", lambda *args, **kwargs: ListRows()),
                mock.patch.object(spool, "Take", _baseline_take)]
  with contextlib.ExitStack() as stack:
    for patch in patches:
      stack.enter_context(patch)
    tracemalloc.start()
    start = time.perf_counter()
    prompts, gen_lengths, sources = generate._read_requests(  # pylint: disable=protected-access
        argparse.Namespace(prompt=None, prompts=path))
    if before:
      prompts, gen_lengths, sources = list(prompts), list(gen_lengths), list(sources)
    read = tracemalloc.get_traced_memory()[0]
    requests.generate_completions(config, "unused", prompts, GenerationOptions(gen_length=128), batch_size=BATCH,
                                  gen_lengths=gen_lengths, sources=sources, on_result=keep)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return {"seconds": round(seconds, 2), "peak_mb": round(peak / 2**20, 1), "after_read_mb": round(read / 2**20, 1),
          "requests": seen["results"], "prompt_tokens": seen["rows"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--prompts", type=int, default=50000)
  parser.add_argument("--chars", type=int, default=500)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="prompts_memory_") as folder, MachineLoad() as load:
    path = os.path.join(folder, "prompts.jsonl")
    _write_prompts(path, args.prompts, args.chars)
    rows = {"before": _job(path, before=True), "now": _job(path, before=False)}
    file_mb = os.path.getsize(path) / 2**20
  if rows["before"]["requests"] != rows["now"]["requests"] or rows["before"]["prompt_tokens"] != \
      rows["now"]["prompt_tokens"]:
    raise SystemExit(f"the two jobs ran different requests: {rows}")
  report = before_now_report(rows, load, prompts=args.prompts, chars=args.chars, file_mb=round(file_mb, 1),
                             bytes_per_prompt={name: round(row["peak_mb"] * 2**20 / args.prompts)
                                               for name, row in rows.items()})
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  for name, row in rows.items():
    print(f"{name}: peak {row['peak_mb']} MB ({report['bytes_per_prompt'][name]} bytes a prompt; "
          f"{row['after_read_mb']} MB after reading), {row['seconds']} s")
  print(f"{args.prompts} prompts of {args.chars} characters ({report['file_mb']} MB): {report['peak_ratio']:.3f}x "
        f"the peak, {report['time_ratio']:.2f}x the time")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

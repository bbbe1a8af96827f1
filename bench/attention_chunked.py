"""The `chunked` attention path against the dense `xla` one and against itself without narrowing: memory and time
of a training pass at long rows.

  python bench/attention_chunked.py [--lengths 8192] [--dense_up_to 8192] [--masks window,causal,bidirectional]
                                    [--heads 4] [--kv_heads 2] [--head_dim 64] [--window 1024] [--json]

For each row length and mask, the forward and backward pass (values and the gradients of q, k and v) on this
machine's default device through three paths compiled in one run: `dense` (the reference's [heads, L, L] logits;
only up to --dense_up_to), `full` (chunks of CHUNK queries, each against every key: the chunked path before it
skipped keys, `spans=()`) and `narrow` (the chunked path as it runs: each chunk against the key blocks it can
see). Masks: `window` (one packed causal row of four documents under a sliding window of --window), `causal` (one
causal document) and `bidirectional` (one bidirectional document: every chunk sees every key, so `narrow` must
cost what `full` does). Reported: XLA's own accounting of the temporary memory each compiled pass needs
(`memory_analysis().temp_size_in_bytes`), the median and smallest time of --repeats calls, the ratios narrow / full
and narrow / dense (the paths' calls interleaved in rounds, each ratio the median over rounds of the two paths'
times in the same round, so a change in the machine's load between rounds moves both sides), and the largest
difference of narrow's outputs from dense's (full's where dense is not run).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.model.attention_impl import CHUNK
from pallas_kernels import MaskSpec, attention_reference, chunked_attention


def packed_causal(length: int, window: int) -> MaskSpec:
  """One row of four equal documents, causal within each, with a sliding window."""
  index = jnp.arange(length)
  segments = (index * 4 // length + 1)[None].astype(jnp.int32)
  positions = (index % -(-length // 4))[None].astype(jnp.int32)
  return MaskSpec.packed("causal", segments, positions).with_window(window)


MASKS = {"window": packed_causal,
         "causal": lambda length, window: MaskSpec.single_documents("causal", [length], length),
         "bidirectional": lambda length, window: MaskSpec.single_documents("bidirectional", [length], length)}
PATHS = {"dense": attention_reference,
         "full": lambda q, k, v, spec: chunked_attention(q, k, v, spec, chunk=CHUNK, spans=()),
         "narrow": lambda q, k, v, spec: chunked_attention(q, k, v, spec, chunk=CHUNK)}


def compiled_pass(fn, spec, q, k, v):
  """fn's values and q/k/v gradients, compiled; and its temporary memory in MB."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, spec).astype(jnp.float32))  # noqa: E731
  step = jax.jit(lambda q, k, v: (fn(q, k, v, spec), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
  compiled = step.lower(q, k, v).compile()
  memory = compiled.memory_analysis()
  return compiled, round(memory.temp_size_in_bytes / 2**20, 1) if memory else None


def interleaved_seconds(calls: dict, repeats: int) -> dict:
  """{name: [seconds per round]} of each blocking call, timed in rounds that call each once."""
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return times


def paired_ratio(times: dict, name: str, baseline: str) -> float:
  """The median over rounds of name's time over baseline's in the same round (a load that changes between rounds
  moves both)."""
  return round(float(np.median(np.asarray(times[name]) / np.asarray(times[baseline]))), 2)


def measure(length: int, mask: str, args) -> dict:
  keys = jax.random.split(jax.random.key(length), 3)
  q = jax.random.normal(keys[0], (1, length, args.heads, args.head_dim))
  k, v = (jax.random.normal(key, (1, length, args.kv_heads, args.head_dim)) for key in keys[1:])
  spec = MASKS[mask](length, args.window)
  paths = [name for name in PATHS if name != "dense" or length <= args.dense_up_to]
  compiled, temp_mb, outputs = {}, {}, {}
  for name in paths:
    compiled[name], temp_mb[name] = compiled_pass(PATHS[name], spec, q, k, v)
    outputs[name] = jax.block_until_ready(compiled[name](q, k, v))  # also the warm-up call
  times = interleaved_seconds({name: lambda c=compiled[name]: jax.block_until_ready(c(q, k, v)) for name in paths},
                              args.repeats)
  ms = {name: round(1e3 * float(np.median(t)), 1) for name, t in times.items()}
  ms_min = {name: round(1e3 * min(t), 1) for name, t in times.items()}
  reference = outputs.get("dense", outputs["full"])
  error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(outputs["narrow"]),
                                                               jax.tree.leaves(reference)))
  row = {"length": length, "mask": mask, "temp_mb": temp_mb, "ms": ms, "ms_min": ms_min,
         "narrow_over_full": paired_ratio(times, "narrow", "full"),
         "narrow_over_dense": paired_ratio(times, "narrow", "dense") if "dense" in times else None,
         "max_abs_difference": error, "compared_with": "dense" if "dense" in outputs else "full"}
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="8192")
  p.add_argument("--dense_up_to", type=int, default=8192, help="longest row the dense path runs on")
  p.add_argument("--masks", default="window,causal,bidirectional", help=f"comma-separated, of {sorted(MASKS)}")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--window", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  masks = args.masks.split(",")
  unknown = sorted(set(masks) - set(MASKS))
  if unknown:
    p.error(f"--masks: unknown {unknown}; valid masks are {sorted(MASKS)}")
  load = benchlib.MachineLoad()
  rows = []
  for length in (int(x) for x in args.lengths.split(",")):
    for mask in masks:
      row = measure(length, mask, args)
      rows.append(row)
      if not args.json:
        print(f"L={length} {mask}: median ms {row['ms']}, smallest {row['ms_min']}, temporaries MB "
              f"{row['temp_mb']}; narrow/full "
              f"x{row['narrow_over_full']}, narrow/dense x{row['narrow_over_dense']} (max |diff| from "
              f"{row['compared_with']} {row['max_abs_difference']:.2e})", flush=True)
  report = {"commit": benchlib.commit(), "device": jax.devices()[0].device_kind, "chunk": CHUNK,
            "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "window": args.window,
            "rows": rows, **load.report()}
  if args.json:
    print(json.dumps(report, indent=1, default=float))
  else:
    print(load.line())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""The `chunked` attention path against the dense `xla` one: memory and time of a training pass at long rows.

  python bench/attention_chunked.py [--lengths 2048,4096,8192] [--heads 4] [--kv_heads 2] [--head_dim 64] [--json]

For each row length, the forward and backward pass (values and the gradients of q, k and v) of one packed causal
row of four documents under a sliding window of --window, on this machine's default device, compiled for both
paths in one run: XLA's own accounting of the temporary memory the compiled pass needs
(`memory_analysis().temp_size_in_bytes`, which the dense path's [heads, L, L] logits dominate) and the median
time of --repeats calls. The ratios are chunked over dense; the outputs are compared too.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.model.attention_impl import CHUNK
from pallas_kernels import MaskSpec, attention_reference, chunked_attention


def packed_causal(length: int, window: int) -> MaskSpec:
  """One row of four equal documents, causal within each, with a sliding window."""
  index = jnp.arange(length)
  segments = (index * 4 // length + 1)[None].astype(jnp.int32)
  positions = (index % -(-length // 4))[None].astype(jnp.int32)
  return MaskSpec.packed("causal", segments, positions).with_window(window)


def measure(fn, spec, q, k, v, repeats: int) -> tuple[dict, tuple]:
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, spec).astype(jnp.float32))  # noqa: E731
  step = jax.jit(lambda q, k, v: (fn(q, k, v, spec), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
  compiled = step.lower(q, k, v).compile()
  memory = compiled.memory_analysis()
  out = jax.block_until_ready(compiled(q, k, v))
  seconds, _ = benchlib.median_seconds(lambda: jax.block_until_ready(compiled(q, k, v)), warmup=0, runs=repeats)
  return {"temp_mb": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
          "ms": round(1e3 * seconds, 1)}, out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="2048,4096,8192")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--window", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  load = benchlib.MachineLoad()
  rows = []
  for length in (int(x) for x in args.lengths.split(",")):
    keys = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(keys[0], (1, length, args.heads, args.head_dim))
    k, v = (jax.random.normal(key, (1, length, args.kv_heads, args.head_dim)) for key in keys[1:])
    spec = packed_causal(length, args.window)
    dense, dense_out = measure(attention_reference, spec, q, k, v, args.repeats)
    chunked, chunked_out = measure(lambda *a: chunked_attention(*a, chunk=CHUNK), spec, q, k, v, args.repeats)
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(chunked_out),
                                                                 jax.tree.leaves(dense_out)))
    row = {"length": length, "dense": dense, "chunked": chunked, "max_abs_difference": error,
           "memory_ratio": round(chunked["temp_mb"] / dense["temp_mb"], 3) if dense["temp_mb"] else None,
           "time_ratio": round(chunked["ms"] / dense["ms"], 2)}
    rows.append(row)
    if not args.json:
      print(f"L={length}: dense {dense['temp_mb']} MB temporaries, {dense['ms']} ms; chunked {chunked['temp_mb']} "
            f"MB, {chunked['ms']} ms (memory x{row['memory_ratio']}, time x{row['time_ratio']}; max |diff| "
            f"{error:.2e})", flush=True)
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

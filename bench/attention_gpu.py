"""Attention benchmark: forward and forward+backward TFLOP/s and peak memory of every attention implementation
on DiffusionGemma's layer shapes, per mask, all in one run.

  python bench/attention_gpu.py [--json OUT.json]                 # GPU: 8192, 2048 and 32768 tokens
  python bench/attention_gpu.py --small --interpret --runs 2      # CPU smoke run (the tests do this)

Layers: `sliding` (16 query heads, 8 key heads, head dim 256, window 1024) and `global` (16 query heads, 2 key
heads, head dim 512; K = V shares the projection, the kernel still reads two arrays: keys are normalised and
rotated, values only normalised). Masks: `causal` (one document per row: the mask library kernels support),
`bidirectional_packed` (rows packed with documents of random lengths) and `block_diffusion` (the block objectives'
[canvas ; clean] layout of a packed row: 2 x the row's tokens attend, canvas blocks of --block_size). Sliding
layers add their window (to causal queries only for library kernels, which support no other window).

Useful FLOPs count only visible (query, key) pairs P (`pallas_kernels.count_visible`): forward 4 * P * heads *
head_dim, forward+backward 3 x that (the backward's four matmuls; recomputation is not useful work). TFLOP/s is
useful FLOPs over the median of --runs timed calls. Peak memory is XLA's estimate for the compiled program
(arguments + outputs + temporaries), so an implementation that cannot fit on the card is reported with what it
would need instead of being run. Implementations:
  pallas          ours (pallas_kernels.flash_attention): every mask, fully masked tiles skipped
  pallas_mosaic   the same kernel on Pallas Mosaic GPU (pallas_kernels.flash_attention_mosaic; Hopper, bf16); each
                  row's `mosaic_over_triton` is pallas ms / pallas_mosaic ms per direction (> 1: Mosaic faster)
  xla             dense [B, heads, L, S] float32 logits (the model's reference path)
  cudnn           jax.nn.dot_product_attention(implementation='cudnn'), where the mask fits (causal rows)
  tokamax_mosaic, tokamax_triton   tokamax.dot_product_attention, where importable and the mask fits
  ceiling         one dense bf16 matmul's FLOP/s on this card: the rate the useful FLOPs could run at
Each implementation's output is checked against xla's (where xla fits) before it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchlib  # pylint: disable=wrong-import-position
from diffgemma_jax.model.attention_impl import cudnn_arguments  # pylint: disable=wrong-import-position
from pallas_kernels import (MaskSpec, attention_reference, choose_attention_tiling, count_visible,  # pylint: disable=wrong-import-position
                            flash_attention, flash_attention_mosaic, tile_visits)

MASKS = ("block_diffusion", "causal", "bidirectional_packed")
CHECK_TOLERANCE = 3e-2  # of the largest reference value: bfloat16 outputs


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  num_heads: int
  num_kv_heads: int
  head_dim: int
  window: int  # 0: none


LAYERS = (Layer("global", 16, 2, 512, 0), Layer("sliding", 16, 8, 256, 1024))
SMALL_LAYERS = (Layer("global", 4, 1, 64, 0), Layer("sliding", 4, 2, 32, 32))


def packed_rows(batch_size: int, length: int, seed: int):
  """(segment ids, positions) of rows packed with documents of random lengths (mean about length / 4)."""
  rng = np.random.default_rng(seed)
  segments = np.zeros((batch_size, length), np.int32)
  positions = np.zeros((batch_size, length), np.int32)
  for row in range(batch_size):
    start, segment = 0, 1
    while start < length:
      n = min(int(rng.integers(max(1, length // 16), max(2, length // 2))), length - start)
      segments[row, start:start + n] = segment
      positions[row, start:start + n] = np.arange(n)
      start, segment = start + n, segment + 1
  return jnp.asarray(segments), jnp.asarray(positions)


def make_spec(mask: str, layer: Layer, batch_size: int, length: int, block_size: int) -> MaskSpec:
  if mask == "causal":
    spec = MaskSpec.single_documents("causal", jnp.full((batch_size,), length), length)
  elif mask == "bidirectional_packed":
    spec = MaskSpec.packed("bidirectional", *packed_rows(batch_size, length, seed=length))
  elif mask == "block_diffusion":
    segments, positions = packed_rows(batch_size, length, seed=length)
    blocks = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) // block_size, segments.shape)
    spec = MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks)
  else:
    raise ValueError(f"mask={mask!r}: expected one of {MASKS}")
  return spec.with_window(layer.window)


# --- implementations: (q, k, v, spec) -> out, or a reason they cannot run this mask ---

def implementations(interpret: bool, tiling):
  # xla first: it is the reference the others are checked against.
  impls = {"xla": lambda q, k, v, spec: attention_reference(q, k, v, spec),
           "pallas": lambda q, k, v, spec: flash_attention(q, k, v, spec, tiling=tiling, interpret=interpret)}
  on_gpu = jax.default_backend() == "gpu"
  capability = str(getattr(jax.devices()[0], "compute_capability", "")) if on_gpu else ""
  impls["pallas_mosaic"] = ("Hopper (sm_90) only" if on_gpu and not capability.startswith("9.") else
                            lambda q, k, v, spec: flash_attention_mosaic(q, k, v, spec, interpret=interpret))

  def library(call):
    def run(q, k, v, spec):
      kwargs = cudnn_arguments(spec)
      return call(q, k, v, **kwargs)
    return run

  impls["cudnn"] = (library(lambda q, k, v, **kw: jax.nn.dot_product_attention(
      q, k, v, scale=1.0, implementation="cudnn", **kw)) if on_gpu else "GPU only")
  try:
    tokamax = benchlib.import_tokamax()
  except Exception as e:  # pylint: disable=broad-except  (ImportError, or a dependency of another version)
    tokamax = f"not importable: {type(e).__name__}: {str(e)[:200]}"
  for name in ("mosaic", "triton"):
    if isinstance(tokamax, str):
      impls[f"tokamax_{name}"] = tokamax
    elif not on_gpu:
      impls[f"tokamax_{name}"] = "GPU only"
    else:
      impls[f"tokamax_{name}"] = library(lambda q, k, v, _name=name, **kw: tokamax.dot_product_attention(
          q, k, v, scale=1.0, implementation=_name, **kw))
  return impls


def fits(name: str, spec: MaskSpec) -> str | None:
  """None where implementation `name` can compute `spec`, else why not."""
  if (name == "cudnn" or name.startswith("tokamax")) and cudnn_arguments(spec) is None:
    return "mask not supported (segments, blocks, canvas or a two-sided window)"
  return None


def peak_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
             - analysis.alias_size_in_bytes)


def device_memory_bytes() -> int | None:
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def measure(fn, args, *, runs: int, warmup: int, max_seconds: float, memory_limit):
  """{peak_gb, ms, runs} of jit(fn)(*args), or {peak_gb, skipped} when it would not fit; (result, output)."""
  compiled = jax.jit(fn).lower(*args).compile()
  peak = peak_bytes(compiled)
  result = {"peak_gb": None if peak is None else peak / 1e9}
  if memory_limit and peak and peak > memory_limit:
    result["skipped"] = f"needs {peak / 1e9:.1f} GB of the card's {memory_limit / 1e9:.1f} GB"
    return result, None
  out = jax.block_until_ready(compiled(*args))
  seconds, timed = benchlib.median_seconds(lambda: jax.block_until_ready(compiled(*args)), warmup=warmup,
                                           runs=runs, max_seconds=max_seconds)
  result.update(ms=seconds * 1e3, runs=timed)
  return result, out


def ceiling_tflops(args) -> float:
  """FLOP/s of one dense bf16 matmul (the card's practical matmul rate), in TFLOP/s."""
  n = 512 if args.small else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  seconds, _ = benchlib.median_seconds(lambda: jax.block_until_ready(matmul(a)), warmup=args.warmup,
                                       runs=args.runs)
  return 2 * n ** 3 / seconds / 1e12


def run_case(layer: Layer, mask: str, length: int, impls, args, ceiling: float, memory_limit) -> dict:
  batch_size = max(1, args.tokens_per_batch // length)
  spec = make_spec(mask, layer, batch_size, length, args.block_size)
  T = spec.q.length  # 2 x length for the [canvas ; clean] layout
  keys = jax.random.split(jax.random.key(length), 4)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)  # noqa: E731
  q = normal(keys[0], (batch_size, T, layer.num_heads, layer.head_dim))
  k = normal(keys[1], (batch_size, T, layer.num_kv_heads, layer.head_dim))
  v = normal(keys[2], (batch_size, T, layer.num_kv_heads, layer.head_dim))
  cotangent = normal(keys[3], q.shape)
  pairs = int(jnp.sum(jax.jit(count_visible)(spec)))
  forward_flops = 4.0 * pairs * layer.num_heads * layer.head_dim
  tiling = choose_attention_tiling("forward", layer.head_dim, jnp.bfloat16, T * layer.num_heads // layer.num_kv_heads,
                                   T, override=args.tiling)
  visited = jax.jit(lambda s: jnp.sum(tile_visits(s, tiling.block_q, tiling.block_k,
                                                  rows_per_query=layer.num_heads // layer.num_kv_heads)))(spec)
  row = {"layer": layer.name, "mask": mask, "row_tokens": length, "attention_tokens": T, "batch_size": batch_size,
         **dataclasses.asdict(layer), "visible_pairs": pairs, "visible_fraction": pairs / (batch_size * T * T),
         "forward_tile": [tiling.block_q, tiling.block_k],
         "visited_tile_fraction_of_work": int(visited) * tiling.block_q * tiling.block_k
         / (pairs * layer.num_heads // layer.num_kv_heads),
         "useful_gflop": {"forward": forward_flops / 1e9, "forward_backward": 3 * forward_flops / 1e9},
         "ceiling_tflops": ceiling}
  reference = None
  for name, impl in impls.items():
    if isinstance(impl, str) or fits(name, spec):
      row[name] = {"skipped": impl if isinstance(impl, str) else fits(name, spec)}
      continue
    result = {}
    try:
      forward = lambda q, k, v, spec, impl=impl: impl(q, k, v, spec)  # noqa: E731
      both = lambda q, k, v, spec, impl=impl: jax.vjp(lambda q, k, v: impl(q, k, v, spec), q, k, v)[1](cotangent)  # noqa: E731
      for direction, fn, flops in (("forward", forward, forward_flops), ("forward_backward", both, 3 * forward_flops)):
        measured, out = measure(fn, (q, k, v, spec), runs=args.runs, warmup=args.warmup,
                                max_seconds=args.max_seconds_per_measurement, memory_limit=memory_limit)
        if "ms" in measured:
          measured["tflops"] = flops / measured["ms"] / 1e9
          measured["of_ceiling"] = measured["tflops"] / ceiling
        if direction == "forward" and out is not None:
          if name == "xla":
            reference = out
          elif reference is not None:
            measured["max_rel_error"] = _error(out, reference, spec)
            measured["ok"] = measured["max_rel_error"] <= CHECK_TOLERANCE
          measured.setdefault("ok", bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))))
        result[direction] = measured
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row[name] = result
  ratio = {}
  for direction in ("forward", "forward_backward"):
    triton, mosaic = (row.get(name, {}).get(direction, {}).get("ms") for name in ("pallas", "pallas_mosaic"))
    if triton and mosaic:
      ratio[direction] = triton / mosaic
  if ratio:
    row["mosaic_over_triton"] = ratio
  return row


def _error(out, reference, spec) -> float:
  """Largest difference on real queries (library kernels mask padding queries out), relative to the largest
  reference value."""
  real = (spec.q.segment_ids > 0)[:, :, None, None]
  diff = jnp.where(real, jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32)), 0.0)
  return float(jnp.max(diff) / jnp.maximum(jnp.max(jnp.abs(reference.astype(jnp.float32))), 1e-30))


def print_row(row, names):
  cells = []
  for name in names:
    result = row.get(name, {})
    if "skipped" in result or "error" in result:
      cells.append(f"{name}: {(result.get('skipped') or result.get('error'))[:40]}")
      continue
    parts = []
    for direction in ("forward", "forward_backward"):
      r = result.get(direction, {})
      parts.append(f"{r['tflops']:.3g}" if "tflops" in r else (r.get("skipped", "?")[:30]))
    ok = "" if result.get("forward", {}).get("ok", True) else " WRONG"
    peak = result.get("forward_backward", {}).get("peak_gb")
    cells.append(f"{name}: {parts[0]} / {parts[1]} TFLOP/s{ok}" + (f", {peak:.2f} GB" if peak is not None else ""))
  if "mosaic_over_triton" in row:
    cells.append("mosaic/triton speed " + " / ".join(f"{row['mosaic_over_triton'].get(d, float('nan')):.2f}"
                                                     for d in ("forward", "forward_backward")))
  print(f"{row['layer']:8s} {row['mask']:21s} {row['row_tokens']:6d} tokens (B={row['batch_size']}, visible "
        f"{row['visible_fraction']:.3f}, tiles/useful {row['visited_tile_fraction_of_work']:.2f}): "
        + "; ".join(cells), flush=True)


def run(args) -> dict:
  layers = [layer for layer in (SMALL_LAYERS if args.small else LAYERS) if layer.name in args.layers.split(",")]
  impls = implementations(args.interpret, args.tiling)
  if args.impls:
    impls = {name: impl for name, impl in impls.items() if name in args.impls.split(",")}
  memory_limit = device_memory_bytes()
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": benchlib.commit(), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "device_memory_gb": memory_limit and memory_limit / 1e9,
            "interpret": args.interpret, "runs": args.runs, "warmup": args.warmup, "block_size": args.block_size,
            "tiling": args.tiling, "implementations": list(impls), "flops_definition": "forward 4 * visible pairs * heads * head_dim; "
                                                       "forward_backward 3x", "results": []}
  with benchlib.MachineLoad() as load:
    report["ceiling_tflops"] = ceiling = ceiling_tflops(args)
    print(f"dense bf16 matmul: {ceiling:.4g} TFLOP/s; cells: forward / forward+backward useful TFLOP/s, "
          f"peak memory of forward+backward", flush=True)
    started = time.perf_counter()
    for length in (int(x) for x in args.lengths.split(",")):
      for mask in args.masks.split(","):
        for layer in layers:
          if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
            report["results"].append({"layer": layer.name, "mask": mask, "row_tokens": length,
                                      "skipped": f"time budget of {args.time_budget_s}s spent"})
            continue
          row = run_case(layer, mask, length, impls, args, ceiling, memory_limit)
          report["results"].append(row)
          print_row(row, list(impls))
          if args.json:
            pathlib.Path(args.json).write_text(json.dumps(report, indent=1))  # partial results survive a kill
  report.update(load.report(), wall_s=time.perf_counter() - started)
  print(load.line())
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  return report


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", nargs="?", const="attention_gpu.json", default=None, help="write the report here")
  parser.add_argument("--interpret", action="store_true", help="run our kernels in Pallas interpret mode")
  parser.add_argument("--small", action="store_true", help="small layers (with --interpret on CPU)")
  parser.add_argument("--lengths", default="8192,2048,32768", help="row lengths in tokens, in the order run")
  parser.add_argument("--masks", default=",".join(MASKS))
  parser.add_argument("--layers", default="global,sliding")
  parser.add_argument("--impls", default="", help="comma-separated implementations (default all)")
  parser.add_argument("--tokens_per_batch", type=int, default=16384, help="batch = max(1, this / row length)")
  parser.add_argument("--block_size", type=int, default=64, help="canvas block of the block_diffusion mask")
  parser.add_argument("--tiling", default="", help="ours: BLOCK_Q,BLOCK_K for both passes (default: the table)")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--max-seconds-per-measurement", type=float, default=5.0)
  parser.add_argument("--time-budget-s", type=float, default=0.0, help="skip remaining cases after this long")
  args = parser.parse_args(argv)
  args.tiling = tuple(int(x) for x in args.tiling.split(",")) if args.tiling else None
  if args.small and args.tokens_per_batch == 16384:
    args.tokens_per_batch = 128
  return args


def main(argv=None) -> int:
  report = run(parse_args(argv))
  wrong = [(r["layer"], r["mask"], r["row_tokens"], name) for r in report["results"]
           for name in report["implementations"] if r.get(name, {}).get("forward", {}).get("ok") is False]
  if wrong:
    print(f"results that failed the check against xla: {wrong}")
  return 1 if any(w[3] in ("pallas", "pallas_mosaic") for w in wrong) else 0


if __name__ == "__main__":
  sys.exit(main())

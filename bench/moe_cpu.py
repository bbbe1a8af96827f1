"""Routed-expert (MoE FFN) forward+backward throughput per dispatch backend, against a dense matmul of equal FLOPs.

python bench/moe_cpu.py [--json] [--shapes tiny,medium,large] [--backends dense,ragged,sorted] [--repeats N]

For each shape (T tokens, D model width, E experts, top-K, expert width F) and backend this times the jitted
value-and-grad of a linear functional of `routed_experts` with respect to x and both expert weights. Active FLOPs
are 3 * 2*T*K*D*3F (gate, up and down on the routed rows; backward twice the forward). The baseline is a plain
[T*K, D] x [D, 3F] matmul, forward and backward (grads of both operands), which does the same FLOPs. Each
backend's runs alternate with baseline runs so both see the same load on a shared machine. Reported: median
time after compile and warm-up, active FLOP/s, and the ratio to the baseline's FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.model.dispatch import routed_experts

SHAPES = {  # name: (T, D, E, K, F)
    "tiny": (1024, 128, 8, 2, 128),  # the tiny config's MoE layer at batch 8 x 128
    "medium": (2048, 256, 16, 2, 256),
    "large": (4096, 512, 32, 4, 256),
}


def active_flops(T, D, E, K, F) -> float:
  del E
  return 3 * 2 * T * K * D * 3 * F


def _seconds(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _paired_medians(fn, args, baseline, baseline_args, repeats: int, budget_s: float) -> tuple[float, float]:
  """Median seconds of `fn` and of `baseline`, timed alternately so both see the same machine load.

  Slow functions get fewer repeats (at least 3) so that one measurement stays within about `budget_s`.
  """
  for _ in range(2):  # compile, then warm up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(baseline(*baseline_args))
  first = _seconds(fn, args)
  repeats = max(3, min(repeats, int(budget_s / max(first, 1e-6))))
  times, baseline_times = [first], [_seconds(baseline, baseline_args)]
  for _ in range(repeats - 1):
    times.append(_seconds(fn, args))
    baseline_times.append(_seconds(baseline, baseline_args))
  return float(np.median(times)), float(np.median(baseline_times))


def random_routing(key, T, E, K):
  """Distinct top-k ids per token drawn from softmax-like skewed router logits, and normalised weights."""
  logits = jax.random.normal(key, (T, E))
  weights, ids = jax.lax.top_k(jax.nn.softmax(logits), K)
  return ids.astype(jnp.int32), weights / jnp.sum(weights, axis=-1, keepdims=True)


def matmul_step(T, D, E, K, F):
  """A [T*K, D] x [D, 3F] matmul, value and grads of both operands: the routed experts' active FLOPs."""
  del E
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  a = jax.random.normal(k1, (T * K, D))
  b = jax.random.normal(k2, (D, 3 * F))
  probe = jax.random.normal(k3, (T * K, 3 * F))
  step = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(probe * (a @ b)), argnums=(0, 1)))
  return step, (a, b)


def moe_step(backend: str, T, D, E, K, F):
  """Value and grads (x and both expert weights) of a random linear functional of `routed_experts`.

  Routing is an argument of the jitted step, so XLA cannot constant-fold the sort.
  """
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (T, D))
  ids, combine = random_routing(keys[1], T, E, K)
  w_gate_up = jax.random.normal(keys[2], (E, D, 2 * F)) * D ** -0.5
  w_down = jax.random.normal(keys[3], (E, F, D)) * F ** -0.5
  probe = jax.random.normal(keys[4], (T, D))

  def loss(x, w_gate_up, w_down, ids, combine):
    return jnp.sum(probe * routed_experts(x, ids, combine, w_gate_up, w_down, backend=backend))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return step, (x, w_gate_up, w_down, ids, combine)


def run(shapes, backends, repeats: int, budget_s: float) -> list[dict]:
  rows = []
  for name in shapes:
    T, D, E, K, F = SHAPES[name]
    flops = active_flops(T, D, E, K, F)
    baseline, baseline_args = matmul_step(T, D, E, K, F)
    times = {}
    for backend in backends:
      step, args = moe_step(backend, T, D, E, K, F)
      times[backend] = _paired_medians(step, args, baseline, baseline_args, repeats, budget_s)
    for backend, (seconds, matmul_s) in times.items():
      row = {"shape": name, "T": T, "D": D, "E": E, "K": K, "F": F, "backend": backend,
             "time_ms": 1e3 * seconds, "active_gflops": flops / seconds / 1e9,
             "matmul_ms": 1e3 * matmul_s, "matmul_gflops": flops / matmul_s / 1e9, "vs_matmul": matmul_s / seconds}
      if backend == "sorted" and "ragged" in times:
        row["sorted_vs_ragged"] = times["ragged"][0] / seconds
      rows.append(row)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--backends", default="dense,ragged,sorted")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--budget_s", type=float, default=20.0, help="fewer repeats for slower backends")
  args = parser.parse_args(argv)
  shapes = [s for s in args.shapes.split(",") if s]
  unknown = [s for s in shapes if s not in SHAPES]
  if unknown:
    parser.error(f"--shapes: unknown {unknown}; known shapes are {list(SHAPES)}")
  load = benchlib.MachineLoad()
  rows = run(shapes, [b for b in args.backends.split(",") if b], args.repeats, args.budget_s)
  meta = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "repeats": args.repeats, **load.report()}
  if args.json:
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0
  print(f"jax {meta['jax']} on {meta['device']}; fwd+bwd, median of up to {args.repeats} runs, each "
        "alternating with the matmul baseline")
  print(load.line())
  header = "| shape (T, D, E, K, F) | backend | ms | active GFLOP/s | matmul GFLOP/s | vs matmul | sorted/ragged |"
  print(header)
  print("|---|---|---:|---:|---:|---:|---:|")
  for r in rows:
    speedup = f"{r['sorted_vs_ragged']:.1f}x" if "sorted_vs_ragged" in r else ""
    print(f"| {r['shape']} ({r['T']}, {r['D']}, {r['E']}, {r['K']}, {r['F']}) | {r['backend']} | "
          f"{r['time_ms']:.2f} | {r['active_gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['vs_matmul']:.2f} | "
          f"{speedup} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

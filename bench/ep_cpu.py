"""All-to-all expert-parallel dispatch overhead on 8 fake CPU devices, as a ratio to local dispatch.

  python bench/ep_cpu.py [--backend sorted] [--runs 10]

Both sides run the routed GeGLU (value and gradients w.r.t. x and both expert weights) for the same T tokens split
over 8 devices, under one jit:
  local  each device runs `dispatch.routed_experts` on its tokens with every expert's weights (data parallel);
  EP     `parallel.expert.expert_parallel_routed_experts` on a 1x1x8 expert mesh: pack per destination, all_to_all,
         grouped compute of the shard's E/8 experts, all_to_all back, combine.
The fake devices share the machine's cores, so the ratio measures EP's extra work (packing, capacity padding,
the exchange copies), not interconnect time; a multi-GPU number is future work.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402  (the device count is fixed when jax starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import benchlib  # noqa: E402  (bench/, the script's folder, is on sys.path)
from diffgemma_jax.model import dispatch  # noqa: E402
from diffgemma_jax.parallel import make_mesh  # noqa: E402
from diffgemma_jax.parallel.expert import expert_parallel_routed_experts, shard_map  # noqa: E402


def problem(T, D, E, K, F, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(T, E)) + 0.5 * rng.normal(size=(1, E))  # mildly unbalanced, like a trained router
  ids = np.argsort(-logits, axis=1)[:, :K].astype(np.int32)
  return (jnp.asarray(rng.normal(size=(T, D)), jnp.float32), jnp.asarray(ids),
          jnp.asarray(rng.uniform(0.2, 1.0, (T, K)), jnp.float32),
          jnp.asarray(rng.normal(size=(E, D, 2 * F)) / D ** 0.5, jnp.float32),
          jnp.asarray(rng.normal(size=(E, F, D)) / F ** 0.5, jnp.float32))


def value_and_grads(fn):
  def loss(x, ids, w, wgu, wd):
    return jnp.sum(jnp.square(fn(x, ids, w, wgu, wd)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4)))


def timed(f, args, runs):
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--backend", default="sorted")
  parser.add_argument("--runs", type=int, default=10)
  args = parser.parse_args()
  if args.runs < 1:
    parser.error(f"--runs must be >= 1, got {args.runs}")
  mesh = make_mesh((1, 1, 8, 1))
  rows = P(("data", "fsdp", "expert"))

  def local(x, ids, w, wgu, wd):
    body = lambda x, ids, w, wgu, wd: dispatch.routed_experts(x, ids, w, wgu, wd, backend=args.backend)  # noqa
    return shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, P(), P()), out_specs=rows, check_vma=False)(
        x, ids, w, wgu, wd)

  load = benchlib.MachineLoad()
  print(f"jax {jax.__version__}, {jax.device_count()} fake CPU devices, backend {args.backend}")
  print("| shape (T, D, E, K, F) | setting | local ms | EP ms | EP / local | dropped |")
  print("|---|---|---:|---:|---:|---:|")
  for T, D, E, K, F in [(2048, 128, 8, 2, 128), (4096, 256, 32, 4, 128)]:
    data = problem(T, D, E, K, F)
    data = tuple(jax.device_put(a, NamedSharding(mesh, rows if i < 3 else P())) for i, a in enumerate(data))
    t_local = timed(value_and_grads(local), data, args.runs)
    for name, kw in [("capacity 1.25", dict(capacity_factor=1.25)), ("capacity 2.0", dict(capacity_factor=2.0)),
                     ("dropless", dict(dropless=True))]:
      def ep(x, ids, w, wgu, wd, kw=kw):
        return expert_parallel_routed_experts(x, ids, w, wgu, wd, mesh=mesh, backend=args.backend,
                                              compute_dtype=jnp.float32, **kw)[0]
      dropped = int(jax.jit(lambda *a, kw=kw: expert_parallel_routed_experts(
          *a, mesh=mesh, backend=args.backend, compute_dtype=jnp.float32, **kw)[1])(*data))
      t_ep = timed(value_and_grads(ep), data, args.runs)
      print(f"| ({T}, {D}, {E}, {K}, {F}) | {name} | {t_local * 1e3:.1f} | {t_ep * 1e3:.1f} | "
            f"{t_ep / t_local:.2f} | {dropped / (T * K):.1%} |", flush=True)
  print(load.line())


if __name__ == "__main__":
  main()

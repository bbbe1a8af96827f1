"""What running kernels per shard and splitting rows over `context` save, per device, from XLA's compiled programs.

python bench/per_shard.py [--json] [--seq_len 4096]

Runs on 8 fake CPU devices (it sets XLA_FLAGS itself). Nothing here is timed: the numbers are XLA's cost analysis
(FLOPs and bytes accessed per device) and memory analysis (temporary buffers per device) of the compiled programs,
which the machine's load cannot move. Loop bodies (the sorted backend's tile loop, the scan over layers) count once
in the cost analysis, the same for both sides of each ratio.

1. Grouped MoE dispatch on an 8-way data-parallel mesh, under GSPMD (what the model ran before
   `parallel/per_shard.py`) against per token shard: the routed-experts call alone and a whole train step
   (pretrain_tiny's model, batch 8 x 256, `model.dispatch` ragged and sorted).
2. Context parallelism: the train step on one row of `--seq_len` tokens on one device against the same row split
   over an 8-way `context` axis: temporary memory and FLOPs per device (`xla` attention and `ragged` dispatch,
   programs without loops, so that the cost analysis counts all of the work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from jax.sharding import NamedSharding  # noqa: E402  pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # noqa: E402  pylint: disable=wrong-import-position

import benchlib  # noqa: E402  pylint: disable=wrong-import-position  (bench/ is on sys.path)
from diffgemma_jax.config import load_config  # noqa: E402  pylint: disable=wrong-import-position
from diffgemma_jax.model import dispatch  # noqa: E402  pylint: disable=wrong-import-position
from diffgemma_jax.parallel import make_mesh, per_shard  # noqa: E402  pylint: disable=wrong-import-position
from diffgemma_jax.train import compile_train_step, synthetic_batch  # noqa: E402  pylint: disable=wrong-import-position

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain_tiny.py")


def _costs(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
          "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0))}


class _GspmdDispatch:
  """Within the block, the model's placement dispatches the grouped backends under GSPMD (the old path)."""

  def __enter__(self):
    self._saved = per_shard.dispatches_token_parallel
    per_shard.dispatches_token_parallel = lambda *args: False
    jax.clear_caches()

  def __exit__(self, *exc):
    per_shard.dispatches_token_parallel = self._saved
    jax.clear_caches()


def routed_experts_costs(backend: str, T=8192, D=256, E=16, K=2, F=256) -> dict:
  mesh = make_mesh((8, 1, 1, 1))
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  sds = jax.ShapeDtypeStruct
  args = (sds((T, D), jnp.float32), sds((T, K), jnp.int32), sds((T, K), jnp.float32), sds((E, D, 2 * F), jnp.float32),
          sds((E, F, D), jnp.float32))
  shardings = (rows, rows, rows, rep, rep)
  gspmd = lambda *a: dispatch.routed_experts(*a, backend=backend, compute_dtype=jnp.float32)  # noqa: E731
  ours = lambda *a: per_shard.token_parallel_routed_experts(  # noqa: E731
      *a, mesh=mesh, backend=backend, compute_dtype=jnp.float32)
  out = {}
  for name, fn in (("gspmd", gspmd), ("per_shard", ours)):
    out[name] = _costs(jax.jit(fn, in_shardings=shardings, out_shardings=rows).lower(*args).compile())
  return out


def _step_costs(overrides: dict, mesh, batch) -> dict:
  config = load_config(CONFIG, overrides)
  compiled = compile_train_step(config, mask_id=4, mesh=mesh)
  placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=compiled.batch_sharding), batch)
  lowered = compiled.step.lower(compiled.abstract_state, placed, jax.random.key(0), *compiled.decay_args())
  return _costs(lowered.compile())


def train_step_dispatch_costs(backend: str) -> dict:
  mesh = make_mesh((8, 1, 1, 1))
  overrides = {"model.dispatch": backend, "train.batch_size": "8", "train.seq_len": "256"}
  batch = synthetic_batch(8, 256, 512)
  with _GspmdDispatch():
    gspmd = _step_costs(overrides, mesh, batch)
  return {"gspmd": gspmd, "per_shard": _step_costs(overrides, mesh, batch)}


def context_parallel_costs(seq_len: int) -> dict:
  # No loop in the program (dense attention logits, ragged dispatch), so the cost analysis counts all the work.
  overrides = {"train.batch_size": "1", "train.seq_len": str(seq_len), "model.attention_impl": "xla",
               "model.dispatch": "ragged", "mesh.axes": '("data", "context")'}
  batch = synthetic_batch(1, seq_len, 512)
  one = _step_costs(dict(overrides, **{"mesh.shape": "(1, 1)"}),
                    make_mesh((1, 1), ("data", "context"), devices=jax.devices()[:1]), batch)
  eight = _step_costs(dict(overrides, **{"mesh.shape": "(1, 8)"}), make_mesh((1, 8), ("data", "context")), batch)
  return {"one_device": one, "context8": eight}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--seq_len", type=int, default=4096)
  args = parser.parse_args(argv)
  load = benchlib.MachineLoad()
  result = {"commit": benchlib.commit(), "jax": jax.__version__, "devices": jax.device_count()}
  for backend in ("ragged", "sorted"):
    result[f"routed_experts_{backend}"] = routed_experts_costs(backend)
    result[f"train_step_{backend}"] = train_step_dispatch_costs(backend)
  result["context_parallel"] = context_parallel_costs(args.seq_len)
  result.update(load.report())
  if args.json:
    print(json.dumps(result, indent=1))
    return 0
  print(f"commit {result['commit']}, jax {result['jax']}, {result['devices']} fake CPU devices")
  for name, pair in result.items():
    if not isinstance(pair, dict) or len(pair) != 2:
      continue
    (a_name, a), (b_name, b) = pair.items()
    ratio = lambda key: a[key] / b[key] if b[key] else float("nan")  # noqa: E731
    print(f"{name:28s} per device, {a_name} / {b_name}: FLOPs {a['flops']:.3g} / {b['flops']:.3g} = "
          f"{ratio('flops'):.2f}x, bytes {ratio('bytes'):.2f}x, temp memory {a['temp_bytes'] / 2**20:.1f} / "
          f"{b['temp_bytes'] / 2**20:.1f} MiB = {ratio('temp_bytes'):.2f}x")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

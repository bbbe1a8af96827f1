"""What running kernels per shard and splitting rows over `context` save, per device, from XLA's compiled programs.

python bench/per_shard.py [--json] [--seq_len 4096] [--balance_len 16384] [--parts dispatch,context,balance]

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
3. Load-balanced context parallelism (`mesh.context_load_balance`): the attention work of each of 8 context shards
   on one causal row of `--balance_len` tokens (the AR baseline's, and the block objective's [canvas ; clean] row
   of that length), its chunks contiguous against the balanced order; max-shard / mean-shard work. XLA's cost
   analysis cannot see this: every shard runs the same SPMD program, and how much of it a shard does is data (the
   `chunked` plan's span per chunk, the kernel's visit lists). So the work is counted from the mask description
   with the implementations' own planners: the keys each `chunked` chunk multiplies against (`plan_chunks` on the
   shard's queries), the key tiles the Pallas kernel visits (`tile_visits`, 64 x 64 tiles) and the visible pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from diffgemma_jax.model import attention_impl  # noqa: E402  pylint: disable=wrong-import-position
from diffgemma_jax.parallel import balance, make_mesh, per_shard  # noqa: E402  pylint: disable=wrong-import-position
from pallas_kernels import attention_chunked, attention_mask  # noqa: E402  pylint: disable=wrong-import-position
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


def _shard_work(spec, tile: int = 64) -> dict:
  """The attention work of one shard's queries (`spec.q`) against the whole row's keys."""
  chunk, key_block = attention_impl.CHUNK, attention_chunked.KEY_BLOCK
  L, S = spec.q.length, spec.kv.length
  num_key_blocks = -(-S // key_block)
  if L <= chunk:  # the chunked path runs the dense reference on such a shard
    chunked = L * S
  else:
    spans = attention_chunked.span_ladder(spec, chunk, key_block, num_key_blocks)
    rung = np.asarray(attention_chunked.plan_chunks(spec, chunk, key_block, spans).rung)
    widths = np.asarray(spans + (num_key_blocks,))[rung]
    chunked = int(np.sum(widths)) * chunk * key_block
  tiles = int(np.sum(np.asarray(attention_mask.tile_visits(spec, tile, tile)))) * tile * tile
  return {"chunked_logits": chunked, "pallas_tile_pairs": tiles,
          "visible_pairs": int(np.sum(np.asarray(attention_mask.count_visible(spec))))}


def _row_specs(length: int, block_size: int = 32) -> dict:
  """One document filling the row: the AR baseline's causal row, and the block objective's [canvas ; clean] row
  of `length` tokens (two halves of length / 2, canvases of `block_size`)."""
  half = length // 2
  index = np.arange(half, dtype=np.int32)[None]
  blocks = index // block_size
  ones = np.ones_like(index)
  return {"ar": attention_mask.MaskSpec.single_documents("causal", [length], length),
          "block": attention_mask.MaskSpec.canvas_clean(ones, index, blocks, ones, index, blocks)}


def context_balance(length: int, shards: int = 8) -> dict:
  """Per-shard attention work over `shards` context shards, contiguous and balanced; max / mean of each."""
  out = {}
  for name, spec in _row_specs(length).items():
    # As on the mesh: window starts found in row order, then queries and keys reordered alike (`balance.reorder`).
    spec = dataclasses.replace(spec, starts=spec.window_starts() if spec.q.has_canvas else None)
    order = balance.balanced_order(length, shards)
    piece = length // shards
    result = {}
    for layout, row in (("contiguous", spec), ("balanced", jax.tree.map(lambda x: x[:, order], spec))):
      shard = lambda x, i: x[:, i * piece:(i + 1) * piece]  # noqa: E731
      work = [_shard_work(dataclasses.replace(row, q=jax.tree.map(lambda x: shard(x, i), row.q),  # noqa: B023
                                              starts=None if row.starts is None else shard(row.starts, i)))
              for i in range(shards)]
      result[layout] = {key: {"per_shard": [w[key] for w in work],
                              "max_over_mean": max(w[key] for w in work) / (sum(w[key] for w in work) / shards)}
                        for key in work[0]}
    out[name] = result
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--balance_len", type=int, default=32768, help="row length of part 3")
  parser.add_argument("--parts", default="dispatch,context,balance", help="which of the three parts to run")
  args = parser.parse_args(argv)
  parts = set(args.parts.split(","))
  load = benchlib.MachineLoad()
  result = {"commit": benchlib.commit(), "jax": jax.__version__, "devices": jax.device_count()}
  if "dispatch" in parts:
    for backend in ("ragged", "sorted"):
      result[f"routed_experts_{backend}"] = routed_experts_costs(backend)
      result[f"train_step_{backend}"] = train_step_dispatch_costs(backend)
  if "context" in parts:
    result["context_parallel"] = context_parallel_costs(args.seq_len)
  if "balance" in parts:
    result["context_balance"] = context_balance(args.balance_len)
  result.update(load.report())
  if args.json:
    print(json.dumps(result, indent=1))
    return 0
  print(f"commit {result['commit']}, jax {result['jax']}, {result['devices']} fake CPU devices")
  for name, pair in result.items():
    if not isinstance(pair, dict) or len(pair) != 2 or name == "context_balance":
      continue
    (a_name, a), (b_name, b) = pair.items()
    ratio = lambda key: a[key] / b[key] if b[key] else float("nan")  # noqa: E731
    print(f"{name:28s} per device, {a_name} / {b_name}: FLOPs {a['flops']:.3g} / {b['flops']:.3g} = "
          f"{ratio('flops'):.2f}x, bytes {ratio('bytes'):.2f}x, temp memory {a['temp_bytes'] / 2**20:.1f} / "
          f"{b['temp_bytes'] / 2**20:.1f} MiB = {ratio('temp_bytes'):.2f}x")
  for row, layouts in result.get("context_balance", {}).items():
    for what in layouts["contiguous"]:
      shards = lambda layout: layouts[layout][what]  # noqa: E731
      print(f"{args.balance_len}-token {row} row, 8 context shards, {what:17s} max/mean: contiguous "
            f"{shards('contiguous')['max_over_mean']:.2f}, balanced {shards('balanced')['max_over_mean']:.2f}; "
            f"max shard balanced / contiguous {max(shards('balanced')['per_shard']) / max(shards('contiguous')['per_shard']):.2f}")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

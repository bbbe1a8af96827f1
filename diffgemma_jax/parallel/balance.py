"""Load-balanced context parallelism: each row reordered so every `context` shard has the same attention work.

Split contiguously, a causal row gives its first context shard queries that see few keys and its last shard
queries that see them all; the implementations that skip invisible key blocks (`pallas`, `chunked`) then run about
twice the average work on the last shard, which sets the step time. The standard remedy (MaxText's
`context_parallel_load_balance`, the "zigzag" order of ring attention): cut the row into 2C chunks for C context
shards and give shard i the chunks i and 2C-1-i, an early and a late one.

Where the reordering happens: the denoiser reorders its inputs at entry (token ids, positions, the mask
description, the token and canvas flags, added embeddings; all [B, L, ...] along L) and puts the residual stream
back in row order before the final norm (`Placement.reorder_row` / `restore_row`), so the logits, and everything
an objective computes from them (targets, noise, losses, bounds), are those of the unbalanced run: nothing outside
the model knows. Restoring the [B, L, D] residual, not the [B, L, V] logits, keeps the exchange small: one
collective permute of a shard's residual each way per forward pass, against an all-gather of keys and values per
layer. Masks are descriptions of per-token attributes, so a reordered row's mask is the same mask; the one
order-dependent part, a canvas query's window start (`MaskSpec.window_starts`, found from contiguous runs), is
computed in row order first and travels with its query.

Rows whose attention work is already even (bidirectional rows without a canvas: the masked objective) are left in
row order; so are dense masks (the samplers') and rows that do not cut into 2C equal chunks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffgemma_jax.parallel import expert, per_shard
from diffgemma_jax.parallel.rules import BATCH_AXES, CONTEXT_AXIS
from pallas_kernels.attention_mask import MaskSpec


def balanced_chunks(shards: int) -> np.ndarray:
  """[2C] the row's chunks in balanced order: shard i holds entries 2i and 2i+1, which are chunks i and 2C-1-i."""
  return np.stack([np.arange(shards), 2 * shards - 1 - np.arange(shards)], axis=1).reshape(-1)


def balanced_order(length: int, shards: int) -> np.ndarray:
  """[L] the row position of the token at each place of the balanced row (`x_balanced = x[:, order]`)."""
  chunk = length // (2 * shards)
  return (balanced_chunks(shards)[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


def uneven(mask) -> bool:
  """Whether a row attending under `mask` is one the balanced order is for: a mask description of self-attention
  whose work varies along the row (anything but bidirectional rows without a canvas)."""
  if not isinstance(mask, MaskSpec):
    return False
  return (mask.kind != "bidirectional" or mask.q.has_canvas) and mask.q.length == mask.kv.length


def balances(mesh: Mesh, mask) -> bool:
  """Whether a row attending under `mask` is reordered on `mesh`: a context axis, an `uneven` row, and one that cuts
  into 2C equal chunks. The one decision: the model asks it (`MeshPlacement`), and the start-up check refuses a run
  whose rows are uneven but do not cut (`unbalanced`)."""
  shards = per_shard.axis_size(mesh, CONTEXT_AXIS)
  return shards > 1 and uneven(mask) and mask.q.length % (2 * shards) == 0


def unbalanced(mesh: Mesh, masks) -> list:
  """The `masks` of rows that `mesh`'s context axis splits unevenly and leaves in row order: `uneven` ones that
  `balances` refuses (they do not cut into 2C equal chunks)."""
  if per_shard.axis_size(mesh, CONTEXT_AXIS) == 1:
    return []
  return [mask for mask in masks if uneven(mask) and not balances(mesh, mask)]


def _chunk_moves(shards: int, inverse: bool):
  """{(source slot, destination slot): [(source shard, destination shard)]}: where each of a shard's two chunks
  goes, row order -> balanced (or back). In row order shard j holds chunks 2j, 2j+1 (slots 0, 1)."""
  balanced = balanced_chunks(shards)
  moves: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for place, chunk in enumerate(balanced):
    row_home, balanced_home = (int(chunk) // 2, int(chunk) % 2), (place // 2, place % 2)
    (src, src_slot), (dst, dst_slot) = (balanced_home, row_home) if inverse else (row_home, balanced_home)
    moves.setdefault((src_slot, dst_slot), []).append((src, dst))
  return moves


def reorder(tree, mesh: Mesh, *, inverse: bool = False):
  """Every [B, L, ...] leaf of `tree` (L cut into 2C chunks) from row order to balanced order (`inverse`: back),
  as sharded arrays: rows over the batch axes that divide B, L over `context`. Each shard sends each of its two
  chunks once (collective permutes), never gathering the row."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return tree
  rows = per_shard.split_axes(mesh, BATCH_AXES, leaves[0].shape[0]) or None
  moves = _chunk_moves(per_shard.axis_size(mesh, CONTEXT_AXIS), inverse)

  def local(x):
    halves = jnp.split(x, 2, axis=1)
    out = [jnp.zeros_like(halves[0]), jnp.zeros_like(halves[0])]
    for (src_slot, dst_slot), pairs in moves.items():
      out[dst_slot] = out[dst_slot] + jax.lax.ppermute(halves[src_slot], CONTEXT_AXIS, perm=pairs)
    return jnp.concatenate(out, axis=1)

  specs = jax.tree.map(lambda _: P(rows, CONTEXT_AXIS), tree)
  return expert.shard_map(lambda t: jax.tree.map(local, t), mesh=mesh, in_specs=(specs,), out_specs=specs,
                          check_vma=False)(tree)


def reorder_inputs(mesh: Mesh, tree, mask: MaskSpec):
  """(`tree`, `mask`) in balanced order; the mask's queries carry their window starts found in row order."""
  starts = mask.window_starts() if mask.q.has_canvas else None
  tree, q, kv, starts = reorder((tree, mask.q, mask.kv, starts), mesh)
  return tree, dataclasses.replace(mask, q=q, kv=kv, starts=starts)

"""The embedding table on a mesh: the token lookup, the tied logits and self-conditioning's expected embedding,
none of which holds the whole table [V, D] on a device.

The table is stored with its embed columns over `fsdp` and its vocabulary rows over `tensor` (the rules table).
FSDP under plain GSPMD gathers a weight whole where it is used. For the table that meant, per device and step, a
float32 [V/tensor, D] copy for the lookup (which reads B x L rows of it), a bfloat16 copy for the logits and a
float32 one again for their backward, a full-size float32 buffer for each of the two gradients before their
reduction, and a float32 copy for the self-conditioning signal: at DiffusionGemma's vocabulary (262,144 x 2816)
2.9 GB per float32 copy, 1.5 GB per bfloat16 one (BENCHMARKS.md has the compiled bytes). Under GSPMD from the
stored table, the lookup's gradient also could not move from rows over every batch axis to columns over `fsdp` on
an `fsdp x expert` mesh without replicating it whole ("Involuntary full rematerialization").

Here each use runs in a `shard_map` over the stored slices [V/tensor, D/fsdp]:

- the lookup (`sharded_lookup`) gathers its `fsdp` group's token ids (int32, a few KB), looks them up in its own
  slice (ids of another `tensor` shard's rows give zero), casts to the compute dtype and sends each token's
  D-slice to the shard that holds the token (`all_to_all` over `fsdp`); a `psum` over `tensor` adds the vocabulary
  shards' parts. Its transpose returns the rows' cotangents the same way and scatters them into the shard's own
  slice of the gradient: only looked-up rows move, nothing of size V x D exists.
- the tied logits (`sharded_logits`) and the mix `p @ E` (`sharded_mix`) loop over vocabulary tiles of the shard's
  rows (`vocab_tiles`: at least `fsdp` and MIN_TILES of them): each tile's columns are gathered over `fsdp` (in the
  compute dtype for the logits, float32 for the mix), used, and dropped, so a device holds one tile (at most V /
  (tensor x fsdp) rows, the size of its own slice, and an eighth of V / tensor) at a time. The logits' backward (a
  custom VJP) gathers each tile again in the compute dtype and reduce-scatters the tile's float32 gradient over
  `fsdp`; the mix's recomputes its tile (`jax.checkpoint`) and its transpose reduce-scatters it. The logits come out
  with their vocabulary over `tensor`.

The axes the table is replicated over (`data`, `expert`, `context`) sum its gradient at the shard_map's boundary.
Where the tokens do not split over the mesh's batch axes (sampling a single row on 8 devices) each use falls back
to GSPMD on the table as placed (the lookup: gathered over `fsdp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from diffgemma_jax.parallel import expert, rules
from diffgemma_jax.parallel.per_shard import TENSOR_AXIS, _spec, axis_size, split_axes
from diffgemma_jax.parallel.rules import BATCH_AXES, CONTEXT_AXIS

FSDP_AXIS = "fsdp"
MIN_TILES = 8  # vocabulary tiles of the logits and the mix, at least (`vocab_tiles`)


def table_spec(shape, mesh: Mesh):
  """The stored table's PartitionSpec (the rules table's, sharding dropped where a mesh axis does not divide)."""
  return rules._fits(shape, rules.partition_spec(("vocab", "embed"), mesh), mesh)  # pylint: disable=protected-access


def sharded_lookup(table_VD: jax.Array, tokens_BL: jax.Array, dtype, mesh: Mesh) -> jax.Array:
  """`table_VD[tokens_BL]` cast to `dtype`, [B, L, D] with rows over the batch axes (and `context`), computed from
  the stored table's slices without gathering it (module docstring)."""
  B, L = tokens_BL.shape
  V, D = table_VD.shape
  rows = split_axes(mesh, BATCH_AXES, B)
  context = split_axes(mesh, (CONTEXT_AXIS,), L)
  if not (rows or context):
    gathered_VD = rules.constrain(table_VD, ("vocab", None), mesh)
    return jnp.take(gathered_VD, tokens_BL, axis=0).astype(dtype)
  vocab_entry, embed_entry = tuple(table_spec(table_VD.shape, mesh))
  split_embed = embed_entry == FSDP_AXIS and FSDP_AXIS in rows
  if embed_entry is not None and not split_embed:
    # The table's columns are split over an axis the tokens do not split over (fsdp does not divide the batch):
    # gather them (a [V/tensor, D] copy); the common case never gets here.
    table_VD = rules.constrain(table_VD, ("vocab", None), mesh)
    embed_entry = None
  split_vocab = vocab_entry == TENSOR_AXIS
  shard_rows = V // axis_size(mesh, TENSOR_AXIS) if split_vocab else V

  def body(table_vd, tokens_bl):
    if split_embed:
      tokens_bl = jax.lax.all_gather(tokens_bl, FSDP_AXIS, axis=0, tiled=True)
    if split_vocab:
      local_bl = tokens_bl - jax.lax.axis_index(TENSOR_AXIS) * shard_rows
      mine_bl = (local_bl >= 0) & (local_bl < shard_rows)
      x_bld = jnp.take(table_vd, jnp.where(mine_bl, local_bl, 0), axis=0)
      x_bld = jnp.where(mine_bl[..., None], x_bld, 0).astype(dtype)
    else:
      x_bld = jnp.take(table_vd, tokens_bl, axis=0).astype(dtype)
    if split_embed:
      x_bld = jax.lax.all_to_all(x_bld, FSDP_AXIS, split_axis=0, concat_axis=2, tiled=True)
    if split_vocab:
      x_bld = jax.lax.psum(x_bld, TENSOR_AXIS)
    return x_bld

  fn = expert.shard_map(body, mesh=mesh, in_specs=(_spec((vocab_entry,) if vocab_entry else (),
                                                          (embed_entry,) if embed_entry else ()),
                                                    _spec(rows, context)),
                        out_specs=_spec(rows, context, None))
  return fn(table_VD, tokens_BL)


def vocab_tiles(shard_rows: int, fsdp: int) -> int:
  """How many vocabulary tiles the logits and the mix gather one at a time: none to gather without an fsdp split
  (1); else at least `fsdp` and MIN_TILES, so that a gathered tile is no larger than the shard's own slice nor
  than an eighth of its rows' table (the largest such count dividing the shard's `shard_rows` rows)."""
  if fsdp == 1:
    return 1
  tiles = max(fsdp, MIN_TILES)
  while shard_rows % tiles:
    tiles -= 1
  return tiles


def _tiling(activation_shape, table_shape, mesh: Mesh):
  """How the logits and the mix run on `mesh` for activations [B, L, ...] and the table [V, D]: (the batch axes
  splitting B, the context axes splitting L, the table's vocabulary and embed entries, the fsdp group its columns
  are gathered over (1: none), the shard's vocabulary rows); None where they fall back to GSPMD (the activations do
  not split, or the table's columns are split over an axis the rows are not)."""
  B, L = activation_shape[:2]
  V, _ = table_shape
  rows = split_axes(mesh, BATCH_AXES, B)
  context = split_axes(mesh, (CONTEXT_AXIS,), L)
  vocab_entry, embed_entry = tuple(table_spec(table_shape, mesh))
  if not (rows or context) or (embed_entry is not None and FSDP_AXIS not in rows):
    return None
  fsdp = axis_size(mesh, FSDP_AXIS) if embed_entry == FSDP_AXIS else 1
  shard_rows = V // axis_size(mesh, TENSOR_AXIS) if vocab_entry == TENSOR_AXIS else V
  return rows, context, vocab_entry, embed_entry, fsdp, shard_rows


def sharded_logits(x_BLD: jax.Array, table_VD: jax.Array, mesh: Mesh) -> jax.Array:
  """The tied logits `x_BLD @ table_VD.T` in float32 [B, L, V] (the table cast to `x_BLD`'s dtype), gathering the
  table one vocabulary tile at a time (module docstring)."""
  tiling = _tiling(x_BLD.shape, table_VD.shape, mesh)
  if tiling is None:
    return local_logits(x_BLD, rules.constrain(table_VD, ("vocab", "embed"), mesh))
  rows, context, vocab_entry, embed_entry, fsdp, shard_rows = tiling
  tiles = vocab_tiles(shard_rows, fsdp)
  fn = expert.shard_map(functools.partial(_tiled_logits, tiles=tiles, gather=fsdp > 1), mesh=mesh,
                        in_specs=(_spec(rows, context, None), _spec((vocab_entry,) if vocab_entry else (),
                                                                     (embed_entry,) if embed_entry else ())),
                        out_specs=_spec(rows, context, (vocab_entry,) if vocab_entry else ()), check_vma=False)
  return fn(x_BLD, table_VD)


def local_logits(x_BLD, table_VD):
  return jnp.einsum("BLD,VD->BLV", x_BLD, table_VD.astype(x_BLD.dtype), preferred_element_type=jnp.float32)


def _gathered_tile(table_vd, start, size: int, dtype, gather: bool):
  """Rows [start, start + size) of the shard's table, cast to `dtype`, with their columns gathered over fsdp."""
  tile = jax.lax.dynamic_slice_in_dim(table_vd, start, size, axis=0).astype(dtype)
  return jax.lax.all_gather(tile, FSDP_AXIS, axis=1, tiled=True) if gather else tile


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tiled_logits(x_bld, table_vd, tiles: int, gather: bool):
  return _tiled_logits_fwd(x_bld, table_vd, tiles, gather)[0]


def _tiled_logits_fwd(x_bld, table_vd, tiles: int, gather: bool):
  size = table_vd.shape[0] // tiles
  b, l, _ = x_bld.shape

  def tile(i, logits_blv):
    tile_vd = _gathered_tile(table_vd, i * size, size, x_bld.dtype, gather)
    return jax.lax.dynamic_update_slice_in_dim(logits_blv, local_logits(x_bld, tile_vd), i * size, axis=2)

  logits_blv = jax.lax.fori_loop(0, tiles, tile, jnp.zeros((b, l, table_vd.shape[0]), jnp.float32))
  return logits_blv, (x_bld, table_vd)


def _tiled_logits_bwd(tiles: int, gather: bool, residuals, g_blv):
  """Per tile: the tile gathered again (in the compute dtype), its part of x's cotangent, and its rows' float32
  gradient summed over fsdp into this shard's columns (a reduce-scatter of one tile). The tiles' gradients are the
  scan's outputs, stacked in row order: the shard's gradient without a zeroed buffer carried through the loop."""
  x_bld, table_vd = residuals
  size = table_vd.shape[0] // tiles

  def tile(dx_bld, i):
    tile_vd = _gathered_tile(table_vd, i * size, size, x_bld.dtype, gather)
    g_blv_tile = jax.lax.dynamic_slice_in_dim(g_blv, i * size, size, axis=2)
    _, pullback = jax.vjp(local_logits, x_bld, tile_vd)
    dx_tile, dtile_vd = pullback(g_blv_tile)
    dtile_vd = dtile_vd.astype(jnp.float32)
    if gather:
      dtile_vd = jax.lax.psum_scatter(dtile_vd, FSDP_AXIS, scatter_dimension=1, tiled=True)
    return dx_bld + dx_tile.astype(jnp.float32), dtile_vd.astype(table_vd.dtype)

  dx_bld, dtable_tvd = jax.lax.scan(tile, jnp.zeros(x_bld.shape, jnp.float32), jnp.arange(tiles))
  return dx_bld.astype(x_bld.dtype), dtable_tvd.reshape(table_vd.shape)


_tiled_logits.defvjp(_tiled_logits_fwd, _tiled_logits_bwd)


def sharded_mix(weights_BLV: jax.Array, table_VD: jax.Array, mesh: Mesh) -> jax.Array:
  """`weights_BLV @ table_VD` in float32 [B, L, D] (self-conditioning's expected embedding), gathering the table
  one vocabulary tile at a time: each tile's float32 columns gathered over fsdp, recomputed (not kept) for the
  gradient, whose transpose reduce-scatters the tile's rows."""
  tiling = _tiling(weights_BLV.shape, table_VD.shape, mesh)
  if tiling is None:
    return jnp.einsum("BLV,VD->BLD", weights_BLV, rules.constrain(table_VD, ("vocab", "embed"), mesh).astype(
        jnp.float32))
  rows, context, vocab_entry, embed_entry, fsdp, shard_rows = tiling
  tiles = vocab_tiles(shard_rows, fsdp)
  size = shard_rows // tiles

  def body(weights_blv, table_vd):
    @jax.checkpoint
    def tile(i, out_bld):
      tile_vd = _gathered_tile(table_vd, i * size, size, jnp.float32, fsdp > 1)
      weights_tile = jax.lax.dynamic_slice_in_dim(weights_blv, i * size, size, axis=2)
      return out_bld + jnp.einsum("BLV,VD->BLD", weights_tile.astype(jnp.float32), tile_vd)

    b, l, _ = weights_blv.shape
    out_bld = jax.lax.fori_loop(0, tiles, tile, jnp.zeros((b, l, table_vd.shape[1] * fsdp), jnp.float32))
    return jax.lax.psum(out_bld, TENSOR_AXIS) if vocab_entry == TENSOR_AXIS else out_bld

  fn = expert.shard_map(body, mesh=mesh, in_specs=(_spec(rows, context, (vocab_entry,) if vocab_entry else ()),
                                                   _spec((vocab_entry,) if vocab_entry else (),
                                                         (embed_entry,) if embed_entry else ())),
                        out_specs=_spec(rows, context, None), check_vma=False)
  return fn(weights_BLV, table_VD)

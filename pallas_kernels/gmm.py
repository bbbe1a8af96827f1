"""Pallas grouped-matmul kernels (Triton-compatible): gmm (forward / dlhs) and tgmm (weight gradient).

Both kernels see whole arrays and index them with pl.ds windows: Triton turns each window into a pointer
block, and masked loads cover the edges. So m, k and n need not be multiples of the tiles, and the group
metadata is an ordinary int32 input read as scalars (Triton has no scalar prefetch). Every load of a
contraction window that may run past k is masked with zeros on both operands, since a stray NaN times zero
is still NaN. Accumulation is float32; operand tiles are cast to `compute_dtype` in registers.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import metadata
from pallas_kernels.tiling import Tiling, choose_tiling


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _and_masks(row_ok, col_ok):
  """[rows, cols] mask from per-axis masks, either of which may be None (statically always true)."""
  if row_ok is None and col_ok is None:
    return None
  if row_ok is None:
    return col_ok[None, :]
  if col_ok is None:
    return row_ok[:, None]
  return row_ok[:, None] & col_ok[None, :]


def _load_tile(ref_view, row_ok, col_ok, shape, dtype):
  mask = _and_masks(row_ok, col_ok)
  if mask is not None:
    mask = jnp.broadcast_to(mask, shape)
    tile = _compat.load(ref_view, mask=mask, other=0)
  else:
    tile = _compat.load(ref_view)
  return tile.astype(dtype)


def _edge_mask(start, block: int, size: int):
  """In-bounds mask of the window [start, start + block) of an axis of `size`, or None when it never runs past."""
  if size % block == 0:
    return None
  return start + jnp.arange(block) < size


def _dot_precision(compute_dtype):
  """float32 operands get true float32 products: Triton would otherwise round them to TF32."""
  return lax.Precision.HIGHEST if jnp.dtype(compute_dtype) == jnp.float32 else None


def _swizzle(pid, num_rows: int, num_cols: int, group_m: int):
  """Launch order: group_m consecutive row tiles sweep all column tiles together, so rhs tiles stay in L2."""
  width = group_m * num_cols
  first_row = (pid // width) * group_m
  rows_here = jnp.minimum(num_rows - first_row, group_m)
  within = pid % width
  return first_row + within % rows_here, within // rows_here


def _gmm_kernel(row_tile_ref, group_ref, row_start_ref, row_end_ref, lhs_ref, rhs_ref, out_ref, *,
                m: int, k: int, n: int, tiling: Tiling, num_visits: int, transpose_rhs: bool, compute_dtype):
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
  visit, col_tile = _swizzle(pl.program_id(0), num_visits, _cdiv(n, bn), tiling.group_m)
  row_tile = row_tile_ref[visit]
  group = group_ref[visit]
  row0 = row_tile * bm
  col0 = col_tile * bn
  row_ok = _edge_mask(row0, bm, m)
  col_ok = _edge_mask(col0, bn, n)
  weight_group = jnp.maximum(group, 0)
  # Visits that only write zeros (other shards' rows, padding) skip the contraction entirely.
  # Arithmetic, not jnp.where: the Triton lowering gives a select of two literals an i1 type, and scf.for then
  # rejects the i1 upper bound beside its i32 lower bound ("failed to parse Triton module" on the GPU).
  num_k_steps = (group >= 0).astype(jnp.int32) * _cdiv(k, bk)
  precision = _dot_precision(compute_dtype)

  def k_step(step, acc):
    k0 = step * bk
    k_ok = _edge_mask(k0, bk, k)
    x = _load_tile(lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], row_ok, k_ok, (bm, bk), compute_dtype)
    if transpose_rhs:
      w = _load_tile(rhs_ref.at[weight_group, pl.ds(col0, bn), pl.ds(k0, bk)], col_ok, k_ok, (bn, bk),
                     compute_dtype)
      return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)
    w = _load_tile(rhs_ref.at[weight_group, pl.ds(k0, bk), pl.ds(col0, bn)], k_ok, col_ok, (bk, bn),
                   compute_dtype)
    return acc + lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, num_k_steps, k_step, jnp.zeros((bm, bn), jnp.float32))
  rows = row0 + jnp.arange(bm)
  # A straddling tile is visited once per segment: write only this visit's rows (row_end <= m).
  owns_row = (rows >= row_start_ref[visit]) & (rows < row_end_ref[visit])
  mask = jnp.broadcast_to(_and_masks(owns_row, col_ok), (bm, bn))
  _compat.store(out_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], acc.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "tiling", "transpose_rhs",
                                             "interpret", "compute_dtype"))
def gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=None, group_offset=None,
        transpose_rhs=False, interpret=None, compute_dtype=None):
  """Grouped matmul: out[r] = lhs[r] @ rhs[g - group_offset] for each row r of group g.

  Args:
    lhs: [m, k], rows sorted by group.
    rhs: [G_local, k, n], or [G_local, n, k] with transpose_rhs.
    group_sizes: int32[G], rows per group over all shards; sum(group_sizes) <= m.
    preferred_element_type: dtype of the output (accumulation is always float32).
    tiling: None (table in tiling.py), a Tiling, or (block_m, block_k, block_n).
    group_offset: first global group this shard owns (rhs[0] is that group). Rows of other groups, and rows
      past sum(group_sizes), come out as zeros.
    transpose_rhs: rhs is [G_local, n, k] (used for dlhs).
    interpret: run the Pallas interpreter (None: interpret unless the default backend is a GPU).
    compute_dtype: dtype the operand tiles are cast to before the dot (default: promote(lhs, rhs)).

  Returns:
    [m, n] in preferred_element_type.
  """
  m, k, n, num_local_groups = metadata.gmm_shapes(lhs, rhs, group_sizes, transpose_rhs)
  compute_dtype = jnp.dtype(compute_dtype or jnp.promote_types(lhs.dtype, rhs.dtype))
  tiling = choose_tiling("gmm", m, k, n, compute_dtype, tiling, operand_dtypes=(lhs.dtype, rhs.dtype))
  interpret = _compat.resolve_interpret(interpret)
  group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())

  visits = metadata.gmm_visits(group_sizes, m, tiling.block_m, num_local_groups, group_offset)
  num_visits = visits.row_tile.shape[0]
  kernel = functools.partial(_gmm_kernel, m=m, k=k, n=n, tiling=tiling, num_visits=num_visits,
                             transpose_rhs=transpose_rhs, compute_dtype=compute_dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.dtype(preferred_element_type or jnp.float32)),
      grid=(num_visits * _cdiv(n, tiling.block_n),),
      name="gmm",
      **_compat.pallas_call_kwargs(tiling, interpret),
  )(*visits, lhs, rhs)


def _tgmm_kernel(row_start_ref, row_end_ref, lhs_ref, rhs_ref, out_ref, *, m: int, k: int, n: int,
                 tiling: Tiling, transpose_lhs: bool, compute_dtype):
  del m  # Rows past m never belong to a group: group bounds are clipped to m.
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
  num_k_tiles, num_n_tiles = _cdiv(k, bk), _cdiv(n, bn)
  pid = pl.program_id(0)
  group = pid // (num_k_tiles * num_n_tiles)
  k_tile = (pid // num_n_tiles) % num_k_tiles
  n_tile = pid % num_n_tiles
  row_start = row_start_ref[group]
  row_end = row_end_ref[group]
  k0 = k_tile * bk
  n0 = n_tile * bn
  k_ok = _edge_mask(k0, bk, k)
  n_ok = _edge_mask(n0, bn, n)
  first_row_tile = row_start // bm
  end_row_tile = jnp.where(row_end > row_start, _cdiv_traced(row_end, bm), first_row_tile)
  precision = _dot_precision(compute_dtype)

  def row_step(row_tile, acc):
    r0 = row_tile * bm
    rows = r0 + jnp.arange(bm)
    in_group = (rows >= row_start) & (rows < row_end)
    y = _load_tile(rhs_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], in_group, n_ok, (bm, bn), compute_dtype)
    if transpose_lhs:  # lhs is [m, k]: contract its rows.
      x = _load_tile(lhs_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], in_group, k_ok, (bm, bk), compute_dtype)
      return acc + lax.dot_general(x, y, (((0,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)
    x = _load_tile(lhs_ref.at[pl.ds(k0, bk), pl.ds(r0, bm)], k_ok, in_group, (bk, bm), compute_dtype)
    return acc + lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(first_row_tile, end_row_tile, row_step, jnp.zeros((bk, bn), jnp.float32))
  mask = _and_masks(k_ok, n_ok)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (bk, bn))
  _compat.store(out_ref.at[group, pl.ds(k0, bk), pl.ds(n0, bn)], acc.astype(out_ref.dtype), mask=mask)


def _cdiv_traced(a, b: int):
  return (a + b - 1) // b


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "tiling", "num_actual_groups",
                                             "interpret", "transpose_lhs", "compute_dtype"))
def tgmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=None, group_offset=None,
         num_actual_groups=None, interpret=None, transpose_lhs=False, compute_dtype=None):
  """Transposed grouped matmul (the weight gradient): out[g] = lhs[:, rows of g] @ rhs[rows of g].

  Args:
    lhs: [k, m]; or [m, k] with transpose_lhs (what the backward pass holds, saving a transpose).
    rhs: [m, n], rows sorted by group.
    group_sizes: int32[G] over all shards.
    preferred_element_type: output dtype (accumulation is float32).
    tiling: None, a Tiling or (block_m, block_k, block_n); block_m tiles the grouped rows.
    group_offset: first global group to compute.
    num_actual_groups: how many groups to compute from group_offset (default G); rows of other groups are
      ignored and empty groups give zeros.
    interpret, compute_dtype: as for gmm.

  Returns:
    [num_actual_groups, k, n] in preferred_element_type.
  """
  m, k, n = metadata.tgmm_shapes(lhs, rhs, group_sizes, transpose_lhs)
  num_groups = num_actual_groups if num_actual_groups is not None else group_sizes.shape[0]
  compute_dtype = jnp.dtype(compute_dtype or jnp.promote_types(lhs.dtype, rhs.dtype))
  tiling = choose_tiling("tgmm", m, k, n, compute_dtype, tiling, operand_dtypes=(lhs.dtype, rhs.dtype))
  interpret = _compat.resolve_interpret(interpret)
  group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())

  bounds = metadata.group_bounds(group_sizes, m, num_groups, group_offset)
  kernel = functools.partial(_tgmm_kernel, m=m, k=k, n=n, tiling=tiling, transpose_lhs=transpose_lhs,
                             compute_dtype=compute_dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), jnp.dtype(preferred_element_type or jnp.float32)),
      grid=(num_groups * _cdiv(k, tiling.block_k) * _cdiv(n, tiling.block_n),),
      name="tgmm",
      **_compat.pallas_call_kwargs(tiling, interpret),
  )(*bounds, lhs, rhs)

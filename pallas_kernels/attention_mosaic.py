"""Flash-attention kernels on the Pallas Mosaic GPU backend (Hopper, sm_90a): forward, dQ and dK/dV under a MaskSpec.

The same algorithm, layout and mask handling as the Triton kernels (`attention.py`), written for Hopper's units:
operand tiles reach shared memory by TMA copies signalled on barriers, both matmuls of each step run on the tensor
cores as wgmma (one warpgroup per program, M = block rows, a multiple of 64), and the next visited key (or query)
tile is fetched into the other of two SMEM slots while the current one is computed.

Layout (the wrapper, `attention_mosaic_ops.py`, builds it): the G query heads sharing a key head are stacked as G
consecutive rows per query, so queries are [B, K, R, Hp] and keys and values [B, K, S, Hp], with R, S padded to
multiples of the tiles and the head dim Hp to a multiple of 64 (a 128-byte swizzled bf16 row). Padded rows and keys
carry segment ids no real token has (-2 and -1), so the mask rule drops them. The wrapper also passes transposed
copies ([B, K, Hp, T]) of the operands that appear as the right-hand side of a q k^T-like product: the Mosaic GPU
interpreter of jax 0.10.2 applies no transpose transform to a wgmma operand (`plgpu.transpose_ref`), so every
wgmma here reads both operands from SMEM in their natural [M, K] x [K, N] orientation, compiled or interpreted.

A program owns one row tile (forward, dQ) or key tile (dK/dV) of one (batch row, key head) and loops over the tiles
of the other side that `attention_mask.tile_visits` leaves (compacted into lists), so fully masked tiles cost
nothing. Inside a visited tile the mask comes from the per-token attributes (`attention_mask.visible`), copied to
SMEM with the tile and broadcast along the wgmma accumulator's layout. Scores, softmax statistics and accumulators
are float32; probabilities and score gradients are cast to the operand dtype and written to SMEM as the
left-hand operand of the second wgmma (Hopper's wgmma may also take it from registers; the 0.10.2 interpreter
cannot, so this port keeps one formulation that both run).

Accumulated outputs wider than `max_columns` (the forward's [rows, Hp] output, the [keys, Hp] dK and dV) are split
into column groups along a grid axis: each program recomputes the scores over the full head dim and accumulates only
its columns, which keeps a warpgroup's float32 accumulators within its registers at head dims 256 and 512.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mosaic_compat
from pallas_kernels.attention_mask import MaskSpec, visible

_MASKED_SCORE = -1e30
QUERY_OUTSIDE, KEY_OUTSIDE = -2, -1
SEG, POS, CANVAS, BLOCK, START = range(5)
# A bf16 SMEM tile is stored as (8, 64) tiles with a 128-byte swizzle: its minor dimension is a multiple of 64.
LANE = 64


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
  """block_q rows by block_k keys per step (multiples of 64: one wgmma M-tile per warpgroup); `max_columns`: the
  widest float32 accumulator a program keeps ([rows, max_columns]), wider outputs are split into column groups."""
  block_q: int = 64
  block_k: int = 64
  max_columns: int = 256

  def __post_init__(self):
    for name in ("block_q", "block_k", "max_columns"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % LANE:
        raise ValueError(f"MosaicTiling.{name}={value!r}: must be a positive multiple of {LANE} (wgmma tiles)")


def column_groups(head_dim: int, max_columns: int) -> tuple[int, int]:
  """(groups, columns per group) splitting a padded head dim into groups of at most max_columns, multiples of 64."""
  groups = -(-head_dim // max_columns)
  while head_dim % (groups * LANE):
    groups += 1
  return groups, head_dim // groups


def num_attributes(spec: MaskSpec, side: str) -> int:
  if not spec.q.has_canvas:
    return 2
  return 5 if side == "q" else 4


def _swizzled(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, LANE)), plgpu.SwizzleTransform(128)))


class _Regs:
  """Register arrays in the layouts wgmma produces. Compiled, values are pinned to the accumulator layout (rows of
  a [M, N] accumulator: WGMMA.reduce(1); its columns: WGMMA.reduce(0)). The 0.10.2 interpreter has no rule for
  `layout_cast` nor for plgpu.load with a layout, and layouts mean nothing there, so it gets plain arrays."""

  def __init__(self, compiled: bool):
    self.compiled = compiled

  def cast(self, x, layout):
    return plgpu.layout_cast(x, layout) if self.compiled else x

  def full(self, shape, value):
    layout = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
    return self.cast(jnp.full(shape, value, jnp.float32), layout)

  def vector(self, ref, along: int):
    """A 1-D SMEM ref as the vector along axis `along` (0: rows, 1: columns) of an accumulator."""
    if self.compiled:
      return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - along))
    return ref[...]


def _tile_mask(spec: MaskSpec, q_vectors, k_vectors, shape):
  """[rows, keys] bool of one tile from the attribute vectors of its rows and keys ([rows], [keys])."""
  col = lambda x: lax.broadcast_in_dim(x, shape, (0,))  # noqa: E731
  row = lambda x: lax.broadcast_in_dim(x, shape, (1,))  # noqa: E731
  args = [col(q_vectors[SEG]), col(q_vectors[POS]), row(k_vectors[SEG]), row(k_vectors[POS])]
  if spec.q.has_canvas:
    args += [col(q_vectors[CANVAS]) != 0, row(k_vectors[CANVAS]) != 0, col(q_vectors[BLOCK]),
             row(k_vectors[BLOCK]), col(q_vectors[START]) if spec.window else None]
  return visible(spec, *args)


def _tile_mask_transposed(spec: MaskSpec, q_vectors, k_vectors, shape):
  """[keys, rows] bool: the mask of a tile laid out with keys along the rows (the dK/dV kernel's S^T)."""
  col = lambda x: lax.broadcast_in_dim(x, shape, (1,))  # noqa: E731  (query attributes vary along columns)
  row = lambda x: lax.broadcast_in_dim(x, shape, (0,))  # noqa: E731
  args = [col(q_vectors[SEG]), col(q_vectors[POS]), row(k_vectors[SEG]), row(k_vectors[POS])]
  if spec.q.has_canvas:
    args += [col(q_vectors[CANVAS]) != 0, row(k_vectors[CANVAS]) != 0, col(q_vectors[BLOCK]),
             row(k_vectors[BLOCK]), col(q_vectors[START]) if spec.window else None]
  return visible(spec, *args)


def _matmul(a_smem, b_smem, shape):
  """a @ b (float32) of two SMEM tiles on the tensor cores: [M, K] x [K, N] -> [M, N]."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _attribute_vectors(regs, attr_smem, count, along):
  return [regs.vector(attr_smem.at[a], along) for a in range(count)]


# ---- forward -----------------------------------------------------------------------------------------------------

def _forward_kernel(lists_ref, counts_ref, q_attr_ref, k_attr_ref, q_ref, kt_ref, v_ref, o_ref, lse_ref,
                    q_smem, kt_smem, v_smem, p_smem, o_smem, lse_smem, qa_smem, ka_smem, q_bars, k_bars, v_bars,
                    ka_bars, *, spec, tiling, columns, scale, compiled):
  bq, bk = tiling.block_q, tiling.block_k
  regs = _Regs(compiled)
  q_tile, b, h, group = (lax.axis_index(n) for n in ("tiles", "batch", "heads", "columns"))
  r0 = q_tile * bq
  count = counts_ref[b, q_tile]
  cols = pl.ds(group * columns, columns)

  def fetch(n, slot):
    c0 = lists_ref[b, q_tile, n] * bk
    plgpu.copy_gmem_to_smem(kt_ref.at[b, h, :, pl.ds(c0, bk)], kt_smem.at[slot], k_bars.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, h, pl.ds(c0, bk), cols], v_smem.at[slot], v_bars.at[slot])
    plgpu.copy_gmem_to_smem(k_attr_ref.at[b, :, pl.ds(c0, bk)], ka_smem.at[slot], ka_bars.at[slot])

  plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(r0, bq), :], q_smem, q_bars.at[0])
  plgpu.copy_gmem_to_smem(q_attr_ref.at[b, :, pl.ds(r0, bq)], qa_smem, q_bars.at[1])

  @pl.when(count > 0)
  def _():
    fetch(0, 0)

  plgpu.barrier_wait(q_bars.at[0])
  plgpu.barrier_wait(q_bars.at[1])
  q_vectors = _attribute_vectors(regs, qa_smem, num_attributes(spec, "q"), 0)

  def visit(n, carry):
    acc, m_prev, l_prev = carry
    slot = lax.rem(n, 2)

    @pl.when(n + 1 < count)
    def _():
      fetch(n + 1, 1 - slot)

    plgpu.barrier_wait(k_bars.at[slot])
    plgpu.barrier_wait(ka_bars.at[slot])
    s = _matmul(q_smem, kt_smem.at[slot], (bq, bk))
    if scale != 1.0:
      s = s * scale
    k_vectors = _attribute_vectors(regs, ka_smem.at[slot], num_attributes(spec, "k"), 1)
    mask = _tile_mask(spec, q_vectors, k_vectors, (bq, bk))
    s = jnp.where(mask, s, _MASKED_SCORE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.where(mask, jnp.exp(s - lax.broadcast_in_dim(m_next, (bq, bk), (0,))), 0.0)
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(v_bars.at[slot])
    pv = _matmul(p_smem, v_smem.at[slot], (bq, columns))
    acc = lax.broadcast_in_dim(correction, (bq, columns), (0,)) * acc + pv
    return acc, m_next, l_next

  init = (regs.full((bq, columns), 0.0), regs.full((bq,), _MASKED_SCORE), regs.full((bq,), 0.0))
  acc, m, l = lax.fori_loop(0, count, visit, init)
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  o_smem[...] = (acc / lax.broadcast_in_dim(safe_l, (bq, columns), (0,))).astype(o_smem.dtype)
  lse_smem[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, pl.ds(r0, bq), cols])

  @pl.when(group == 0)
  def _():
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(r0, bq)])

  plgpu.wait_smem_to_gmem(0)


def forward(q, kt, v, q_attrs, k_attrs, lists, counts, *, spec: MaskSpec, tiling: MosaicTiling, scale: float,
            interpret: bool):
  """(out [B, K, R, Hp] in q's dtype, lse [B, K, R] float32) of the padded stacked layout; kt is k transposed."""
  B, K, R, H = q.shape
  bq, bk = tiling.block_q, tiling.block_k
  groups, columns = column_groups(H, tiling.max_columns)
  dtype = q.dtype
  aq, ak = num_attributes(spec, "q"), num_attributes(spec, "k")
  kernel = functools.partial(_forward_kernel, spec=spec, tiling=tiling, columns=columns, scale=scale,
                             compiled=not interpret)
  scratch = [
      _swizzled((bq, H), dtype),  # q
      _swizzled((2, H, bk), dtype),  # k^T, two slots
      _swizzled((2, bk, columns), dtype),  # v
      _swizzled((bq, bk), dtype),  # p
      _swizzled((bq, columns), dtype),  # output
      plgpu.SMEM((bq,), jnp.float32),  # lse
      plgpu.SMEM((aq, bq), jnp.int32),
      plgpu.SMEM((2, ak, bk), jnp.int32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
  ]
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((B, K, R, H), dtype), jax.ShapeDtypeStruct((B, K, R), jnp.float32)),
      scratch_types=scratch,
      grid=(R // bq, B, K, groups),
      grid_names=("tiles", "batch", "heads", "columns"),
      num_threads=1,
      thread_name="warpgroup",
      kernel_name="mosaic_flash_attention_forward",
      **_mosaic_compat.kernel_kwargs(interpret),
  )(lists, counts, q_attrs, k_attrs, q, kt, v)


# ---- backward ----------------------------------------------------------------------------------------------------

def _fetch(copies, bars, slot):
  """Start the TMA copies [(GMEM view, SMEM slot view)], copy j signalling barrier slot * len(copies) + j."""
  for j, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[slot * len(copies) + j])


def _wait(bars, slot, count, which):
  for j in which:
    plgpu.barrier_wait(bars.at[slot * count + j])


def _dq_kernel(lists_ref, counts_ref, q_attr_ref, k_attr_ref, q_ref, k_ref, kt_ref, vt_ref, do_ref, lse_ref,
               delta_ref, dq_ref, q_smem, do_smem, lse_smem, delta_smem, qa_smem, kt_smem, vt_smem, k_smem, ka_smem,
               ds_smem, dq_smem, own_bars, bars, *, spec, tiling, columns, scale, compiled):
  bq, bk = tiling.block_q, tiling.block_k
  regs = _Regs(compiled)
  q_tile, b, h, group = (lax.axis_index(n) for n in ("tiles", "batch", "heads", "columns"))
  r0 = q_tile * bq
  rows = pl.ds(r0, bq)
  cols = pl.ds(group * columns, columns)
  count = counts_ref[b, q_tile]

  def copies(n, slot):
    c0 = lists_ref[b, q_tile, n] * bk
    keys = pl.ds(c0, bk)
    return [(kt_ref.at[b, h, :, keys], kt_smem.at[slot]), (vt_ref.at[b, h, :, keys], vt_smem.at[slot]),
            (k_ref.at[b, h, keys, cols], k_smem.at[slot]), (k_attr_ref.at[b, :, keys], ka_smem.at[slot])]

  own = [(q_ref.at[b, h, rows, :], q_smem), (do_ref.at[b, h, rows, :], do_smem), (lse_ref.at[b, h, rows], lse_smem),
         (delta_ref.at[b, h, rows], delta_smem), (q_attr_ref.at[b, :, rows], qa_smem)]
  _fetch(own, own_bars, 0)

  @pl.when(count > 0)
  def _():
    _fetch(copies(0, 0), bars, 0)

  _wait(own_bars, 0, len(own), range(len(own)))
  q_vectors = _attribute_vectors(regs, qa_smem, num_attributes(spec, "q"), 0)
  lse = regs.vector(lse_smem, 0)
  delta = regs.vector(delta_smem, 0)

  def visit(n, dq):
    slot = lax.rem(n, 2)

    @pl.when(n + 1 < count)
    def _():
      _fetch(copies(n + 1, 1 - slot), bars, 1 - slot)

    _wait(bars, slot, 4, (0, 1, 3))
    s = _matmul(q_smem, kt_smem.at[slot], (bq, bk))
    if scale != 1.0:
      s = s * scale
    mask = _tile_mask(spec, q_vectors, _attribute_vectors(regs, ka_smem.at[slot], num_attributes(spec, "k"), 1),
                      (bq, bk))
    p = jnp.where(mask, jnp.exp(s - lax.broadcast_in_dim(lse, (bq, bk), (0,))), 0.0)
    dp = _matmul(do_smem, vt_smem.at[slot], (bq, bk))
    ds = p * (dp - lax.broadcast_in_dim(delta, (bq, bk), (0,)))
    ds_smem[...] = ds.astype(ds_smem.dtype)
    plgpu.commit_smem()
    _wait(bars, slot, 4, (2,))
    return dq + _matmul(ds_smem, k_smem.at[slot], (bq, columns))

  dq = lax.fori_loop(0, count, visit, regs.full((bq, columns), 0.0))
  dq_smem[...] = (dq if scale == 1.0 else dq * scale).astype(dq_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, h, rows, cols])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(lists_ref, counts_ref, q_attr_ref, k_attr_ref, q_ref, qt_ref, k_ref, v_ref, do_ref, dot_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, ka_smem, qt_smem, dot_smem, q_smem, do_smem,
                lse_smem, delta_smem, qa_smem, pt_smem, dst_smem, dk_smem, dv_smem, own_bars, bars, *, spec, tiling,
                columns, scale, compiled):
  bq, bk = tiling.block_q, tiling.block_k
  regs = _Regs(compiled)
  k_tile, b, h, group = (lax.axis_index(n) for n in ("tiles", "batch", "heads", "columns"))
  keys = pl.ds(k_tile * bk, bk)
  cols = pl.ds(group * columns, columns)
  count = counts_ref[b, k_tile]

  def copies(n, slot):
    rows = pl.ds(lists_ref[b, k_tile, n] * bq, bq)
    return [(qt_ref.at[b, h, :, rows], qt_smem.at[slot]), (dot_ref.at[b, h, :, rows], dot_smem.at[slot]),
            (lse_ref.at[b, h, rows], lse_smem.at[slot]), (delta_ref.at[b, h, rows], delta_smem.at[slot]),
            (q_attr_ref.at[b, :, rows], qa_smem.at[slot]), (q_ref.at[b, h, rows, cols], q_smem.at[slot]),
            (do_ref.at[b, h, rows, cols], do_smem.at[slot])]

  own = [(k_ref.at[b, h, keys, :], k_smem), (v_ref.at[b, h, keys, :], v_smem), (k_attr_ref.at[b, :, keys], ka_smem)]
  _fetch(own, own_bars, 0)

  @pl.when(count > 0)
  def _():
    _fetch(copies(0, 0), bars, 0)

  _wait(own_bars, 0, len(own), range(len(own)))
  k_vectors = _attribute_vectors(regs, ka_smem, num_attributes(spec, "k"), 0)

  def visit(n, carry):
    dk, dv = carry
    slot = lax.rem(n, 2)

    @pl.when(n + 1 < count)
    def _():
      _fetch(copies(n + 1, 1 - slot), bars, 1 - slot)

    _wait(bars, slot, 7, (0, 1, 2, 3, 4))
    st = _matmul(k_smem, qt_smem.at[slot], (bk, bq))  # S^T: keys along the rows
    if scale != 1.0:
      st = st * scale
    q_vectors = _attribute_vectors(regs, qa_smem.at[slot], num_attributes(spec, "q"), 1)
    mask = _tile_mask_transposed(spec, q_vectors, k_vectors, (bk, bq))
    lse = lax.broadcast_in_dim(regs.vector(lse_smem.at[slot], 1), (bk, bq), (1,))
    delta = lax.broadcast_in_dim(regs.vector(delta_smem.at[slot], 1), (bk, bq), (1,))
    pt = jnp.where(mask, jnp.exp(st - lse), 0.0)
    dpt = _matmul(v_smem, dot_smem.at[slot], (bk, bq))
    dst = pt * (dpt - delta)
    pt_smem[...] = pt.astype(pt_smem.dtype)
    dst_smem[...] = dst.astype(dst_smem.dtype)
    plgpu.commit_smem()
    _wait(bars, slot, 7, (5, 6))
    dv = dv + _matmul(pt_smem, do_smem.at[slot], (bk, columns))
    dk = dk + _matmul(dst_smem, q_smem.at[slot], (bk, columns))
    return dk, dv

  zeros = regs.full((bk, columns), 0.0)
  dk, dv = lax.fori_loop(0, count, visit, (zeros, zeros))
  dk_smem[...] = (dk if scale == 1.0 else dk * scale).astype(dk_smem.dtype)
  dv_smem[...] = dv.astype(dv_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[b, h, keys, cols])
  plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[b, h, keys, cols])
  plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, do, lse, delta, q_attrs, k_attrs, q_lists, q_counts, k_lists, k_counts, *, spec: MaskSpec,
             tiling: MosaicTiling, scale: float, interpret: bool):
  """(dq, dk, dv) of the padded stacked layout, in the dtypes of q, k and v. `q_lists` are the key tiles each row
  tile visits, `k_lists` the row tiles each key tile visits (the same table transposed)."""
  B, K, R, H = q.shape
  S = k.shape[2]
  bq, bk = tiling.block_q, tiling.block_k
  groups, columns = column_groups(H, tiling.max_columns)
  dtype = q.dtype
  aq, ak = num_attributes(spec, "q"), num_attributes(spec, "k")
  common = dict(spec=spec, tiling=tiling, columns=columns, scale=scale, compiled=not interpret)
  mesh = dict(grid_names=("tiles", "batch", "heads", "columns"), num_threads=1, thread_name="warpgroup",
              **_mosaic_compat.kernel_kwargs(interpret))
  t = lambda x: jnp.swapaxes(x, 2, 3)  # noqa: E731  [B, K, T, H] -> [B, K, H, T]
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, **common),
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[
          _swizzled((bq, H), dtype), _swizzled((bq, H), dtype),  # q, dO
          plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((bq,), jnp.float32),  # lse, delta
          plgpu.SMEM((aq, bq), jnp.int32),
          _swizzled((2, H, bk), dtype), _swizzled((2, H, bk), dtype),  # k^T, v^T
          _swizzled((2, bk, columns), dtype),  # k columns
          plgpu.SMEM((2, ak, bk), jnp.int32),
          _swizzled((bq, bk), dtype),  # dS
          _swizzled((bq, columns), dtype),  # dQ columns
          plgpu.Barrier(num_barriers=5), plgpu.Barrier(num_barriers=8),
      ],
      grid=(R // bq, B, K, groups),
      kernel_name="mosaic_flash_attention_dq",
      **mesh,
  )(q_lists, q_counts, q_attrs, k_attrs, q, k, t(k), t(v), do, lse, delta)
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, **common),
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      scratch_types=[
          _swizzled((bk, H), dtype), _swizzled((bk, H), dtype),  # k, v
          plgpu.SMEM((ak, bk), jnp.int32),
          _swizzled((2, H, bq), dtype), _swizzled((2, H, bq), dtype),  # q^T, dO^T
          _swizzled((2, bq, columns), dtype), _swizzled((2, bq, columns), dtype),  # q, dO columns
          plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32),  # lse, delta
          plgpu.SMEM((2, aq, bq), jnp.int32),
          _swizzled((bk, bq), dtype), _swizzled((bk, bq), dtype),  # P^T, dS^T
          _swizzled((bk, columns), dtype), _swizzled((bk, columns), dtype),  # dK, dV columns
          plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=14),
      ],
      grid=(S // bk, B, K, groups),
      kernel_name="mosaic_flash_attention_dkv",
      **mesh,
  )(k_lists, k_counts, q_attrs, k_attrs, q, t(q), k, v, do, t(do), lse, delta)
  return dq, dk, dv

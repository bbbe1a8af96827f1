"""Flash-attention kernels on the Pallas Mosaic GPU backend (Hopper, sm_90a): forward, dQ and dK/dV under a MaskSpec.

The same algorithm, layout and mask handling as the Triton kernels (`attention.py`), written for Hopper's units:
operand tiles reach shared memory by TMA copies, each signalling a barrier; both matmuls of each step run on the
tensor cores as wgmma (one warpgroup per program, whose owned tile is one 64-row wgmma M-tile); with two SMEM stages
the next visited key (or query) tile is fetched into the other slot while the current one is computed.

Layout (the wrapper, `attention_mosaic_ops.py`, builds it): the G query heads sharing a key head are stacked as G
consecutive rows per query, so queries are [B, K, R, Hp] and keys and values [B, K, S, Hp], with R, S padded to
multiples of the tiles and the head dim Hp to a multiple of 64. Padded rows and keys carry segment ids no real token
has (-2 and -1), so the mask rule drops them. The wrapper also passes transposed copies ([B, K, Hp, T]) of the
operands that appear as the right-hand side of a q k^T-like product: the Mosaic GPU interpreter of jax 0.10.2
applies no transpose transform to a wgmma operand (`ref.transpose`), so every wgmma here reads both operands
from SMEM in their natural [M, K] x [K, N] orientation, compiled or interpreted.

A program owns one row tile (forward, dQ) or key tile (dK/dV) of one (batch row, key head) and loops over the tiles
of the other side that `attention_mask.tile_visits` leaves (compacted into lists), so fully masked tiles are never
fetched. Inside a visited tile the mask comes from the per-token attributes (`attention_mask.visible`), copied to
SMEM with the tile and broadcast along the wgmma accumulator's layout. Scores, softmax statistics and accumulators
are float32; probabilities and score gradients are cast to the operand dtype and written to SMEM as the left-hand
operand of the second wgmma (Hopper's wgmma may also take it from registers; the 0.10.2 interpreter cannot, so this
port keeps one formulation that both run).

Accumulated outputs wider than `max_columns` (the forward's [rows, Hp] output, dQ, dK and dV) are split into column
groups along a grid axis: each program recomputes the scores over the full head dim and accumulates only its
columns, which keeps a warpgroup's float32 accumulators within its registers at head dims 256 and 512.
`choose_tiling` picks each kernel's tiles so that its SMEM (`shared_memory_bytes`) fits a Hopper block's 227 KiB.
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
# wgmma's M-tile (the rows one warpgroup owns) and the head-dim padding (a 128-byte swizzled bf16 row).
LANE = 64


# Hopper's shared memory per thread block (227 KiB), the budget every tiling of the table fits.
MAX_SHARED_BYTES = 232448


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
  """One kernel's tiles: block_q rows by block_k keys per step, `stages` SMEM slots for the streamed tiles (2: the
  next visited tile is fetched while the current one computes; 1: fetched when needed, to fit large head dims), and
  `max_columns`, the widest float32 accumulator a program keeps ([rows, max_columns]; wider outputs are split into
  column groups). The side a kernel owns (rows forward and for dQ, keys for dK/dV) is a wgmma M-tile: a multiple of
  64 (checked per kernel); the streamed side a multiple of 32."""
  block_q: int = 64
  block_k: int = 64
  max_columns: int = 256
  stages: int = 2

  def __post_init__(self):
    for name, multiple in (("block_q", 32), ("block_k", 32), ("max_columns", LANE)):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % multiple:
        raise ValueError(f"MosaicTiling.{name}={value!r}: must be a positive multiple of {multiple} (wgmma tiles)")
    if self.stages not in (1, 2):
      raise ValueError(f"MosaicTiling.stages={self.stages!r}: 1 or 2 SMEM slots")


KERNELS = ("forward", "dq", "dkv")


def check_tiling(kernel: str, tiling: MosaicTiling):
  owned = tiling.block_k if kernel == "dkv" else tiling.block_q
  if owned % LANE:
    name = "block_k" if kernel == "dkv" else "block_q"
    raise ValueError(f"MosaicTiling.{name}={owned}: the {kernel} kernel's rows are a wgmma M-tile, a multiple of "
                     f"{LANE}")


def choose_tiling(kernel: str, head_dim: int) -> MosaicTiling:
  """The tiling of `kernel` ('forward', 'dq' or 'dkv') at a padded head dim: 64 x 64 tiles, double-buffered where
  SMEM allows; accumulators of at most 256 float32 columns forward (128 registers a thread at 64 rows) and 128 for
  dQ and for dK/dV (two accumulators). Head dim 512 streams 32-row / 32-key tiles in the backward and splits dK/dV
  into 64-column groups to fit the 227 KiB of SMEM (`shared_memory_bytes`). Not yet tuned on a GPU."""
  if kernel == "forward":
    return MosaicTiling(64, 64, max_columns=256, stages=2 if head_dim <= 256 else 1)
  if kernel == "dq":
    if head_dim <= 128:
      return MosaicTiling(64, 64, max_columns=128, stages=2)
    return MosaicTiling(64, 64 if head_dim <= 256 else 32, max_columns=128, stages=1)
  if kernel == "dkv":
    if head_dim <= 128:
      return MosaicTiling(64, 64, max_columns=128, stages=2)
    if head_dim <= 256:
      return MosaicTiling(64, 64, max_columns=128, stages=1)
    return MosaicTiling(32, 64, max_columns=64, stages=1)
  raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")


def swizzle_bytes(tiling: MosaicTiling, columns: int, itemsize: int = 2) -> int:
  """One swizzle for every SMEM operand of a kernel (wgmma needs the same on both sides): the widest of 128, 64 and
  32 bytes that divides every tile's minor dimension (head dim, block_q, block_k, column group)."""
  narrowest = min(tiling.block_q, tiling.block_k, columns) * itemsize
  for swizzle in (128, 64, 32):
    if narrowest % swizzle == 0:
      return swizzle
  raise ValueError(f"{tiling}: a tile narrower than 32 bytes cannot be swizzled for wgmma")


def shared_memory_bytes(kernel: str, tiling: MosaicTiling, head_dim: int, itemsize: int = 2,
                        attributes: int = 5) -> int:
  """SMEM of `kernel`'s buffers at a padded head dim (operand tiles, accumulator staging, attributes, statistics)."""
  bq, bk, n = tiling.block_q, tiling.block_k, tiling.stages
  columns = column_groups(head_dim, tiling.max_columns)[1]
  if kernel == "forward":
    tiles = bq * head_dim + n * (head_dim * bk + bk * columns) + bq * bk + bq * columns
    small = bq * 4 + attributes * (bq + n * bk) * 4
  elif kernel == "dq":
    tiles = 2 * bq * head_dim + n * (2 * head_dim * bk + bk * columns) + bq * bk + bq * columns
    small = 2 * bq * 4 + attributes * (bq + n * bk) * 4
  else:
    tiles = 2 * bk * head_dim + n * (2 * head_dim * bq + 2 * bq * columns) + 2 * bk * bq + bk * columns
    small = n * 2 * bq * 4 + attributes * (bk + n * bq) * 4
  return tiles * itemsize + small


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


def _swizzled(shape, dtype, swizzle: int):
  """An SMEM operand tile stored as (8, swizzle / itemsize) tiles with a `swizzle`-byte swizzle (wgmma's layout)."""
  elements = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elements)), plgpu.SwizzleTransform(swizzle)))


def _prefetched_loop(count, stages, fetch, body, init):
  """fori_loop over the `count` visited tiles; `fetch(n, slot)` starts tile n's copies into SMEM slot `slot`.
  With 2 stages tile n + 1 is fetched into the other slot when step n starts (the slot step n - 1 has finished
  reading: its wgmmas were awaited), with 1 stage tile n when step n starts. body(n, slot, carry) -> carry."""
  if stages == 2:
    @pl.when(count > 0)
    def _():
      fetch(0, 0)

  def step(n, carry):
    slot = lax.rem(n, stages)
    if stages == 2:
      @pl.when(n + 1 < count)
      def _():
        fetch(n + 1, 1 - slot)
    else:
      fetch(n, slot)
    return body(n, slot, carry)

  return lax.fori_loop(0, count, step, init)


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
      return _mosaic_compat.load(ref, layout=plgpu.Layout.WGMMA.reduce(1 - along))
    return ref[...]


def _tile_mask(spec: MaskSpec, q_vectors, k_vectors, shape, q_axis: int = 0):
  """The bool mask of one tile from the attribute vectors of its rows and keys, queries along axis `q_axis` of
  `shape` (0: a [rows, keys] tile; 1: the dK/dV kernel's [keys, rows] S^T)."""
  col = lambda x: lax.broadcast_in_dim(x, shape, (q_axis,))  # noqa: E731  (query attributes)
  row = lambda x: lax.broadcast_in_dim(x, shape, (1 - q_axis,))  # noqa: E731  (key attributes)
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
                    q_smem, kt_smem, v_smem, p_smem, o_smem, lse_smem, qa_smem, ka_smem, own_bars, bars, *, spec,
                    tiling, columns, scale, compiled):
  bq, bk = tiling.block_q, tiling.block_k
  regs = _Regs(compiled)
  q_tile, b, h, group = (lax.axis_index(n) for n in ("tiles", "batch", "heads", "columns"))
  rows = pl.ds(q_tile * bq, bq)
  cols = pl.ds(group * columns, columns)
  count = counts_ref[b, q_tile]

  def fetch(n, slot):
    keys = pl.ds(lists_ref[b, q_tile, n] * bk, bk)
    _fetch([(kt_ref.at[b, h, :, keys], kt_smem.at[slot]), (k_attr_ref.at[b, :, keys], ka_smem.at[slot]),
            (v_ref.at[b, h, keys, cols], v_smem.at[slot])], bars, slot)

  own = [(q_ref.at[b, h, rows, :], q_smem), (q_attr_ref.at[b, :, rows], qa_smem)]
  _fetch(own, own_bars, 0)
  _wait(own_bars, 0, len(own), range(len(own)))
  q_vectors = _attribute_vectors(regs, qa_smem, num_attributes(spec, "q"), 0)

  def visit(n, slot, carry):
    acc, m_prev, l_prev = carry
    _wait(bars, slot, 3, (0, 1))
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
    _wait(bars, slot, 3, (2,))
    pv = _matmul(p_smem, v_smem.at[slot], (bq, columns))
    acc = lax.broadcast_in_dim(correction, (bq, columns), (0,)) * acc + pv
    return acc, m_next, l_next

  init = (regs.full((bq, columns), 0.0), regs.full((bq,), _MASKED_SCORE), regs.full((bq,), 0.0))
  acc, m, l = _prefetched_loop(count, tiling.stages, fetch, visit, init)
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  o_smem[...] = (acc / lax.broadcast_in_dim(safe_l, (bq, columns), (0,))).astype(o_smem.dtype)
  lse_smem[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, rows, cols])

  @pl.when(group == 0)
  def _():
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, rows])

  plgpu.wait_smem_to_gmem(0)


def _launch(kernel, body, out_type, scratch, *, num_tiles, batch, heads, groups, interpret):
  return plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch,
      grid=(num_tiles, batch, heads, groups),
      grid_names=("tiles", "batch", "heads", "columns"),
      num_threads=1,
      thread_name="warpgroup",
      kernel_name=f"mosaic_flash_attention_{kernel}",
      **_mosaic_compat.kernel_kwargs(interpret),
  )


def forward(q, kt, v, q_attrs, k_attrs, lists, counts, *, spec: MaskSpec, tiling: MosaicTiling, scale: float,
            interpret: bool):
  """(out [B, K, R, Hp] in q's dtype, lse [B, K, R] float32) of the padded stacked layout; kt is k transposed
  ([B, K, Hp, S]). The row tiles are those of the visit lists (`counts` [B, tiles]); R and S cover them whole."""
  check_tiling("forward", tiling)
  B, K, R, H = q.shape
  bq, bk, n = tiling.block_q, tiling.block_k, tiling.stages
  groups, columns = column_groups(H, tiling.max_columns)
  swizzle = swizzle_bytes(tiling, columns)
  dtype = q.dtype
  aq, ak = num_attributes(spec, "q"), num_attributes(spec, "k")
  tile = lambda shape: _swizzled(shape, dtype, swizzle)  # noqa: E731
  scratch = [
      tile((bq, H)), tile((n, H, bk)), tile((n, bk, columns)),  # q, k^T, v columns
      tile((bq, bk)), tile((bq, columns)),  # p, output columns
      plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((aq, bq), jnp.int32), plgpu.SMEM((n, ak, bk), jnp.int32),
      plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=3 * n),
  ]
  body = functools.partial(_forward_kernel, spec=spec, tiling=tiling, columns=columns, scale=scale,
                           compiled=not interpret)
  out_type = (jax.ShapeDtypeStruct((B, K, R, H), dtype), jax.ShapeDtypeStruct((B, K, R), jnp.float32))
  return _launch("forward", body, out_type, scratch, num_tiles=counts.shape[1], batch=B, heads=K, groups=groups,
                 interpret=interpret)(lists, counts, q_attrs, k_attrs, q, kt, v)


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
  rows = pl.ds(q_tile * bq, bq)
  cols = pl.ds(group * columns, columns)
  count = counts_ref[b, q_tile]

  def fetch(n, slot):
    keys = pl.ds(lists_ref[b, q_tile, n] * bk, bk)
    _fetch([(kt_ref.at[b, h, :, keys], kt_smem.at[slot]), (vt_ref.at[b, h, :, keys], vt_smem.at[slot]),
            (k_attr_ref.at[b, :, keys], ka_smem.at[slot]), (k_ref.at[b, h, keys, cols], k_smem.at[slot])],
           bars, slot)

  own = [(q_ref.at[b, h, rows, :], q_smem), (do_ref.at[b, h, rows, :], do_smem), (lse_ref.at[b, h, rows], lse_smem),
         (delta_ref.at[b, h, rows], delta_smem), (q_attr_ref.at[b, :, rows], qa_smem)]
  _fetch(own, own_bars, 0)
  _wait(own_bars, 0, len(own), range(len(own)))
  q_vectors = _attribute_vectors(regs, qa_smem, num_attributes(spec, "q"), 0)
  lse = regs.vector(lse_smem, 0)
  delta = regs.vector(delta_smem, 0)

  def visit(n, slot, dq):
    _wait(bars, slot, 4, (0, 1, 2))
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
    _wait(bars, slot, 4, (3,))
    return dq + _matmul(ds_smem, k_smem.at[slot], (bq, columns))

  dq = _prefetched_loop(count, tiling.stages, fetch, visit, regs.full((bq, columns), 0.0))
  dq_smem[...] = (dq if scale == 1.0 else dq * scale).astype(dq_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, h, rows, cols])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(lists_ref, counts_ref, q_attr_ref, k_attr_ref, q_ref, qt_ref, k_ref, v_ref, do_ref, dot_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, ka_smem, qt_smem, dot_smem, q_smem, do_smem,
                lse_smem, delta_smem, qa_smem, pt_smem, dst_smem, out_smem, own_bars, bars, *, spec, tiling,
                columns, scale, compiled):
  bq, bk = tiling.block_q, tiling.block_k
  regs = _Regs(compiled)
  k_tile, b, h, group = (lax.axis_index(n) for n in ("tiles", "batch", "heads", "columns"))
  keys = pl.ds(k_tile * bk, bk)
  cols = pl.ds(group * columns, columns)
  count = counts_ref[b, k_tile]

  def fetch(n, slot):
    rows = pl.ds(lists_ref[b, k_tile, n] * bq, bq)
    _fetch([(qt_ref.at[b, h, :, rows], qt_smem.at[slot]), (lse_ref.at[b, h, rows], lse_smem.at[slot]),
            (q_attr_ref.at[b, :, rows], qa_smem.at[slot]), (dot_ref.at[b, h, :, rows], dot_smem.at[slot]),
            (delta_ref.at[b, h, rows], delta_smem.at[slot]), (q_ref.at[b, h, rows, cols], q_smem.at[slot]),
            (do_ref.at[b, h, rows, cols], do_smem.at[slot])], bars, slot)

  own = [(k_ref.at[b, h, keys, :], k_smem), (v_ref.at[b, h, keys, :], v_smem), (k_attr_ref.at[b, :, keys], ka_smem)]
  _fetch(own, own_bars, 0)
  _wait(own_bars, 0, len(own), range(len(own)))
  k_vectors = _attribute_vectors(regs, ka_smem, num_attributes(spec, "k"), 0)

  def visit(n, slot, carry):
    dk, dv = carry
    _wait(bars, slot, 7, (0, 1, 2))
    st = _matmul(k_smem, qt_smem.at[slot], (bk, bq))  # S^T: keys along the rows
    if scale != 1.0:
      st = st * scale
    q_vectors = _attribute_vectors(regs, qa_smem.at[slot], num_attributes(spec, "q"), 1)
    mask = _tile_mask(spec, q_vectors, k_vectors, (bk, bq), q_axis=1)
    lse = lax.broadcast_in_dim(regs.vector(lse_smem.at[slot], 1), (bk, bq), (1,))
    pt = jnp.where(mask, jnp.exp(st - lse), 0.0)
    _wait(bars, slot, 7, (3, 4))
    dpt = _matmul(v_smem, dot_smem.at[slot], (bk, bq))
    delta = lax.broadcast_in_dim(regs.vector(delta_smem.at[slot], 1), (bk, bq), (1,))
    dst = pt * (dpt - delta)
    pt_smem[...] = pt.astype(pt_smem.dtype)
    dst_smem[...] = dst.astype(dst_smem.dtype)
    plgpu.commit_smem()
    _wait(bars, slot, 7, (5, 6))
    dv = dv + _matmul(pt_smem, do_smem.at[slot], (bk, columns))
    dk = dk + _matmul(dst_smem, q_smem.at[slot], (bk, columns))
    return dk, dv

  zeros = regs.full((bk, columns), 0.0)
  dk, dv = _prefetched_loop(count, tiling.stages, fetch, visit, (zeros, zeros))
  # dK then dV through one staging tile (SMEM is what limits head dim 512 here).
  out_smem[...] = (dk if scale == 1.0 else dk * scale).astype(out_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, dk_ref.at[b, h, keys, cols])
  plgpu.wait_smem_to_gmem(0)
  out_smem[...] = dv.astype(out_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, dv_ref.at[b, h, keys, cols])
  plgpu.wait_smem_to_gmem(0)


def dq(q, k, kt, vt, do, lse, delta, q_attrs, k_attrs, lists, counts, *, spec: MaskSpec, tiling: MosaicTiling,
       scale: float, interpret: bool):
  """dQ [B, K, R, Hp] of the padded stacked layout; kt, vt are k and v transposed ([B, K, Hp, S]); `lists` the key
  tiles each row tile visits."""
  check_tiling("dq", tiling)
  B, K, R, H = q.shape
  bq, bk, n = tiling.block_q, tiling.block_k, tiling.stages
  groups, columns = column_groups(H, tiling.max_columns)
  dtype = q.dtype
  aq, ak = num_attributes(spec, "q"), num_attributes(spec, "k")
  tile = lambda shape: _swizzled(shape, dtype, swizzle_bytes(tiling, columns))  # noqa: E731
  scratch = [
      tile((bq, H)), tile((bq, H)),  # q, dO
      plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((aq, bq), jnp.int32),
      tile((n, H, bk)), tile((n, H, bk)), tile((n, bk, columns)),  # k^T, v^T, k columns
      plgpu.SMEM((n, ak, bk), jnp.int32),
      tile((bq, bk)), tile((bq, columns)),  # dS, dQ columns
      plgpu.Barrier(num_barriers=5), plgpu.Barrier(num_barriers=4 * n),
  ]
  body = functools.partial(_dq_kernel, spec=spec, tiling=tiling, columns=columns, scale=scale, compiled=not interpret)
  return _launch("dq", body, jax.ShapeDtypeStruct(q.shape, dtype), scratch, num_tiles=counts.shape[1], batch=B,
                 heads=K, groups=groups, interpret=interpret)(lists, counts, q_attrs, k_attrs, q, k, kt, vt, do, lse,
                                                              delta)


def dkv(q, qt, k, v, do, dot, lse, delta, q_attrs, k_attrs, lists, counts, *, spec: MaskSpec, tiling: MosaicTiling,
        scale: float, interpret: bool):
  """(dK, dV) [B, K, S, Hp] of the padded stacked layout; qt, dot are q and dO transposed ([B, K, Hp, R]); `lists`
  the row tiles each key tile visits."""
  check_tiling("dkv", tiling)
  B, K, S, H = k.shape
  bq, bk, n = tiling.block_q, tiling.block_k, tiling.stages
  groups, columns = column_groups(H, tiling.max_columns)
  dtype = q.dtype
  aq, ak = num_attributes(spec, "q"), num_attributes(spec, "k")
  tile = lambda shape: _swizzled(shape, dtype, swizzle_bytes(tiling, columns))  # noqa: E731
  scratch = [
      tile((bk, H)), tile((bk, H)), plgpu.SMEM((ak, bk), jnp.int32),  # k, v, key attributes
      tile((n, H, bq)), tile((n, H, bq)), tile((n, bq, columns)), tile((n, bq, columns)),  # q^T, dO^T, q, dO columns
      plgpu.SMEM((n, bq), jnp.float32), plgpu.SMEM((n, bq), jnp.float32), plgpu.SMEM((n, aq, bq), jnp.int32),
      tile((bk, bq)), tile((bk, bq)), tile((bk, columns)),  # P^T, dS^T, dK then dV columns
      plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=7 * n),
  ]
  body = functools.partial(_dkv_kernel, spec=spec, tiling=tiling, columns=columns, scale=scale,
                           compiled=not interpret)
  out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  return _launch("dkv", body, out_type, scratch, num_tiles=counts.shape[1], batch=B, heads=K, groups=groups,
                 interpret=interpret)(lists, counts, q_attrs, k_attrs, q, qt, k, v, do, dot, lse, delta)

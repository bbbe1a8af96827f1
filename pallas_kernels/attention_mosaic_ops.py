"""Differentiable flash attention on the Mosaic GPU kernels (`attention_mosaic.py`): the custom_vjp entry
`flash_attention_mosaic`, with the same signature and semantics as `attention_ops.flash_attention` (Triton).

The wrapper stacks each key head's G = N / K query heads as rows ([B, K, L * G, H]), pads rows and keys to
multiples of the tiles and the head dim to a multiple of 64, builds per-token attribute arrays (the padding gets
segment ids no token has) and the per-tile visit lists, and passes transposed copies of the operands each kernel
reads as the right-hand side of a q k^T-like product (`attention_mosaic.py` says why). Residuals are q, k, v, the
output and the float32 log-sum-exp per row: memory linear in L.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic_compat
from pallas_kernels import attention_mosaic as kernels
from pallas_kernels.attention_mask import MaskSpec, tile_visits, visit_lists
from pallas_kernels.attention_mosaic import LANE, MosaicTiling
from pallas_kernels.attention_ops import attend_stacked, attribute_arrays

DTYPES = (jnp.bfloat16, jnp.float16)


def _split_tilings(tiling):
  """(forward, dq, dkv) tilings, each None (the table) or a MosaicTiling, from None, one tiling (or (block_q,
  block_k)) for every kernel, a (forward, backward) pair or a (forward, dq, dkv) triple."""
  as_tiling = lambda t: t if t is None or isinstance(t, MosaicTiling) else MosaicTiling(*t)  # noqa: E731
  if tiling is None or isinstance(tiling, MosaicTiling):
    return (tiling,) * 3
  tiling = tuple(tiling)
  if all(isinstance(t, int) for t in tiling):
    return (MosaicTiling(*tiling),) * 3
  if len(tiling) == 2:
    return (as_tiling(tiling[0]),) + (as_tiling(tiling[1]),) * 2
  if len(tiling) == 3:
    return tuple(as_tiling(t) for t in tiling)
  raise ValueError(f"tiling={tiling!r}: expected a MosaicTiling, (block_q, block_k), a (forward, backward) pair or "
                   f"a (forward, dq, dkv) triple")


def flash_attention_mosaic(q_BLNH, k_BSKH, v_BSKH, spec: MaskSpec, *, scale: float = 1.0, tiling=None,
                           interpret=None):
  """softmax(scale * q k^T) v under `spec` on the Mosaic GPU kernels; differentiable in q, k and v.

  Args as `attention_ops.flash_attention`, except: q, k and v are bfloat16 or float16 (wgmma operands) of one dtype;
  `tiling` is None (`attention_mosaic.choose_tiling`), a MosaicTiling or (block_q, block_k) for every kernel, a
  (forward, backward) pair or a (forward, dq, dkv) triple of those;
  `interpret` runs the Mosaic GPU interpreter (None: interpret unless the default backend is a GPU).

  Returns:
    [B, L, N, H] in q's dtype; a query that sees no key gets zeros.
  """
  def run(q_BKRH, k_BKSH, v_BKSH, G):
    dtypes = {jnp.dtype(x.dtype) for x in (q_BKRH, k_BKSH, v_BKSH)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in map(jnp.dtype, DTYPES):
      raise ValueError(f"flash_attention_mosaic: q, k and v must share one of bfloat16, float16 (wgmma operands); "
                       f"got {sorted(str(d) for d in dtypes)}")
    return _flash(q_BKRH, k_BKSH, v_BKSH, spec, G, float(scale), _split_tilings(tiling),
                  _mosaic_compat.resolve_interpret(interpret))

  # wgmma's K dimension: the head dim padded to whole 64-column lanes (zero columns change nothing).
  return attend_stacked("flash_attention_mosaic", q_BLNH, k_BSKH, v_BSKH, spec, lambda H: -(-H // LANE) * LANE,
                        run)


def _tiling_for(kernel, tiling, head_dim):
  return tiling if tiling is not None else kernels.choose_tiling(kernel, head_dim)


def _pad_to(x, axis, multiple, value=0):
  size = x.shape[axis]
  extra = -size % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)



def _padded_attributes(spec, rows_per_query, row_multiple, key_multiple):
  """Attribute arrays padded to whole tiles: padded rows and keys get segment ids no token has."""
  q_attrs, k_attrs = attribute_arrays(spec, rows_per_query)
  q_seg = _pad_to(q_attrs[:, :1], 2, row_multiple, kernels.QUERY_OUTSIDE)
  k_seg = _pad_to(k_attrs[:, :1], 2, key_multiple, kernels.KEY_OUTSIDE)
  q_attrs = jnp.concatenate([q_seg, _pad_to(q_attrs[:, 1:], 2, row_multiple)], axis=1)
  k_attrs = jnp.concatenate([k_seg, _pad_to(k_attrs[:, 1:], 2, key_multiple)], axis=1)
  return q_attrs, k_attrs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, spec, rows_per_query, scale, tilings, interpret):
  return _flash_fwd(q, k, v, spec, rows_per_query, scale, tilings, interpret)[0]


def _flash_fwd(q, k, v, spec, rows_per_query, scale, tilings, interpret):
  tiling = _tiling_for("forward", tilings[0], q.shape[-1])
  bq, bk = tiling.block_q, tiling.block_k
  R = q.shape[2]
  q_attrs, k_attrs = _padded_attributes(spec, rows_per_query, bq, bk)
  lists, counts = visit_lists(tile_visits(spec, bq, bk, rows_per_query=rows_per_query))
  kp = _pad_to(k, 2, bk)
  out, lse = kernels.forward(_pad_to(q, 2, bq), jnp.swapaxes(kp, 2, 3), _pad_to(v, 2, bk), q_attrs, k_attrs, lists,
                             counts, spec=spec, tiling=tiling, scale=scale, interpret=interpret)
  out, lse = out[:, :, :R], lse[:, :, :R]
  return out, (q, k, v, spec, out, lse)


def _flash_bwd(rows_per_query, scale, tilings, interpret, residuals, do):
  q, k, v, spec, out, lse = residuals
  H = q.shape[-1]
  dq_tiling, dkv_tiling = _tiling_for("dq", tilings[1], H), _tiling_for("dkv", tilings[2], H)
  R, S = q.shape[2], k.shape[2]
  # One padding serves both kernels: rows and keys to multiples of both kernels' tiles.
  rm = math.lcm(dq_tiling.block_q, dkv_tiling.block_q)
  km = math.lcm(dq_tiling.block_k, dkv_tiling.block_k)
  q_attrs, k_attrs = _padded_attributes(spec, rows_per_query, rm, km)
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  qp, kp, vp = _pad_to(q, 2, rm), _pad_to(k, 2, km), _pad_to(v, 2, km)
  dop = _pad_to(do.astype(q.dtype), 2, rm)
  lse, delta = _pad_to(lse, 2, rm), _pad_to(delta, 2, rm)
  t = lambda x: jnp.swapaxes(x, 2, 3)  # noqa: E731  [B, K, T, H] -> [B, K, H, T]
  common = dict(spec=spec, scale=scale, interpret=interpret)
  visits = tile_visits(spec, dq_tiling.block_q, dq_tiling.block_k, rows_per_query=rows_per_query)
  dq = kernels.dq(qp, kp, t(kp), t(vp), dop, lse, delta, q_attrs, k_attrs, *visit_lists(visits), tiling=dq_tiling,
                  **common)
  if (dkv_tiling.block_q, dkv_tiling.block_k) != (dq_tiling.block_q, dq_tiling.block_k):
    visits = tile_visits(spec, dkv_tiling.block_q, dkv_tiling.block_k, rows_per_query=rows_per_query)
  dk, dv = kernels.dkv(qp, t(qp), kp, vp, dop, t(dop), lse, delta, q_attrs, k_attrs,
                       *visit_lists(jnp.swapaxes(visits, 1, 2)), tiling=dkv_tiling, **common)
  return dq[:, :, :R], dk[:, :, :S], dv[:, :, :S], None


_flash.defvjp(_flash_fwd, _flash_bwd)

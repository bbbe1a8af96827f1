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

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic_compat
from pallas_kernels import attention_mosaic as kernels
from pallas_kernels.attention_mask import MaskSpec, tile_visits, visit_lists
from pallas_kernels.attention_mosaic import LANE, MosaicTiling
from pallas_kernels.attention_ops import attribute_arrays

DTYPES = (jnp.bfloat16, jnp.float16)


def _split_tilings(tiling):
  """None, one tiling for both passes, or a (forward, backward) pair; each a MosaicTiling or (block_q, block_k)."""
  as_tiling = lambda t: t if t is None or isinstance(t, MosaicTiling) else MosaicTiling(*t)  # noqa: E731
  if tiling is None or isinstance(tiling, MosaicTiling):
    return (tiling, tiling)
  tiling = tuple(tiling)
  if len(tiling) == 2 and all(t is None or isinstance(t, (MosaicTiling, tuple, list)) for t in tiling):
    return tuple(as_tiling(t) for t in tiling)
  return (MosaicTiling(*tiling),) * 2


def choose_mosaic_tiling(direction: str, head_dim: int) -> MosaicTiling:
  """64 x 64 tiles (one wgmma M-tile per warpgroup); accumulators of at most 256 float32 columns forward (128
  registers a thread at 64 rows) and 128 backward, where dK and dV are accumulated together. Not yet tuned on a GPU."""
  del head_dim
  return MosaicTiling(64, 64, max_columns=256 if direction == "forward" else 128)


def flash_attention_mosaic(q_BLNH, k_BSKH, v_BSKH, spec: MaskSpec, *, scale: float = 1.0, tiling=None,
                           interpret=None):
  """softmax(scale * q k^T) v under `spec` on the Mosaic GPU kernels; differentiable in q, k and v.

  Args as `attention_ops.flash_attention`, except: q, k and v are bfloat16 or float16 (wgmma operands) of one dtype;
  `tiling` is None, a MosaicTiling or (block_q, block_k) for both passes, or a (forward, backward) pair of those;
  `interpret` runs the Mosaic GPU interpreter (None: interpret unless the default backend is a GPU).

  Returns:
    [B, L, N, H] in q's dtype; a query that sees no key gets zeros.
  """
  B, L, N, H = q_BLNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if k_BSKH.shape != (B, S, K, H) or v_BSKH.shape != k_BSKH.shape or N % K:
    raise ValueError(f"flash_attention_mosaic: expected q [B, L, N, H], k and v [B, S, K, H] with K dividing N; "
                     f"got q {q_BLNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}")
  if spec.q.segment_ids.shape != (B, L) or spec.kv.segment_ids.shape != (B, S):
    raise ValueError(f"flash_attention_mosaic: the mask describes {spec.q.segment_ids.shape} queries and "
                     f"{spec.kv.segment_ids.shape} keys, the inputs have [{B}, {L}] and [{B}, {S}]")
  dtypes = {jnp.dtype(x.dtype) for x in (q_BLNH, k_BSKH, v_BSKH)}
  if len(dtypes) != 1 or next(iter(dtypes)) not in map(jnp.dtype, DTYPES):
    raise ValueError(f"flash_attention_mosaic: q, k and v must share one of bfloat16, float16 (wgmma operands); got "
                     f"{sorted(str(d) for d in dtypes)}")
  G = N // K
  padded = -(-H // LANE) * LANE
  pad = lambda x: x if padded == H else jnp.pad(x, ((0, 0),) * 3 + ((0, padded - H),))  # noqa: E731
  q_BKRH = pad(q_BLNH).reshape(B, L, K, G, padded).transpose(0, 2, 1, 3, 4).reshape(B, K, L * G, padded)
  k_BKSH = pad(k_BSKH).transpose(0, 2, 1, 3)
  v_BKSH = pad(v_BSKH).transpose(0, 2, 1, 3)
  out_BKRH = _flash(q_BKRH, k_BKSH, v_BKSH, spec, G, float(scale), _split_tilings(tiling),
                    _mosaic_compat.resolve_interpret(interpret))
  out_BLNH = out_BKRH.reshape(B, K, L, G, padded).transpose(0, 2, 1, 3, 4).reshape(B, L, N, padded)
  return out_BLNH[..., :H]


def _tiling_for(direction, tiling, head_dim):
  return tiling if tiling is not None else choose_mosaic_tiling(direction, head_dim)


def _pad_to(x, axis, multiple, value=0):
  size = x.shape[axis]
  extra = -size % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _padded_attributes(spec, rows_per_query, tiling):
  """Attribute arrays padded to whole tiles: padded rows and keys get segment ids no token has."""
  q_attrs, k_attrs = attribute_arrays(spec, rows_per_query)
  q_seg = _pad_to(q_attrs[:, :1], 2, tiling.block_q, kernels.QUERY_OUTSIDE)
  k_seg = _pad_to(k_attrs[:, :1], 2, tiling.block_k, kernels.KEY_OUTSIDE)
  q_attrs = jnp.concatenate([q_seg, _pad_to(q_attrs[:, 1:], 2, tiling.block_q)], axis=1)
  k_attrs = jnp.concatenate([k_seg, _pad_to(k_attrs[:, 1:], 2, tiling.block_k)], axis=1)
  return q_attrs, k_attrs


def _padded(q, k, v, tiling):
  return _pad_to(q, 2, tiling.block_q), _pad_to(k, 2, tiling.block_k), _pad_to(v, 2, tiling.block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, spec, rows_per_query, scale, tilings, interpret):
  return _flash_fwd(q, k, v, spec, rows_per_query, scale, tilings, interpret)[0]


def _flash_fwd(q, k, v, spec, rows_per_query, scale, tilings, interpret):
  tiling = _tiling_for("forward", tilings[0], q.shape[-1])
  R = q.shape[2]
  q_attrs, k_attrs = _padded_attributes(spec, rows_per_query, tiling)
  lists, counts = visit_lists(tile_visits(spec, tiling.block_q, tiling.block_k, rows_per_query=rows_per_query))
  qp, kp, vp = _padded(q, k, v, tiling)
  out, lse = kernels.forward(qp, jnp.swapaxes(kp, 2, 3), vp, q_attrs, k_attrs, lists, counts, spec=spec,
                             tiling=tiling, scale=scale, interpret=interpret)
  out, lse = out[:, :, :R], lse[:, :, :R]
  return out, (q, k, v, spec, out, lse)


def _flash_bwd(rows_per_query, scale, tilings, interpret, residuals, do):
  q, k, v, spec, out, lse = residuals
  tiling = _tiling_for("backward", tilings[1], q.shape[-1])
  R, S = q.shape[2], k.shape[2]
  q_attrs, k_attrs = _padded_attributes(spec, rows_per_query, tiling)
  visits = tile_visits(spec, tiling.block_q, tiling.block_k, rows_per_query=rows_per_query)
  q_lists, q_counts = visit_lists(visits)
  k_lists, k_counts = visit_lists(jnp.swapaxes(visits, 1, 2))
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  qp, kp, vp = _padded(q, k, v, tiling)
  dq, dk, dv = kernels.backward(qp, kp, vp, _pad_to(do.astype(q.dtype), 2, tiling.block_q),
                                _pad_to(lse, 2, tiling.block_q), _pad_to(delta, 2, tiling.block_q), q_attrs, k_attrs,
                                q_lists, q_counts, k_lists, k_counts, spec=spec, tiling=tiling, scale=scale,
                                interpret=interpret)
  return dq[:, :, :R], dk[:, :, :S], dv[:, :, :S], None


_flash.defvjp(_flash_fwd, _flash_bwd)

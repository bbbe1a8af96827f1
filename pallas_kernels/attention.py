"""Pallas flash-attention kernels (Triton-compatible): forward, dQ and dK/dV, masks evaluated per tile.

Layout: the G query heads that share a key head are stacked as G consecutive rows per query (GQA), so queries are
[B, K, R = L * G, H] and keys and values [B, K, S, H]. A program owns one tile of rows (forward, dQ) or of keys
(dK/dV) of one (batch row, key head) and loops over the tiles of the other side that the mask description leaves
visible (`attention_mask.tile_visits`, compacted into lists), so fully masked tiles cost nothing and no [L, S]
array is ever built. Inside a visited tile the mask comes from the per-token attributes (`attention_mask.visible`).

As in the grouped-matmul kernels, every array is passed whole and indexed with pl.ds windows, with masked loads
and stores at the edges, so L and S need not be multiples of the tiles. Loads past the end read a segment id no
real token has (queries -2, keys -1), which the rule never matches. Scores, softmax statistics and accumulators
are float32; operand tiles are cast to `compute_dtype` before each dot. A query that sees no key gets a zero
output and zero gradients (the `xla` path does the same), not the mean of the values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.attention_mask import MaskSpec, visible
from pallas_kernels.attention_tiling import AttentionTiling

# Scores of masked pairs before they are dropped; below any real score, finite so no inf - inf appears.
_MASKED_SCORE = -1e30
_QUERY_OUTSIDE, _KEY_OUTSIDE = -2, -1
# Rows of the attribute arrays (attention_ops.attribute_arrays).
SEG, POS, CANVAS, BLOCK, START = range(5)


def _edge_mask(start, block: int, size: int):
  """In-bounds mask of [start, start + block) along an axis of `size`, or None when no window can run past."""
  if size % block == 0:
    return None
  return start + jnp.arange(block) < size


def _load(ref_view, ok, shape, dtype, other=0):
  """A [rows, H] tile (ok masks rows) or a [rows] vector, cast to dtype."""
  if ok is None:
    return _compat.load(ref_view).astype(dtype)
  mask = jnp.broadcast_to(ok[:, None] if len(shape) == 2 else ok, shape)
  return _compat.load(ref_view, mask=mask, other=other).astype(dtype)


def _store(ref_view, value, ok):
  mask = None if ok is None else jnp.broadcast_to(ok[:, None] if value.ndim == 2 else ok, value.shape)
  _compat.store(ref_view, value.astype(ref_view.dtype), mask=mask)


def _attributes(attr_ref, b, start, block: int, ok, outside: int, count: int):
  """The per-token attribute vectors of one tile: (segment, position[, canvas, block[, window start]])."""
  out = []
  for row in range(count):
    fill = outside if row == SEG else 0
    out.append(_load(attr_ref.at[b, jnp.int32(row), pl.ds(start, block)], ok, (block,), jnp.int32, other=fill))
  return out


def _key_tile(k_ref, v_ref, k_attr_ref, b, h, c0, *, spec, kv_length, head_dim, tiling, compute_dtype):
  """(keys, values, key attributes, in-bounds mask) of the key tile starting at c0."""
  bk = tiling.block_k
  cols_ok = _edge_mask(c0, bk, kv_length)
  k = _load(k_ref.at[b, h, pl.ds(c0, bk), :], cols_ok, (bk, head_dim), compute_dtype)
  v = _load(v_ref.at[b, h, pl.ds(c0, bk), :], cols_ok, (bk, head_dim), compute_dtype)
  return k, v, _attributes(k_attr_ref, b, c0, bk, cols_ok, _KEY_OUTSIDE, num_attributes(spec, "k")), cols_ok


def _query_tile(q_ref, do_ref, lse_ref, delta_ref, q_attr_ref, b, h, r0, *, spec, rows, head_dim, tiling,
                compute_dtype):
  """(queries, output gradients, log-sum-exps, deltas, query attributes, in-bounds mask) of the row tile at r0."""
  bq = tiling.block_q
  rows_ok = _edge_mask(r0, bq, rows)
  q = _load(q_ref.at[b, h, pl.ds(r0, bq), :], rows_ok, (bq, head_dim), compute_dtype)
  do = _load(do_ref.at[b, h, pl.ds(r0, bq), :], rows_ok, (bq, head_dim), compute_dtype)
  lse = _load(lse_ref.at[b, h, pl.ds(r0, bq)], rows_ok, (bq,), jnp.float32)
  delta = _load(delta_ref.at[b, h, pl.ds(r0, bq)], rows_ok, (bq,), jnp.float32)
  q_attrs = _attributes(q_attr_ref, b, r0, bq, rows_ok, _QUERY_OUTSIDE, num_attributes(spec, "q"))
  return q, do, lse, delta, q_attrs, rows_ok


def _tile_mask(spec: MaskSpec, q_attrs, k_attrs):
  """[block_q, block_k] bool from the two tiles' attribute vectors."""
  col = lambda x: x[:, None]  # noqa: E731
  row = lambda x: x[None, :]  # noqa: E731
  args = [col(q_attrs[SEG]), col(q_attrs[POS]), row(k_attrs[SEG]), row(k_attrs[POS])]
  if spec.q.has_canvas:
    args += [col(q_attrs[CANVAS] != 0), row(k_attrs[CANVAS] != 0), col(q_attrs[BLOCK]), row(k_attrs[BLOCK]),
             col(q_attrs[START]) if spec.window else None]
  return visible(spec, *args)


def _precision(compute_dtype):
  """float32 operands get true float32 products: Triton would otherwise round them to TF32."""
  return lax.Precision.HIGHEST if jnp.dtype(compute_dtype) == jnp.float32 else None


def _dot(a, b, contract_a: int, contract_b: int, compute_dtype):
  return lax.dot_general(a.astype(compute_dtype), b.astype(compute_dtype), (((contract_a,), (contract_b,)), ((), ())),
                         precision=_precision(compute_dtype), preferred_element_type=jnp.float32)


def _scores(q, k, scale: float, compute_dtype):
  s = _dot(q, k, 1, 1, compute_dtype)  # [block_q, block_k] = q k^T
  return s if scale == 1.0 else s * scale


def num_attributes(spec: MaskSpec, side: str) -> int:
  if not spec.q.has_canvas:
    return 2
  return 5 if side == "q" else 4


# ---- forward -----------------------------------------------------------------------------------------------------

def _forward_kernel(lists_ref, counts_ref, q_attr_ref, k_attr_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    spec: MaskSpec, rows: int, kv_length: int, head_dim: int, tiling: AttentionTiling, scale: float,
                    compute_dtype):
  bq, bk = tiling.block_q, tiling.block_k
  q_tile, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  r0 = q_tile * bq
  rows_ok = _edge_mask(r0, bq, rows)
  q = _load(q_ref.at[b, h, pl.ds(r0, bq), :], rows_ok, (bq, head_dim), compute_dtype)
  q_attrs = _attributes(q_attr_ref, b, r0, bq, rows_ok, _QUERY_OUTSIDE, num_attributes(spec, "q"))

  def visit(n, carry):
    acc, m_prev, l_prev = carry
    k, v, k_attrs, _ = _key_tile(k_ref, v_ref, k_attr_ref, b, h, lists_ref[b, q_tile, n] * bk, spec=spec,
                                 kv_length=kv_length, head_dim=head_dim, tiling=tiling, compute_dtype=compute_dtype)
    mask = _tile_mask(spec, q_attrs, k_attrs)
    s = jnp.where(mask, _scores(q, k, scale, compute_dtype), _MASKED_SCORE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + _dot(p, v, 1, 0, compute_dtype)
    return acc, m_next, l_next

  init = (jnp.zeros((bq, head_dim), jnp.float32), jnp.full((bq,), _MASKED_SCORE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, counts_ref[b, q_tile], visit, init)
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  _store(o_ref.at[b, h, pl.ds(r0, bq), :], acc / safe_l[:, None], rows_ok)
  _store(lse_ref.at[b, h, pl.ds(r0, bq)], jnp.where(seen, m + jnp.log(safe_l), 0.0), rows_ok)


def forward(q, k, v, q_attrs, k_attrs, lists, counts, *, spec: MaskSpec, tiling: AttentionTiling, scale: float,
            interpret: bool):
  """(out [B, K, R, H] in q's dtype, lse [B, K, R] float32) of the stacked layout."""
  B, K, R, H = q.shape
  S = k.shape[2]
  compute_dtype = jnp.promote_types(q.dtype, k.dtype)
  kernel = functools.partial(_forward_kernel, spec=spec, rows=R, kv_length=S, head_dim=H, tiling=tiling,
                             scale=scale, compute_dtype=compute_dtype)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, K, R, H), q.dtype), jax.ShapeDtypeStruct((B, K, R), jnp.float32)),
      grid=(pl.cdiv(R, tiling.block_q), B, K),
      name="flash_attention_forward",
      **_compat.pallas_call_kwargs(tiling, interpret),
  )(lists, counts, q_attrs, k_attrs, q, k, v)


# ---- backward ----------------------------------------------------------------------------------------------------

def _probabilities_and_score_grads(q, k, v, do, lse, delta, mask, scale, compute_dtype):
  """(p, ds) of one [block_q, block_k] tile: p = softmax weights (0 where masked), ds = p * (dO V^T - delta)."""
  s = _scores(q, k, scale, compute_dtype)
  p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
  dp = _dot(do, v, 1, 1, compute_dtype)
  return p, p * (dp - delta[:, None])


def _dq_kernel(lists_ref, counts_ref, q_attr_ref, k_attr_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, spec, rows, kv_length, head_dim, tiling, scale, compute_dtype):
  q_tile, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  common = dict(spec=spec, head_dim=head_dim, tiling=tiling, compute_dtype=compute_dtype)
  q, do, lse, delta, q_attrs, rows_ok = _query_tile(q_ref, do_ref, lse_ref, delta_ref, q_attr_ref, b, h,
                                                    q_tile * tiling.block_q, rows=rows, **common)

  def visit(n, dq):
    k, v, k_attrs, _ = _key_tile(k_ref, v_ref, k_attr_ref, b, h, lists_ref[b, q_tile, n] * tiling.block_k,
                                 kv_length=kv_length, **common)
    _, ds = _probabilities_and_score_grads(q, k, v, do, lse, delta, _tile_mask(spec, q_attrs, k_attrs), scale,
                                           compute_dtype)
    return dq + _dot(ds, k, 1, 0, compute_dtype)

  bq = tiling.block_q
  dq = lax.fori_loop(0, counts_ref[b, q_tile], visit, jnp.zeros((bq, head_dim), jnp.float32))
  _store(dq_ref.at[b, h, pl.ds(q_tile * bq, bq), :], dq if scale == 1.0 else dq * scale, rows_ok)


def _dkv_kernel(lists_ref, counts_ref, q_attr_ref, k_attr_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, spec, rows, kv_length, head_dim, tiling, scale, compute_dtype):
  bk = tiling.block_k
  k_tile, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  c0 = k_tile * bk
  common = dict(spec=spec, head_dim=head_dim, tiling=tiling, compute_dtype=compute_dtype)
  k, v, k_attrs, cols_ok = _key_tile(k_ref, v_ref, k_attr_ref, b, h, c0, kv_length=kv_length, **common)

  def visit(n, carry):
    dk, dv = carry
    q, do, lse, delta, q_attrs, _ = _query_tile(q_ref, do_ref, lse_ref, delta_ref, q_attr_ref, b, h,
                                                lists_ref[b, k_tile, n] * tiling.block_q, rows=rows, **common)
    p, ds = _probabilities_and_score_grads(q, k, v, do, lse, delta, _tile_mask(spec, q_attrs, k_attrs), scale,
                                           compute_dtype)
    return dk + _dot(ds, q, 0, 0, compute_dtype), dv + _dot(p, do, 0, 0, compute_dtype)

  zeros = jnp.zeros((bk, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, counts_ref[b, k_tile], visit, (zeros, zeros))
  _store(dk_ref.at[b, h, pl.ds(c0, bk), :], dk if scale == 1.0 else dk * scale, cols_ok)
  _store(dv_ref.at[b, h, pl.ds(c0, bk), :], dv, cols_ok)


def backward(q, k, v, do, lse, delta, q_attrs, k_attrs, q_lists, q_counts, k_lists, k_counts, *, spec: MaskSpec,
             tiling: AttentionTiling, scale: float, interpret: bool):
  """(dq, dk, dv) of the stacked layout, in the dtypes of q, k and v. `q_lists` are the key tiles each query tile
  visits, `k_lists` the query tiles each key tile visits (the same table transposed)."""
  B, K, R, H = q.shape
  S = k.shape[2]
  compute_dtype = jnp.promote_types(q.dtype, k.dtype)
  common = dict(spec=spec, rows=R, kv_length=S, head_dim=H, tiling=tiling, scale=scale, compute_dtype=compute_dtype)
  call_kwargs = _compat.pallas_call_kwargs(tiling, interpret)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(pl.cdiv(R, tiling.block_q), B, K),
      name="flash_attention_dq",
      **call_kwargs,
  )(q_lists, q_counts, q_attrs, k_attrs, q, k, v, do, lse, delta)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **common),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(pl.cdiv(S, tiling.block_k), B, K),
      name="flash_attention_dkv",
      **call_kwargs,
  )(k_lists, k_counts, q_attrs, k_attrs, q, k, v, do, lse, delta)
  return dq, dk, dv

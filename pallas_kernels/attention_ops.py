"""Differentiable flash attention: the custom_vjp around the forward, dQ and dK/dV kernels.

  out = flash_attention(q [B, L, N, H], k [B, S, K, H], v [B, S, K, H], spec)        N a multiple of K (GQA)

The wrapper stacks each key head's N / K query heads as rows ([B, K, L * N / K, H]), turns the mask description
into per-token attribute arrays and per-tile visit lists (`attention_mask.tile_visits`), and calls the kernels.
The backward recomputes the visit lists for its own tiling and transposes them for the dK/dV kernel. Residuals
are q, k, v, the output and the float32 log-sum-exp per row: memory linear in L.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels import attention as kernels
from pallas_kernels.attention_mask import MaskSpec, tile_visits, visit_lists
from pallas_kernels.attention_tiling import MIN_BLOCK, AttentionTiling, choose_attention_tiling


def _split_tilings(tiling):
  """None, one tiling for both passes, or a (forward, backward) pair; each None, an AttentionTiling or a pair."""
  if tiling is None or isinstance(tiling, AttentionTiling):
    return (tiling, tiling)
  tiling = tuple(tiling)
  if len(tiling) == 2 and all(t is None or isinstance(t, (AttentionTiling, tuple, list)) for t in tiling):
    return tuple(t if t is None or isinstance(t, AttentionTiling) else AttentionTiling(*t) for t in tiling)
  return (AttentionTiling(*tiling),) * 2


def flash_attention(q_BLNH, k_BSKH, v_BSKH, spec: MaskSpec, *, scale: float = 1.0, tiling=None, interpret=None):
  """softmax(scale * q k^T) v under `spec`, without any [L, S] array; differentiable in q, k and v.

  Args:
    q_BLNH: queries [B, L, N, H]; k_BSKH, v_BSKH: keys and values [B, S, K, H] with K dividing N.
    spec: the mask description, with `spec.q` over the L queries and `spec.kv` over the S keys.
    scale: logit scale (the DiffusionGemma models use 1.0: QK-norm sets the scale).
    tiling: None (the table in attention_tiling.py), an AttentionTiling or (block_q, block_k) for both passes, or
      a (forward, backward) pair of those.
    interpret: run the Pallas interpreter (None: interpret unless the default backend is a GPU).

  Returns:
    [B, L, N, H] in q's dtype; a query that sees no key gets zeros.
  """
  # Triton tiles are powers of two >= 16 along the head dim too: zero columns change no score and no output.
  padded = lambda H: max(MIN_BLOCK, 1 << (H - 1).bit_length())  # noqa: E731
  return attend_stacked("flash_attention", q_BLNH, k_BSKH, v_BSKH, spec, padded, lambda q, k, v, G: _flash(
      q, k, v, spec, G, float(scale), _split_tilings(tiling), _compat.resolve_interpret(interpret)))


def attend_stacked(name, q_BLNH, k_BSKH, v_BSKH, spec: MaskSpec, padded_head_dim, run):
  """The flash-attention entry points' frame around their kernels: checks q, k, v and `spec` agree (errors start
  with `name`), pads the head dim H to `padded_head_dim(H)` with zeros (they change no score and no output), stacks
  each key head's G = N / K query heads as rows and returns `run(q [B, K, L * G, H'], k [B, K, S, H'],
  v [B, K, S, H'], G)` ([B, K, L * G, H']) unstacked to [B, L, N, H]."""
  B, L, N, H = q_BLNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if k_BSKH.shape != (B, S, K, H) or v_BSKH.shape != k_BSKH.shape or N % K:
    raise ValueError(f"{name}: expected q [B, L, N, H], k and v [B, S, K, H] with K dividing N; got q "
                     f"{q_BLNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}")
  if spec.q.segment_ids.shape != (B, L) or spec.kv.segment_ids.shape != (B, S):
    raise ValueError(f"{name}: the mask describes {spec.q.segment_ids.shape} queries and "
                     f"{spec.kv.segment_ids.shape} keys, the inputs have [{B}, {L}] and [{B}, {S}]")
  G = N // K
  padded = padded_head_dim(H)
  pad = lambda x: x if padded == H else jnp.pad(x, ((0, 0),) * 3 + ((0, padded - H),))  # noqa: E731
  q_BKRH = pad(q_BLNH).reshape(B, L, K, G, padded).transpose(0, 2, 1, 3, 4).reshape(B, K, L * G, padded)
  k_BKSH = pad(k_BSKH).transpose(0, 2, 1, 3)
  v_BKSH = pad(v_BSKH).transpose(0, 2, 1, 3)
  out_BKRH = run(q_BKRH, k_BKSH, v_BKSH, G)
  out_BLNH = out_BKRH.reshape(B, K, L, G, padded).transpose(0, 2, 1, 3, 4).reshape(B, L, N, padded)
  return out_BLNH[..., :H]


def attribute_arrays(spec: MaskSpec, rows_per_query: int):
  """(query attributes [B, A, L * G], key attributes [B, A', S]) int32, rows in `attention.SEG, POS, ...` order."""
  q, kv = spec.q, spec.kv
  q_rows = [q.segment_ids, q.positions]
  k_rows = [kv.segment_ids, kv.positions]
  if q.has_canvas:
    q_rows += [q.canvas, q.blocks, spec.window_starts()]
    k_rows += [kv.canvas, kv.blocks]
  q_attrs = jnp.repeat(jnp.stack([x.astype(jnp.int32) for x in q_rows], axis=1), rows_per_query, axis=2)
  return q_attrs, jnp.stack([x.astype(jnp.int32) for x in k_rows], axis=1)


def _tilings_for(direction, tiling, q, k):
  return choose_attention_tiling(direction, q.shape[-1], jnp.promote_types(q.dtype, k.dtype), q.shape[2],
                                 k.shape[2], override=tiling)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, spec, rows_per_query, scale, tilings, interpret):
  return _flash_fwd(q, k, v, spec, rows_per_query, scale, tilings, interpret)[0]


def _flash_fwd(q, k, v, spec, rows_per_query, scale, tilings, interpret):
  tiling = _tilings_for("forward", tilings[0], q, k)
  q_attrs, k_attrs = attribute_arrays(spec, rows_per_query)
  lists, counts = visit_lists(tile_visits(spec, tiling.block_q, tiling.block_k, rows_per_query=rows_per_query))
  out, lse = kernels.forward(q, k, v, q_attrs, k_attrs, lists, counts, spec=spec, tiling=tiling, scale=scale,
                             interpret=interpret)
  return out, (q, k, v, spec, out, lse)


def _flash_bwd(rows_per_query, scale, tilings, interpret, residuals, do):
  q, k, v, spec, out, lse = residuals
  tiling = _tilings_for("backward", tilings[1], q, k)
  q_attrs, k_attrs = attribute_arrays(spec, rows_per_query)
  visits = tile_visits(spec, tiling.block_q, tiling.block_k, rows_per_query=rows_per_query)
  q_lists, q_counts = visit_lists(visits)
  k_lists, k_counts = visit_lists(jnp.swapaxes(visits, 1, 2))
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  dq, dk, dv = kernels.backward(q, k, v, do, lse, delta, q_attrs, k_attrs, q_lists, q_counts, k_lists, k_counts,
                                spec=spec, tiling=tiling, scale=scale, interpret=interpret)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)

"""The dense attention: [B, heads, L, S] float32 logits under an [B, L, S] boolean mask. It is the model's `xla`
attention path and the reference every fused implementation is tested against (`attention_chunked.py` computes
the same a chunk of queries at a time: the `chunked` path for long rows where no fused kernel runs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention_mask import MaskSpec

# Most negative bfloat16-representable float: masked logits stay finite, so softmax never sees inf - inf.
NEG_INF = -2.3819763e38


def attention_reference(q_BLNH, k_BSKH, v_BSKH, mask, *, scale: float = 1.0, precision=None):
  """softmax(scale * q k^T masked) v with grouped-query heads (N query heads share N / K key heads).

  `mask` is a MaskSpec or a dense [B, L, S] bool array. A query that sees no key outputs zeros (the fused kernels'
  convention), not the mean of the values. Probabilities are cast to the operands' dtype before the second matmul,
  as a bfloat16 model computes them."""
  mask_BLS = mask.dense() if isinstance(mask, MaskSpec) else mask
  B, L, N, H = q_BLNH.shape
  K = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)
  logits_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH, preferred_element_type=jnp.float32,
                            precision=precision)
  if scale != 1.0:
    logits_BKGLS = logits_BKGLS * scale
  logits_BKGLS = jnp.where(mask_BLS[:, None, None, :, :], logits_BKGLS, NEG_INF)
  probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype)
  out_BLKGH = jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS, v_BSKH, precision=precision)
  # A row that sees no key has uniform probabilities over masked keys: zero it (a [B, L] factor, not another pass
  # over the probabilities; elsewhere the masked probabilities underflow to exactly 0 and the factor is 1).
  sees_any_BL11 = jnp.any(mask_BLS, axis=-1)[:, :, None, None, None].astype(out_BLKGH.dtype)
  return (out_BLKGH * sees_any_BL11).reshape(B, L, N, v_BSKH.shape[-1])


"""Rotary position embeddings with a per-layer base and a partial-rotary fraction ("proportional" RoPE).

The convention is the reference's (`transformers` Gemma-4 / DiffusionGemma, `rope_type="proportional"`): a head of
H dims is rotated as H/2 pairs (i, i + H/2) (rotate-half), pair i at frequency base**(-2i / H). A fraction f < 1
keeps the first f * H / 2 pairs and gives the others frequency zero (they pass through unchanged), so the rotated
dims are [0, f*H/2) and [H/2, H/2 + f*H/2), and their frequencies are those of a fully rotated head (the exponent
is over H, not over the rotated width). f = 1 is ordinary RoPE.
"""

from __future__ import annotations

import jax.numpy as jnp


def rotated_pairs(head_dim: int, fraction: float) -> int:
  """How many of the head's H/2 rotate-half pairs rotate (the reference's `int(fraction * H // 2)`)."""
  return int(fraction * head_dim // 2)


def apply_rope(x_BLNH, positions_BL, *, base: float, fraction: float = 1.0):
  """Rotates pairs (i, i + H/2) for i < fraction * H / 2 at frequency base**(-2i/H); the other dims pass through."""
  head_dim = x_BLNH.shape[-1]
  half = head_dim // 2
  pairs = rotated_pairs(head_dim, fraction)
  if pairs == 0:
    return x_BLNH
  inv_freq = base ** (-jnp.arange(pairs, dtype=jnp.float32) * 2.0 / head_dim)
  angles_BLp = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angles_BLp)[:, :, None, :]
  cos = jnp.cos(angles_BLp)[:, :, None, :]
  x32 = x_BLNH.astype(jnp.float32)
  x1, x1_rest = x32[..., :pairs], x32[..., pairs:half]
  x2, x2_rest = x32[..., half:half + pairs], x32[..., half + pairs:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x1_rest, x2 * cos + x1 * sin, x2_rest], axis=-1)
  return rotated.astype(x_BLNH.dtype)

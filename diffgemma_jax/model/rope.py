"""Rotary position embeddings with a per-layer base and a partial-rotary fraction."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x_BLNH, positions_BL, *, base: float, fraction: float = 1.0):
  """Rotates the first `fraction * H` dims of each head (rotate-half convention); the rest pass through."""
  head_dim = x_BLNH.shape[-1]
  rot_dim = int(round(head_dim * fraction))
  if rot_dim == 0:
    return x_BLNH
  half = rot_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rot_dim)
  angles_BLh = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angles_BLh)[:, :, None, :]
  cos = jnp.cos(angles_BLh)[:, :, None, :]
  x32 = x_BLNH.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:rot_dim], x32[..., rot_dim:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x_BLNH.dtype)

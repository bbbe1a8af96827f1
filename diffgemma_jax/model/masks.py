"""Attention masks, built by objectives and passed to the model as booleans `[B, Lq, Lk]` (True: may attend).

All masks are functions of per-token segment ids (0 = padding) and positions within a segment, so packed rows
never attend across documents. Sliding-window layers additionally restrict `|pos_q - pos_k| < window` inside the
model, which is symmetric around the query for bidirectional masks and the usual causal window otherwise.
"""

from __future__ import annotations

import jax.numpy as jnp

MASK_KINDS = ("bidirectional", "causal", "block_causal")


def same_segment(segment_q_BL, segment_k_BL):
  return segment_q_BL[:, :, None] == segment_k_BL[:, None, :]


def make_mask(kind: str, segment_ids_BL, positions_BL, *, block_size: int | None = None):
  """The mask of one kind over a packed row; padding (segment 0) attends only to padding."""
  mask = same_segment(segment_ids_BL, segment_ids_BL)
  pos_q = positions_BL[:, :, None]
  pos_k = positions_BL[:, None, :]
  if kind == "bidirectional":
    return mask
  if kind == "causal":
    return mask & (pos_k <= pos_q)
  if kind == "block_causal":
    if not block_size or block_size <= 0:
      raise ValueError(f"block_causal masks need a positive block_size, got {block_size!r}")
    return mask & (pos_k // block_size <= pos_q // block_size)
  raise ValueError(f"unknown mask kind {kind!r}; valid kinds are {MASK_KINDS}")


def sliding_window(positions_q_BL, positions_k_BL, window: int):
  return jnp.abs(positions_q_BL[:, :, None] - positions_k_BL[:, None, :]) < window

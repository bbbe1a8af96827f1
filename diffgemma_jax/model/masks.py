"""Attention masks in their dense form, booleans `[B, Lq, Lk]` (True: may attend): the reference for the mask
descriptions (`MaskSpec`, re-exported here from `pallas_kernels.attention_mask`), which the objectives pass to the
model instead, and the form the samplers' KV-cache windows take.

All masks are functions of per-token segment ids (0 = padding) and positions within a segment, so packed rows
never attend across documents. Sliding-window layers additionally restrict `|pos_q - pos_k| < window` inside the
model, which is symmetric around the query for bidirectional masks and the usual causal window otherwise.

Canvas (decoder) queries are the exception, as in the reference DiffusionGemma: there the canvas reads the clean
prefix from the encoder's sliding-window KV cache, which holds the last `window - 1` tokens before the canvas, so
every query of a canvas starting at position S sees clean keys at positions (S - window, S) whatever its own
position. `canvas_window_starts` finds S per query and `sliding_window` measures clean keys from it; canvas keys
keep the per-query window (equal to the reference's "the whole canvas" while the canvas fits in the window, and
to plain masked diffusion when the canvas is the whole row).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.attention_mask import CLEAN_RULES as MASK_KINDS
from pallas_kernels.attention_mask import MaskSpec, Tokens

__all__ = ["MASK_KINDS", "MaskSpec", "Tokens", "canvas_clean_mask", "canvas_window_starts", "make_mask", "same_segment",
           "sliding_window"]


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


def canvas_clean_mask(canvas_segments_BC, canvas_blocks_BC, clean_segments_BL, clean_positions_BL, clean_blocks_BL):
  """Attention mask [B, C + L, C + L] of the block objectives' layout [canvas (C tokens) ; clean (L tokens)]:
  clean tokens causal, canvas block i sees itself and the clean blocks j < i, no attention across segments."""
  canvas_to_canvas = (same_segment(canvas_segments_BC, canvas_segments_BC)
                      & (canvas_blocks_BC[:, :, None] == canvas_blocks_BC[:, None, :]))
  canvas_to_clean = (same_segment(canvas_segments_BC, clean_segments_BL)
                     & (clean_blocks_BL[:, None, :] < canvas_blocks_BC[:, :, None]))
  clean_to_clean = make_mask("causal", clean_segments_BL, clean_positions_BL)
  clean_to_canvas = jnp.zeros(clean_to_clean.shape[:2] + canvas_blocks_BC.shape[1:], bool)
  return jnp.concatenate([jnp.concatenate([canvas_to_canvas, canvas_to_clean], axis=2),
                          jnp.concatenate([clean_to_canvas, clean_to_clean], axis=2)], axis=1)


def canvas_window_starts(mask_BLS, positions_q_BL, positions_k_BS, canvas_q_BL, canvas_k_BS):
  """[B, L] the position each query's sliding window over clean keys is measured from: for a canvas query the
  first position of its canvas (the smallest position of a canvas key `mask_BLS` lets it see), for any other query
  its own position."""
  never = jnp.iinfo(positions_k_BS.dtype).max
  visible_canvas_BLS = mask_BLS & canvas_k_BS[:, None, :]
  start_BL = jnp.min(jnp.where(visible_canvas_BLS, positions_k_BS[:, None, :], never), axis=-1)
  return jnp.where(canvas_q_BL & (start_BL < never), start_BL, positions_q_BL).astype(positions_q_BL.dtype)


def sliding_window(positions_q_BL, positions_k_BS, window: int, *, canvas_window=None):
  """[B, L, S] True where key k is inside query q's window: `|pos_q - pos_k| < window`; with `canvas_window =
  (starts_BL, canvas_k_BS)` (see `canvas_window_starts`) clean keys are measured from `starts_BL` instead."""
  near_BLS = jnp.abs(positions_q_BL[:, :, None] - positions_k_BS[:, None, :]) < window
  if canvas_window is None:
    return near_BLS
  starts_BL, canvas_k_BS = canvas_window
  from_start_BLS = jnp.abs(starts_BL[:, :, None] - positions_k_BS[:, None, :]) < window
  return jnp.where(canvas_k_BS[:, None, :], near_BLS, from_start_BLS)

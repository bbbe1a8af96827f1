"""What a row scores and how a batch's loss is normalised, for every objective.

A packed pretraining row scores every non-pad token; an SFT row (with `loss_mask`) its response only. With
`model.token_shift` (Dream's reading of an adapted AR model) position l is predicted by the output at l-1, so a
document's first token, which has no predecessor, is not scored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scored_positions(batch):
  """Positions that are corrupted and scored: the response (`loss_mask`, SFT rows) or every non-pad token."""
  if "loss_mask" in batch:
    return batch["loss_mask"].astype(bool) & (batch["segment_ids"] > 0)
  return batch["segment_ids"] > 0


def has_predecessor(segments_BL):
  """[B, L] bool: the position before is in the same document (a row's or document's first token has none)."""
  return (jnp.roll(segments_BL, 1, axis=1) == segments_BL) & (jnp.arange(segments_BL.shape[1]) > 0)


def scored_by(model, batch):
  """`scored_positions`, less the positions token shift cannot predict (no predecessor in their document)."""
  scored = scored_positions(batch)
  return scored & has_predecessor(batch["segment_ids"]) if model.cfg.token_shift else scored


def predicting_logits(model, logits_BLV):
  """Token shift (`model.token_shift`; Dream's reading of an adapted AR model): position l is predicted by the
  output at l-1. Row l = 0 then holds the last position's output, which callers never score."""
  return jnp.roll(logits_BLV, 1, axis=1) if model.cfg.token_shift else logits_BLV


def normalise_loss(contrib_BL, scored_BL, segments_BL=None):
  """The batch loss from each scored token's contribution (zero elsewhere). Pretraining (`segments_BL` None): the
  sum over scored tokens per scored token. SFT (`segments_BL` given): each example's sum over its own scored
  tokens (an example is a segment of a row: one per row, or several in packed rows), then the mean over the
  examples that have any."""
  if segments_BL is None:
    return jnp.sum(contrib_BL) / jnp.maximum(jnp.sum(scored_BL), 1)
  L = contrib_BL.shape[1]
  # per row (vmapped, so rows split over devices stay split), segment ids at most L
  per_row = jax.vmap(lambda values, segments: jax.ops.segment_sum(values, segments, num_segments=L + 1))
  total = per_row(contrib_BL, segments_BL)
  count = per_row(scored_BL.astype(jnp.float32), segments_BL)
  has_response = count > 0
  per_token = jnp.where(has_response, total / jnp.maximum(count, 1.0), 0.0)
  return jnp.sum(per_token) / jnp.maximum(jnp.sum(has_response), 1)


def sft_segments(batch):
  """The segments `normalise_loss` averages over: a batch's `segment_ids` for SFT rows (`loss_mask`), else None."""
  return batch["segment_ids"] if "loss_mask" in batch else None


def router_metrics(aux):
  """The MoE router's logged metrics from a model call's aux outputs (every objective reports the same)."""
  return {"load_balance_loss": aux["load_balance_loss"], "router_z_loss": aux["router_z_loss"],
          "expert_load": jnp.mean(aux["expert_load"], axis=0), "dropped_tokens": aux["dropped_tokens"]}

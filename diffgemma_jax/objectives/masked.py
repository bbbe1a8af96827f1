"""Masked (absorbing-state) diffusion: the MDLM / LLaDA continuous-time ELBO with a linear schedule.

alpha_t = 1 - t: each token is replaced by the mask token independently with probability t. The negative ELBO of
a sequence is E_t[(1/t) * sum_{masked l} -log p(x_l | z_t)] with t ~ U[eps, 1]. The denoiser never predicts the
mask token (its logit is removed) and only masked positions are scored. Training and evaluation share
`corrupt`, `masked_token_nll` and `weighted_nll`; `masked_nelbo` is the public estimator.

With `model.token_shift` (Dream's reading of an adapted AR model) position l is predicted by the output at l-1 and
a document's first token is neither corrupted nor scored; the estimator is unchanged.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffgemma_jax.model.masks import MaskSpec


def stratified_t(rng, num: int, eps: float, *, dtype=jnp.float32):
  """t_i = eps + (1 - eps) * ((u + i/num) mod 1): one uniform draw, evenly spread over [eps, 1]."""
  u = jax.random.uniform(rng, (), dtype)
  return eps + (1.0 - eps) * jnp.mod(u + jnp.arange(num, dtype=dtype) / num, 1.0)


def corrupt(rng, tokens_BL, t_B, *, mask_id: int, corruptible_BL=None):
  """Replaces each corruptible token by `mask_id` with probability t of its row; returns (noisy, is_masked)."""
  draw_BL = jax.random.uniform(rng, tokens_BL.shape)
  is_masked_BL = draw_BL < t_B[:, None]
  if corruptible_BL is not None:
    is_masked_BL = is_masked_BL & corruptible_BL
  return jnp.where(is_masked_BL, mask_id, tokens_BL), is_masked_BL


def states_excluding(mask_id: int) -> tuple[int, ...]:
  """The ids that no clean token may be: the mask token, or none when the tokenizer has none (the released
  tokenizer: `mask_id = -1`, which must never be taken as an index of the last vocabulary entry)."""
  return (mask_id,) if mask_id >= 0 else ()


def without(logits_BLV, excluded_ids: Sequence[int]):
  """The logits with each of `excluded_ids` (possibly none) given zero probability."""
  for token in sorted(set(excluded_ids)):
    logits_BLV = logits_BLV.at[..., token].set(-jnp.inf)
  return logits_BLV


def masked_token_nll(logits_BLV, tokens_BL, *, mask_id: int):
  """-log p(x_l) per position in float32, with the mask token given zero probability (`mask_id < 0`: a tokenizer
  without one, nothing excluded)."""
  logits_BLV = without(logits_BLV.astype(jnp.float32), states_excluding(mask_id))
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_BL = jnp.take_along_axis(logits_BLV, tokens_BL[..., None], axis=-1)[..., 0]
  return log_z_BL - target_BL


def weighted_nll(nll_BL, is_masked_BL, t_B):
  """Per-sequence (1/t) * sum over masked positions of -log p: the single-sample NELBO estimate, in nats."""
  return jnp.sum(jnp.where(is_masked_BL, nll_BL, 0.0), axis=-1) / t_B


def masked_nelbo(logits_fn: Callable[[jax.Array], jax.Array], tokens, rng, *, mask_id: int, num_t_samples: int,
                 eps: float = 1e-3, pad_mask=None):
  """Per-sequence NELBO in nats (mean over `num_t_samples` stratified t) and its standard error.

  `logits_fn(noisy_tokens[B, L]) -> logits[B, L, V]`; `pad_mask` [B, L] marks real tokens (True) — padding is
  never corrupted or scored. The K noise levels of a sequence are stratified over [eps, 1] with an independent
  offset per sequence; the standard error is the sample std over the K estimates / sqrt(K) (conservative for
  stratified draws).
  """
  B = tokens.shape[0]
  K = num_t_samples
  t_rng, mask_rng = jax.random.split(rng)
  offsets_B = jax.random.uniform(t_rng, (B,))
  t_KB = eps + (1.0 - eps) * jnp.mod(offsets_B[None, :] + (jnp.arange(K) / K)[:, None], 1.0)
  mask_rngs = jax.random.split(mask_rng, K)

  def one(_, inputs):
    t_B, key = inputs
    noisy, is_masked = corrupt(key, tokens, t_B, mask_id=mask_id, corruptible_BL=pad_mask)
    nll = masked_token_nll(logits_fn(noisy), tokens, mask_id=mask_id)
    return None, weighted_nll(nll, is_masked, t_B)

  _, estimates_KB = jax.lax.scan(one, None, (t_KB, mask_rngs))
  mean_B = jnp.mean(estimates_KB, axis=0)
  if K > 1:
    stderr_B = jnp.std(estimates_KB, axis=0, ddof=1) / jnp.sqrt(K)
  else:
    stderr_B = jnp.zeros_like(mean_B)
  return mean_B, stderr_B


def model_logits_fn(model, batch, *, mask_kind: str = "bidirectional"):
  """Closes over a packed batch's positions and segments: noisy tokens -> the logits that predict each position
  (one slot back with `model.token_shift`, `predicting_logits`)."""
  segment_ids, positions = batch["segment_ids"], batch["positions"]
  mask = MaskSpec.packed(mask_kind, segment_ids, positions)

  def logits_fn(noisy):
    logits, _ = model(noisy, positions, mask, token_mask_BL=segment_ids > 0)
    return predicting_logits(model, logits)

  return logits_fn


def has_predecessor(segments_BL):
  """[B, L] bool: the position before is in the same document (a row's or document's first token has none)."""
  return (jnp.roll(segments_BL, 1, axis=1) == segments_BL) & (jnp.arange(segments_BL.shape[1]) > 0)


def predicting_logits(model, logits_BLV):
  """Token shift (`model.token_shift`; Dream's reading of an adapted AR model): position l is predicted by the
  output at l-1. Row l = 0 then holds the last position's output, which callers never score."""
  return jnp.roll(logits_BLV, 1, axis=1) if model.cfg.token_shift else logits_BLV


def scored_by(model, batch):
  """`scored_positions`, less the positions token shift cannot predict (no predecessor in their document)."""
  scored = scored_positions(batch)
  return scored & has_predecessor(batch["segment_ids"]) if model.cfg.token_shift else scored


def scored_positions(batch):
  """Positions that are corrupted and scored: the response (`loss_mask`, SFT rows) or every non-pad token."""
  if "loss_mask" in batch:
    return batch["loss_mask"].astype(bool) & (batch["segment_ids"] > 0)
  return batch["segment_ids"] > 0


def normalise_loss(per_example_B, scored_BL, sft: bool):
  """Pretraining: batch sum over scored tokens. SFT: each response's NELBO over its length, then the mean."""
  num_scored_B = jnp.sum(scored_BL, axis=-1)
  if sft:
    has_response = num_scored_B > 0
    per_token_B = per_example_B / jnp.maximum(num_scored_B, 1)
    return jnp.sum(jnp.where(has_response, per_token_B, 0.0)) / jnp.maximum(jnp.sum(has_response), 1)
  return jnp.sum(per_example_B) / jnp.maximum(jnp.sum(num_scored_B), 1)


def router_metrics(aux):
  """The MoE router's logged metrics from a model call's aux outputs (every objective reports the same)."""
  return {"load_balance_loss": aux["load_balance_loss"], "router_z_loss": aux["router_z_loss"],
          "expert_load": jnp.mean(aux["expert_load"], axis=0), "dropped_tokens": aux["dropped_tokens"]}


class MaskedDiffusion:
  """Masked diffusion for pretraining and prompt-masked SFT, told apart by the batch alone.

  Pretraining rows: every non-pad token is corrupted and scored; the loss is the batch NELBO per non-pad token,
  with t stratified across the batch. SFT rows carry `loss_mask` (the response, EOS padding included): the prompt
  is never corrupted or scored, and each example's NELBO is divided by its response length, then averaged.
  """

  name = "masked"
  exact = False

  def __init__(self, *, mask_id: int, eps: float = 1e-3):
    self.mask_id = mask_id
    self.eps = eps

  def loss_fn(self, model, batch, rng):
    tokens, segment_ids, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
    pad_mask = segment_ids > 0
    scored = scored_by(model, batch)
    t_rng, mask_rng = jax.random.split(rng)
    t_B = stratified_t(t_rng, tokens.shape[0], self.eps)
    noisy, is_masked = corrupt(mask_rng, tokens, t_B, mask_id=self.mask_id, corruptible_BL=scored)
    mask = MaskSpec.packed("bidirectional", segment_ids, positions)
    logits, aux = model(noisy, positions, mask, token_mask_BL=pad_mask)
    nll = masked_token_nll(predicting_logits(model, logits), tokens, mask_id=self.mask_id)
    per_example = weighted_nll(nll, is_masked, t_B)
    num_tokens = jnp.maximum(jnp.sum(scored), 1)
    nelbo = normalise_loss(per_example, scored, "loss_mask" in batch)
    loss = nelbo + aux["aux_loss"]
    metrics = {"loss": loss, "nelbo_per_token": nelbo, "masked_fraction": jnp.sum(is_masked) / num_tokens,
               "num_tokens": jnp.sum(scored), **router_metrics(aux)}
    return loss, metrics

  def sequence_bound(self, model, batch, rng, *, num_t_samples: int):
    """Per-row NELBO (nats) of the scored tokens given the rest, its standard error, and the scored count."""
    scored = scored_by(model, batch)
    nelbo, stderr = masked_nelbo(model_logits_fn(model, batch), batch["tokens"], rng, mask_id=self.mask_id,
                                 num_t_samples=num_t_samples, eps=self.eps, pad_mask=scored)
    return nelbo, stderr, jnp.sum(scored, axis=-1)

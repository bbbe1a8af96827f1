"""Masked (absorbing-state) diffusion: the MDLM / LLaDA continuous-time ELBO with a linear schedule.

alpha_t = 1 - t: each token is replaced by the mask token independently with probability t. The negative ELBO of
a sequence is E_t[(1/t) * sum_{masked l} -log p(x_l | z_t)] with t ~ U[eps, 1]. The denoiser never predicts the
mask token (its logit is removed) and only masked positions are scored. Training and evaluation share
`corrupt`, `estimators.masked_token_nll` and `weighted_nll`; `masked_nelbo` is the public estimator.

With `model.token_shift` (Dream's reading of an adapted AR model) position l is predicted by the output at l-1 and
a document's first token is neither corrupted nor scored; the estimator is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from diffgemma_jax.model.masks import MaskSpec
from diffgemma_jax.objectives.estimators import (CORRUPT_STREAM, masked_token_nll, mean_and_stderr, row_draws,
                                                 row_keys, row_levels, stratified_t)
from diffgemma_jax.objectives.interface import Capabilities, Objective
from diffgemma_jax.objectives.rows import normalise_loss, predicting_logits, router_metrics, scored_by, sft_segments


def corrupt(rng, tokens_BL, t, *, mask_id: int, corruptible_BL=None):
  """Replaces each corruptible token by `mask_id` with probability t: one t per row ([B]) or per token ([B, L], the
  block objective's per-block levels), drawing the same uniforms either way; returns (noisy, is_masked)."""
  t_BL = t[:, None] if t.ndim == 1 else t
  return mask_below(jax.random.uniform(rng, tokens_BL.shape), tokens_BL, t_BL, mask_id=mask_id,
                    corruptible_BL=corruptible_BL)


def mask_below(draw_BL, tokens_BL, t_BL, *, mask_id: int, corruptible_BL=None):
  """Masks each corruptible token whose uniform draw is below its t (t broadcast to [B, L]); (noisy, is_masked)."""
  is_masked_BL = draw_BL < t_BL
  if corruptible_BL is not None:
    is_masked_BL = is_masked_BL & corruptible_BL
  return jnp.where(is_masked_BL, mask_id, tokens_BL), is_masked_BL


def weighted_token_nll(nll_BL, is_masked_BL, t_BL):
  """Each masked token's -log p / t (t broadcast to [B, L]; zero where not masked): the NELBO's per-token terms,
  which the training losses normalise (`rows.normalise_loss`)."""
  return jnp.where(is_masked_BL, nll_BL, 0.0) / t_BL


def weighted_nll(nll_BL, is_masked_BL, t_B):
  """Per-sequence (1/t) * sum over masked positions of -log p: the single-sample NELBO estimate, in nats."""
  return jnp.sum(jnp.where(is_masked_BL, nll_BL, 0.0), axis=-1) / t_B


def masked_nelbo(logits_fn: Callable[[jax.Array], jax.Array], tokens, rng, *, mask_id: int, num_t_samples: int,
                 eps: float = 1e-3, pad_mask=None):
  """Per-sequence NELBO in nats (mean over `num_t_samples` stratified t) and its standard error.

  `logits_fn(noisy_tokens[B, L]) -> logits[B, L, V]`; `pad_mask` [B, L] marks real tokens (True) — padding is
  never corrupted or scored. `rng`: one key, or one per row (`estimators.row_keys`); each row draws from its own
  key only (`row_draws`), so its estimate does not depend on the other rows or on its padding. The K noise levels
  of a sequence are stratified over [eps, 1] with an independent offset per sequence; the standard error is the
  sample std over the K estimates / sqrt(K) (conservative for stratified draws).
  """
  K = num_t_samples
  keys_B = row_keys(rng, tokens.shape[0])
  t_KB = row_levels(keys_B, 1, K, eps)[..., 0]

  def one(_, inputs):
    t_B, k = inputs
    noisy, is_masked = mask_below(row_draws(keys_B, CORRUPT_STREAM, k, tokens.shape[1]), tokens, t_B[:, None],
                                  mask_id=mask_id, corruptible_BL=pad_mask)
    nll = masked_token_nll(logits_fn(noisy), tokens, mask_id=mask_id)
    return None, weighted_nll(nll, is_masked, t_B)

  _, estimates_KB = jax.lax.scan(one, None, (t_KB, jnp.arange(K)))
  return mean_and_stderr(estimates_KB)


def model_logits_fn(model, batch, *, mask_kind: str = "bidirectional"):
  """Closes over a packed batch's positions and segments: noisy tokens -> the logits that predict each position
  (one slot back with `model.token_shift`, `predicting_logits`)."""
  segment_ids, positions = batch["segment_ids"], batch["positions"]
  mask = MaskSpec.packed(mask_kind, segment_ids, positions)

  def logits_fn(noisy):
    logits, _ = model(noisy, positions, mask, token_mask_BL=segment_ids > 0)
    return predicting_logits(model, logits)

  return logits_fn


@dataclasses.dataclass(frozen=True)
class MaskedDiffusion(Objective):
  """Masked diffusion for pretraining and prompt-masked SFT, told apart by the batch alone.

  Pretraining rows: every non-pad token is corrupted and scored; the loss is the batch NELBO per non-pad token,
  with t stratified across the batch. SFT rows carry `loss_mask` (the response, EOS padding included): the prompt
  is never corrupted or scored, and each example's NELBO is divided by its response length, then averaged.
  """

  name = "masked"
  capabilities = Capabilities(exact=False, sft_rows=True, canvases=False, self_conditioning=False, token_shift=True,
                              mask_token=True, next_token=False)
  mask_id: int
  eps: float = 1e-3

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
    num_tokens = jnp.maximum(jnp.sum(scored), 1)
    nelbo = normalise_loss(weighted_token_nll(nll, is_masked, t_B[:, None]), scored, sft_segments(batch))
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

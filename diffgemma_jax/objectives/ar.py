"""The autoregressive baseline: the same backbone with a causal mask and a next-token loss; exact likelihood."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffgemma_jax.model.masks import MaskSpec
from diffgemma_jax.objectives.interface import Capabilities, Objective
from diffgemma_jax.objectives.rows import normalise_loss, router_metrics, scored_positions, sft_segments


def next_token_nll(logits_BLV, tokens_BL, segment_ids_BL):
  """-log p(x_{l+1} | x_<=l) at each position whose successor is in the same segment; (nll, valid)."""
  logits = logits_BLV[:, :-1].astype(jnp.float32)
  targets = tokens_BL[:, 1:]
  valid = (segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1]) & (segment_ids_BL[:, 1:] > 0)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0), valid


@dataclasses.dataclass(frozen=True)
class Autoregressive(Objective):
  """Next-token prediction; it reads no key of the objective section and needs no mask token. On SFT rows it
  scores the response's tokens only and normalises as the diffusion objectives do (`rows.normalise_loss`: each
  response's NLL over its length, then the mean), so an AR fine-tune is the twin of a diffusion one."""

  name = "ar"
  capabilities = Capabilities(exact=True, sft_rows=True, canvases=False, self_conditioning=False, token_shift=False,
                              mask_token=False, next_token=True)

  def _nll(self, model, batch):
    segment_ids, positions = batch["segment_ids"], batch["positions"]
    mask = MaskSpec.packed("causal", segment_ids, positions)
    logits, aux = model(batch["tokens"], positions, mask, token_mask_BL=segment_ids > 0)
    nll, valid = next_token_nll(logits, batch["tokens"], segment_ids)
    valid = valid & scored_positions(batch)[:, 1:]  # SFT rows (`loss_mask`): the response only, as in `masked`
    return jnp.where(valid, nll, 0.0), valid, aux

  def loss_fn(self, model, batch, rng):
    del rng
    nll, valid, aux = self._nll(model, batch)
    segments = sft_segments(batch)
    nll_per_token = normalise_loss(nll, valid, None if segments is None else segments[:, 1:])
    loss = nll_per_token + aux["aux_loss"]
    return loss, {"loss": loss, "nelbo_per_token": nll_per_token, "num_tokens": jnp.sum(valid),
                  **router_metrics(aux)}

  def sequence_bound(self, model, batch, rng, *, num_t_samples: int):
    """Exact per-row negative log-likelihood of every token after the first of its segment, of the response only
    in SFT rows (stderr 0)."""
    del rng, num_t_samples
    nll, valid, _ = self._nll(model, batch)
    total = jnp.sum(nll, axis=-1)
    return total, jnp.zeros_like(total), jnp.sum(valid, axis=-1)

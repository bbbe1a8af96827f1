"""Uniform-state block diffusion: DiffusionGemma's training recipe and the continuous-time ELBO for uniform noise.

Noise. alpha_t = 1 - t: each supervised token is, with probability t, replaced by a token drawn uniformly from the
N noise states, so q_t(z | x) = alpha_t [z = x] + (1 - alpha_t) / N. The draw may return the token itself (the
standard uniform-state kernel: the marginal at t = 1 is exactly uniform). The N states are the vocabulary without
the mask token: it is never data, so noise never produces it and the denoiser gives it zero probability (N = V - 1).

Training (DiffusionGemma). Rows are cut into canvases of `block_size` tokens (`block.block_ids`). Per row, one
canvas holding scored tokens is chosen uniformly and noised with one t (stratified across the batch). One pass
runs over [chosen canvas ; clean row]: the canvas sees itself bidirectionally and the clean tokens of earlier
canvases; the clean row is the causal encoder. The loss is the flat cross-entropy of every scored canvas token
(noised or not) per token, plus `encoder_loss_weight` times the encoder's next-token loss per token. With a
self-conditioning model, pass 1 runs without the signal, and pass 2 adds the self-conditioning MLP's output of
`stop_gradient(softmax(logits_1)) @ E * sqrt(D)` to the canvas embeddings of a random `self_cond_prob` of the rows;
gradients flow through pass 2 only.

Bound. The flat loss is not a likelihood bound; `sequence_bound` is the continuous-time ELBO of the CTMC whose
forward rate jumps to a uniform state at rate beta_t = -alpha_t' / alpha_t = 1 / (1 - t) (Campbell et al. 2022;
Schiff et al. 2024 (UDLM) for uniform noise). Per scored token at noisy state z, with r_y = q_t(y|x) / q_t(z|x) the
true reverse-rate ratios and r^_y the model's,

    f_t = beta_t / N * sum_{y != z} [ r^_y - r_y - r_y log(r^_y / r_y) ]   (>= 0),

and the per-row NELBO is sum over blocks of  int_eps^1 E[f_t] dt + E[-log p(x | z_eps)]  (the last term decodes
the data from the least noisy state with the denoiser; the prior term at t = 1 is KL(uniform || uniform) = 0). The
integral is estimated with K noise levels per block, stratified over [eps, 1], as (1 - eps) times their mean.

Model rates. With x_theta = softmax(logits) the denoiser's prediction of x, the model's rates are the x0-mixture
r^_y = sum_x0 x_theta(x0) q_t(y|x0) / q_t(z|x0)
     = 1 + x_theta(y) N alpha / (1 - alpha) - x_theta(z) N alpha / (N alpha + 1 - alpha),
which is the exact reverse rate when x_theta is the true posterior p(x0 | z, context): the bound is tight for the
denoiser that the cross-entropy loss trains, and the same x_theta decodes at t = eps. UDLM plugs x_theta into
the ratio instead, r^_y = xbar_theta_y / xbar_theta_z with xbar_theta = N alpha x_theta + (1 - alpha); that form
is tight only for a prediction that ignores the token's own noisy state (for an i.i.d. source: x_theta = pi) and,
given the posterior, is loose (about 1.5x the entropy for a 5-symbol i.i.d. source), so it is not used here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffgemma_jax.model.self_conditioning import self_conditioning_embeddings
from diffgemma_jax.objectives.ar import next_token_nll
from diffgemma_jax.objectives.block import canvas_clean_forward, canvas_layout, per_token
from diffgemma_jax.objectives.estimators import (CORRUPT_STREAM, RECON_STREAM, RECON_TOKEN_STREAM, TOKEN_STREAM,
                                                 masked_token_nll, mean_and_stderr, row_draws, row_keys, row_levels,
                                                 states_excluding, stratified_t, without)
from diffgemma_jax.objectives.interface import Capabilities, Objective
from diffgemma_jax.objectives.rows import router_metrics, scored_positions

def noise_token(rng, shape, *, vocab_size: int, excluded_ids: Sequence[int]):
  """Tokens drawn uniformly from the vocabulary without `excluded_ids`."""
  return _past_excluded(jax.random.randint(rng, shape, 0, vocab_size - len(set(excluded_ids))), excluded_ids)


def _past_excluded(index, excluded_ids: Sequence[int]):
  """The `index`-th id of the vocabulary without `excluded_ids` (shifted past each excluded id in increasing
  order)."""
  for excluded in sorted(set(excluded_ids)):
    index = index + (index >= excluded)
  return index


def uniform_corrupt(rng, tokens_BL, t_BL, *, vocab_size: int, excluded_ids: Sequence[int], corruptible_BL):
  """Replaces each corruptible token, with probability t (per token), by a uniform noise state (possibly itself).

  Returns (noisy tokens, replaced) where `replaced` marks the draws (including those that drew the same token).
  """
  draw_rng, token_rng = jax.random.split(rng)
  noise = noise_token(token_rng, tokens_BL.shape, vocab_size=vocab_size, excluded_ids=excluded_ids)
  return replace_below(jax.random.uniform(draw_rng, tokens_BL.shape), noise, tokens_BL, t_BL, corruptible_BL)


def replace_below(draw_BL, noise_BL, tokens_BL, t_BL, corruptible_BL):
  """Each corruptible token whose uniform draw is below its t becomes its noise token; (noisy, replaced)."""
  replaced = (draw_BL < t_BL) & corruptible_BL
  return jnp.where(replaced, noise_BL, tokens_BL).astype(tokens_BL.dtype), replaced


def row_uniform_corrupt(keys_B, streams: tuple[int, int], sample, tokens_BL, t_BL, *, vocab_size: int,
                        excluded_ids: Sequence[int], corruptible_BL):
  """`uniform_corrupt` with each row's draws its own (`estimators.row_draws`): whether a token is replaced from
  draw `sample` of the first stream, its noise token from the second."""
  L = tokens_BL.shape[1]
  num_states = vocab_size - len(set(excluded_ids))
  draw_BL = row_draws(keys_B, streams[0], sample, L)
  index_BL = row_draws(keys_B, streams[1], sample, L, draw=lambda key: jax.random.randint(key, (), 0, num_states))
  return replace_below(draw_BL, _past_excluded(index_BL, excluded_ids), tokens_BL, t_BL, corruptible_BL)


def _small_w(w):
  """w - log(1 + w) for |w| < 1e-3, by its series (the closed form cancels there)."""
  return w * w * (0.5 - w * (1.0 / 3.0 - w * 0.25))


def uniform_elbo_integrand(logits_BLV, noisy_BL, clean_BL, t_BL, *, excluded_ids: Sequence[int]):
  """f_t per token [B, L] in nats (see the module docstring); zero where t >= 1."""
  V = logits_BLV.shape[-1]
  excluded = sorted(set(excluded_ids))
  N = V - len(excluded)
  x_theta = jax.nn.softmax(without(logits_BLV.astype(jnp.float32), excluded), axis=-1)
  x_onehot = jax.nn.one_hot(clean_BL, V, dtype=jnp.float32)
  off = t_BL.astype(jnp.float32)[..., None]  # 1 - alpha = N q_t(y | x) for y != x; from t, exact for small t
  alpha = 1.0 - off
  safe_alpha = jnp.maximum(alpha, 1e-30)
  on_ratio = N * alpha / off  # r for y = x (x != z), minus 1
  off_ratio = N * alpha / (N * alpha + off)  # 1 - r for x = z
  x_theta_z = jnp.take_along_axis(x_theta, noisy_BL[..., None], axis=-1)
  not_z = jnp.sum(jnp.where(jnp.arange(V) == noisy_BL[..., None], 0.0, x_theta), axis=-1, keepdims=True)
  x_is_z = (clean_BL == noisy_BL)[..., None].astype(jnp.float32)
  # Every ratio from sums of non-negative terms, so none cancels as t -> 0 or t -> 1:
  # 1 - x_theta(z) * off_ratio = (1 - x_theta(z)) + x_theta(z) * off / (N alpha + off).
  stay = off / (N * alpha + off)
  r = jnp.where(x_is_z > 0, stay, 1.0 + x_onehot * on_ratio)
  r_hat = x_theta * on_ratio + not_z + x_theta_z * stay
  # r^ - r from differences, for the small-|w| branch where r^ - r - r log(r^/r) ~ r w^2 / 2
  w = ((x_theta - x_onehot) * on_ratio - (x_theta_z - x_is_z) * off_ratio) / r
  term = jnp.where(jnp.abs(w) < 1e-3, r * _small_w(w), r_hat - r - r * (jnp.log(r_hat) - jnp.log(r)))
  keep = jnp.arange(V) != noisy_BL[..., None]
  for token in excluded:
    keep = keep & (jnp.arange(V) != token)
  f = jnp.sum(jnp.where(keep, term, 0.0), axis=-1) / (N * safe_alpha[..., 0])
  return jnp.where(alpha[..., 0] > 0, f, 0.0)


def uniform_nelbo(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], tokens, blocks_BL, num_blocks: int, rng,
                  *, excluded_ids: Sequence[int], vocab_size: int, num_t_samples: int, eps: float = 1e-3,
                  scored_BL=None):
  """Per-row uniform-noise NELBO (nats) summed over blocks, and its standard error over the K samples.

  `logits_fn(noisy[B, L], t[B, L]) -> logits [B, L, V]` (the model ignores t; an oracle may use it) must keep
  blocks apart. K + 1 passes: K stratified noise levels per block for the integral, one at t = eps for the
  reconstruction term (a single draw, added to every estimate; the standard error covers the integral's spread).
  `rng`: one key, or one per row (`estimators.row_keys`: a row's draws are its own).
  """
  K = num_t_samples
  scored_BL = jnp.ones(tokens.shape, bool) if scored_BL is None else scored_BL
  keys_B = row_keys(rng, tokens.shape[0])
  t_KBN = row_levels(keys_B, num_blocks, K, eps)
  corrupt = lambda streams, k, t_BL: row_uniform_corrupt(keys_B, streams, k, tokens, t_BL, vocab_size=vocab_size,
                                                         excluded_ids=excluded_ids, corruptible_BL=scored_BL)[0]

  def one(_, inputs):
    t_BN, k = inputs
    t_BL = per_token(t_BN, blocks_BL)
    noisy = corrupt((CORRUPT_STREAM, TOKEN_STREAM), k, t_BL)
    f_BL = uniform_elbo_integrand(logits_fn(noisy, t_BL), noisy, tokens, t_BL, excluded_ids=excluded_ids)
    return None, (1.0 - eps) * jnp.sum(jnp.where(scored_BL, f_BL, 0.0), axis=-1)

  _, estimates_KB = jax.lax.scan(one, None, (t_KBN, jnp.arange(K)))
  t_eps = jnp.full(tokens.shape, eps, jnp.float32)
  noisy = corrupt((RECON_STREAM, RECON_TOKEN_STREAM), 0, t_eps)
  recon_nll = _support_nll(logits_fn(noisy, t_eps), tokens, excluded_ids)
  recon_B = jnp.sum(jnp.where(scored_BL, recon_nll, 0.0), axis=-1)
  return mean_and_stderr(estimates_KB + recon_B[None])


def _support_nll(logits_BLV, tokens_BL, excluded_ids):
  """-log p(x) with every excluded id (none: the whole vocabulary is the state space) given zero probability."""
  return masked_token_nll(without(logits_BLV.astype(jnp.float32), excluded_ids), tokens_BL, mask_id=-1)


@dataclasses.dataclass(frozen=True)
class UniformDiffusion(Objective):
  """DiffusionGemma's uniform-state recipe (pretraining and prompt-masked SFT, told apart by `loss_mask`). It
  never produces the mask token (`mask_id < 0`: a tokenizer without one)."""

  name = "uniform"
  capabilities = Capabilities(exact=False, sft_rows=True, canvases=True, self_conditioning=True, token_shift=False,
                              mask_token=False, next_token=False)
  mask_id: int
  eps: float = 1e-3
  block_size: int = 16
  encoder_loss_weight: float = 1.0
  self_cond_prob: float = 0.5

  @property
  def excluded_ids(self) -> tuple[int, ...]:
    """The ids that are no noise state and that the denoiser gives zero probability: the mask token, if any."""
    return states_excluding(self.mask_id)

  def model_passes(self, seq_len: int, model_cfg) -> float:
    """[canvas ; clean]: one canvas and the row; a self-conditioning model adds a first forward of the same tokens
    without a backward (a third of a training pass)."""
    tokens = (seq_len + self.block_size) / seq_len
    return tokens * (4.0 / 3.0 if model_cfg.self_conditioning else 1.0)

  def _two_pass(self, model, forward, use_sc_B):
    """Pass 2's (canvas logits, clean logits, aux); with a self-conditioning model, pass 1 feeds pass 2."""
    if getattr(model, "self_conditioning", None) is None:
      return forward(None)
    first_canvas_logits, _, _ = forward(None)
    embeddings = self_conditioning_embeddings(model, first_canvas_logits, use_sc_B, excluded_ids=self.excluded_ids)
    return forward(embeddings)

  def loss_fn(self, model, batch, rng):
    tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
    B, L = tokens.shape
    b = self.block_size
    blocks, num_blocks = canvas_layout(batch, self.block_size)
    scored = scored_positions(batch)
    t_rng, canvas_rng, noise_rng, sc_rng = jax.random.split(rng, 4)

    # One canvas per row, uniformly among those holding scored tokens.
    has_scored_BN = jnp.any((blocks[:, :, None] == jnp.arange(num_blocks)) & scored[:, :, None], axis=1)
    chosen_B = jax.random.categorical(canvas_rng, jnp.where(has_scored_BN, 0.0, -1e9), axis=-1)
    start_B = jnp.argmax(blocks == chosen_B[:, None], axis=-1)  # the chosen canvas's first token
    index_BC = start_B[:, None] + jnp.arange(b)
    inside_BC = index_BC < L
    index_BC = jnp.minimum(index_BC, L - 1)
    take = lambda x: jnp.take_along_axis(x, index_BC, axis=1)
    inside_BC = inside_BC & (take(blocks) == chosen_B[:, None])  # a canvas cut by the row's (or example's) end
    canvas_tokens, canvas_positions = take(tokens), take(positions)
    canvas_segments = jnp.where(inside_BC, take(segments), 0)
    canvas_scored = take(scored) & inside_BC
    canvas_blocks = jnp.broadcast_to(chosen_B[:, None], index_BC.shape).astype(blocks.dtype)

    t_B = stratified_t(t_rng, B, self.eps)
    noisy, replaced = uniform_corrupt(noise_rng, canvas_tokens, t_B[:, None], vocab_size=model.cfg.vocab_size,
                                      excluded_ids=self.excluded_ids, corruptible_BL=canvas_scored)
    forward = lambda embeddings: canvas_clean_forward(model, noisy, canvas_positions, canvas_segments, canvas_blocks,
                                                      batch, blocks, canvas_embeddings_BCD=embeddings)
    use_sc_B = jax.random.uniform(sc_rng, (B,)) < self.self_cond_prob
    canvas_logits, clean_logits, aux = self._two_pass(model, forward, use_sc_B)

    mean_where = lambda nll, where: jnp.sum(jnp.where(where, nll, 0.0)) / jnp.maximum(jnp.sum(where), 1)
    canvas_nll = masked_token_nll(canvas_logits, canvas_tokens, mask_id=self.mask_id)
    num_canvas = jnp.sum(canvas_scored)
    canvas_ce = mean_where(canvas_nll, canvas_scored)
    encoder_nll, encoder_valid = next_token_nll(clean_logits, tokens, segments)
    encoder_valid = encoder_valid & scored[:, 1:]  # SFT: the encoder predicts response tokens only
    encoder_ce = mean_where(encoder_nll, encoder_valid)
    loss = canvas_ce + self.encoder_loss_weight * encoder_ce + aux["aux_loss"]
    # The canvas CE split by whether the token was noised: a denoiser that only copies its input keeps the
    # replaced tokens' CE at the unigram entropy however low the kept tokens' goes.
    metrics = {"loss": loss, "canvas_ce_per_token": canvas_ce, "encoder_nll_per_token": encoder_ce,
               "canvas_ce_replaced": mean_where(canvas_nll, canvas_scored & replaced),
               "canvas_ce_kept": mean_where(canvas_nll, canvas_scored & ~replaced),
               "num_tokens": num_canvas, "replaced_fraction": jnp.sum(replaced) / jnp.maximum(num_canvas, 1),
               "self_cond_fraction": jnp.mean(use_sc_B.astype(jnp.float32)), **router_metrics(aux)}
    return loss, metrics

  def sequence_bound(self, model, batch, rng, *, num_t_samples: int):
    """Per-row uniform-noise NELBO (nats) summed over canvases, its standard error, and the scored-token count.

    A self-conditioning model conditions every row on its own first pass (as when sampling).
    """
    blocks, num_blocks = canvas_layout(batch, self.block_size)
    scored = scored_positions(batch)
    segments, positions = batch["segment_ids"], batch["positions"]
    use_sc_B = jnp.ones(blocks.shape[:1], bool)

    def logits_fn(noisy, t_BL):
      del t_BL  # the denoiser takes no time input
      forward = lambda embeddings: canvas_clean_forward(model, noisy, positions, segments, blocks, batch, blocks,
                                                        canvas_embeddings_BCD=embeddings)
      return self._two_pass(model, forward, use_sc_B)[0]

    nelbo, stderr = uniform_nelbo(logits_fn, batch["tokens"], blocks, num_blocks, rng,
                                  excluded_ids=self.excluded_ids, vocab_size=model.cfg.vocab_size,
                                  num_t_samples=num_t_samples, eps=self.eps, scored_BL=scored)
    return nelbo, stderr, jnp.sum(scored, axis=-1)

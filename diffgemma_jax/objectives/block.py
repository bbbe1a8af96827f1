"""Block diffusion with masked noise: the BD3-LM layout, which is also DiffusionGemma's layout.

A row of L tokens is cut into blocks of `block_size`. One forward pass of the shared stack runs over the
concatenation [canvas ; clean] of length 2L, both halves at the same positions 0..L-1 so sliding windows and RoPE
see true distances:
- clean tokens (the "encoder") attend causally to clean tokens;
- canvas block i (the noisy "decoder" tokens) attends bidirectionally to canvas block i and to clean blocks j < i;
- nothing attends to the canvas from the clean half, and no attention crosses a segment (packed documents).
Each block has its own noise level t (stratified over all blocks of the batch), and the negative ELBO of a row is
the sum over blocks of the masked-diffusion NELBO of the block given the clean blocks before it:
sum_i E_t[(1/t) sum_{masked l in block i} -log p(x_l | canvas_i, x_<i)].

Limits: block_size = L is plain masked diffusion (the noise draws are laid out so the loss equals
`MaskedDiffusion`'s for the same rng); block_size = 1 is an autoregressive model whose query at position l is the
mask token (its loss is the AR negative log-likelihood in expectation over the noise).

Token shift (`model.token_shift`, for adapting an autoregressive checkpoint as Dream and Fast-dLLM v2 do): the
prediction for position l is read at l-1, from the canvas pass when l-1 is in l's block and from the clean causal
pass otherwise; so a block's first token is predicted exactly as the AR model would, and a document's first token
(no predecessor) is neither noised nor scored, the tokens the AR baseline scores. Each block's term is still a
masked-diffusion NELBO given the clean blocks before it (every prediction of block i sees only canvas i and clean
blocks < i), so the bound stays a bound.

Blocks are cut at row indices that are multiples of `block_size` (pretraining: documents are packed and a block
may straddle a document boundary; the segment mask makes it two partial blocks). SFT rows (with `loss_mask`): the
canvases start at the first response token of the row, the prompt is clean context only (block id -1) and a long
response spans several canvases; the last one may be cut by the row end.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model.masks import MaskSpec, canvas_clean_mask  # noqa: F401  (the dense reference, re-exported)
from diffgemma_jax.objectives.estimators import (CORRUPT_STREAM, masked_token_nll, mean_and_stderr, row_draws,
                                                 row_keys, row_levels, stratified_t)
from diffgemma_jax.objectives.interface import Capabilities, Objective
from diffgemma_jax.objectives.masked import corrupt, mask_below, weighted_token_nll
from diffgemma_jax.objectives.rows import normalise_loss, router_metrics, scored_by, scored_positions, sft_segments


def check_block_size(seq_len: int, block_size: int) -> None:
  """Blocks must tile the row: a positive block_size that divides seq_len."""
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
    raise ConfigError(f"objective.block_size: must be a positive integer, got {block_size!r}")
  if block_size > seq_len:
    raise ConfigError(f"objective.block_size={block_size} is longer than the context train.seq_len={seq_len}; "
                      f"use a canvas no longer than the sequence")
  if seq_len % block_size:
    raise ConfigError(f"objective.block_size={block_size} does not divide train.seq_len={seq_len}; choose a "
                      f"block size that divides the sequence length (e.g. {_divisor_hint(seq_len, block_size)})")


def check_canvas_window(block_size: int, sliding_window: int, layer_pattern, *,
                        canvas_key: str = "objective.block_size", window_key: str = "model.sliding_window") -> None:
  """A canvas must fit in the sliding window. Beyond it the reference DiffusionGemma lets every canvas query of a
  sliding layer see the whole canvas, while this denoiser keeps the window inside the canvas (masks.py), so the
  two would compute different logits for the same weights: refused, naming both values."""
  if "sliding" in tuple(layer_pattern) and block_size > sliding_window:
    raise ConfigError(f"{canvas_key}={block_size} is longer than {window_key}={sliding_window}: on sliding-window "
                      f"layers the reference DiffusionGemma lets a canvas attend to all of itself, this denoiser to "
                      f"a window of it, so their logits would differ; use a canvas of at most {sliding_window} "
                      f"tokens or a window of at least {block_size}")


def _divisor_hint(seq_len: int, block_size: int) -> int:
  return max(d for d in range(1, block_size + 1) if seq_len % d == 0)


def block_ids(batch, block_size: int):
  """[B, L] int32 block index per token; -1 marks clean-only context (the prompts of SFT rows).

  SFT rows: each example's canvases start at its first response token and follow each other to the end of its
  segment (the last may be cut by the segment's or the row's end); a packed row's examples (segments) number their
  canvases on from the example before, so block ids rise along the row and every canvas has its own. Tokens of a
  segment without a response (padding) are -1."""
  tokens = batch["tokens"]
  B, L = tokens.shape
  index_L = jnp.arange(L, dtype=jnp.int32)
  if "loss_mask" not in batch:
    return jnp.broadcast_to(index_L // block_size, (B, L))
  scored = scored_positions(batch)
  segments = batch["segment_ids"]
  first_of_segment = (jnp.roll(segments, 1, axis=1) != segments) | (index_L == 0)
  segment_start_BL = jax.lax.cummax(jnp.where(first_of_segment, index_L, 0), axis=1)
  first_scored = scored & (first_of_segment | ~jnp.roll(scored, 1, axis=1))
  response_start_BL = jax.lax.cummax(jnp.where(first_scored, index_L, -1), axis=1)
  in_canvases = response_start_BL >= segment_start_BL  # at or after its segment's response start
  starts_canvas = in_canvases & ((index_L - response_start_BL) % block_size == 0)
  return jnp.where(in_canvases, jnp.cumsum(starts_canvas, axis=1, dtype=jnp.int32) - 1, -1)


def canvas_layout(batch, block_size: int):
  """(block id per token [B, L], blocks per row) of a batch cut into canvases of `block_size` (`block_ids`)."""
  seq_len = batch["tokens"].shape[1]
  check_block_size(seq_len, block_size)
  return block_ids(batch, block_size), seq_len // block_size


def canvas_clean_forward(model, canvas_tokens_BC, canvas_positions_BC, canvas_segments_BC, canvas_blocks_BC, batch,
                         clean_blocks_BL, *, canvas_embeddings_BCD=None):
  """One pass over [canvas ; clean]: (canvas logits [B, C, V], clean logits [B, L, V], aux)."""
  tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
  C = canvas_tokens_BC.shape[1]
  mask = MaskSpec.canvas_clean(canvas_segments_BC, canvas_positions_BC, canvas_blocks_BC, segments, positions,
                               clean_blocks_BL)
  embeddings = None
  if canvas_embeddings_BCD is not None:
    clean_zeros = jnp.zeros(tokens.shape + canvas_embeddings_BCD.shape[-1:], canvas_embeddings_BCD.dtype)
    embeddings = jnp.concatenate([canvas_embeddings_BCD, clean_zeros], axis=1)
  logits, aux = model(jnp.concatenate([canvas_tokens_BC, tokens], axis=1),
                      jnp.concatenate([canvas_positions_BC, positions], axis=1), mask,
                      token_mask_BL=jnp.concatenate([canvas_segments_BC > 0, segments > 0], axis=1),
                      embeddings_BLD=embeddings,
                      canvas_BL=jnp.concatenate([jnp.ones(canvas_tokens_BC.shape, bool),
                                                 jnp.zeros(tokens.shape, bool)], axis=1))
  return logits[:, :C], logits[:, C:], aux


def shift_to_predecessor(canvas_logits_BLV, clean_logits_BLV, blocks_BL):
  """Token shift (`model.token_shift`): the logits that predict position l are the output at l-1. Where l-1 lies
  in l's canvas block that is the canvas pass's output there; where l-1 is in an earlier block (or the clean SFT
  prompt) it is the clean causal pass's, which has seen exactly the clean tokens before l's block. Position l
  without a predecessor (`has_predecessor`) gets a meaningless row: callers never score it."""
  previous = lambda x: jnp.roll(x, 1, axis=1)
  from_canvas_BL = (previous(blocks_BL) == blocks_BL) & (jnp.arange(blocks_BL.shape[1]) > 0)
  return jnp.where(from_canvas_BL[..., None], previous(canvas_logits_BLV), previous(clean_logits_BLV))


def block_t(rng, batch_size: int, num_blocks: int, eps: float):
  """[B, N] noise levels stratified over all B*N blocks; block j of row b takes stratum j*B + b, so each row's
  blocks spread over [eps, 1] and a single block per row reproduces `stratified_t`."""
  t = stratified_t(rng, batch_size * num_blocks, eps)
  return t.reshape(num_blocks, batch_size).T


def per_token(t_BN, blocks_BL):
  return jnp.take_along_axis(t_BN, jnp.maximum(blocks_BL, 0), axis=1)


def weighted_nll_per_token(nll_BL, is_masked_BL, t_BL):
  """Per-row sum over masked tokens of -log p / t, with t per token (per block)."""
  return jnp.sum(weighted_token_nll(nll_BL, is_masked_BL, t_BL), axis=-1)


def block_nelbo(logits_fn: Callable[[jax.Array], jax.Array], tokens, blocks_BL, num_blocks: int, rng, *,
                mask_id: int, num_t_samples: int, eps: float = 1e-3, scored_BL=None):
  """Per-row NELBO (nats, mean of K estimates) summed over blocks, and its standard error.

  `logits_fn(noisy[B, L]) -> canvas logits [B, L, V]` must keep blocks apart (the block layout). `rng`: one key,
  or one per row (`estimators.row_keys`: a row's draws are its own). Every block gets K stratified noise levels
  with its own offset (the row's offset of that block's index, so a row's blocks draw the same however many
  blocks its width holds); with one block this is `masked_nelbo` draw for draw.
  """
  K = num_t_samples
  scored_BL = jnp.ones(tokens.shape, bool) if scored_BL is None else scored_BL
  keys_B = row_keys(rng, tokens.shape[0])
  t_KBN = row_levels(keys_B, num_blocks, K, eps)

  def one(_, inputs):
    t_BN, k = inputs
    t_BL = per_token(t_BN, blocks_BL)
    noisy, is_masked = mask_below(row_draws(keys_B, CORRUPT_STREAM, k, tokens.shape[1]), tokens, t_BL,
                                  mask_id=mask_id, corruptible_BL=scored_BL)
    nll = masked_token_nll(logits_fn(noisy), tokens, mask_id=mask_id)
    return None, weighted_nll_per_token(nll, is_masked, t_BL)

  _, estimates_KB = jax.lax.scan(one, None, (t_KBN, jnp.arange(K)))
  return mean_and_stderr(estimates_KB)


@dataclasses.dataclass(frozen=True)
class BlockDiffusion(Objective):
  """Masked block diffusion for pretraining and prompt-masked SFT (told apart by `loss_mask`, as in `masked`)."""

  name = "block"
  capabilities = Capabilities(exact=False, sft_rows=True, canvases=True, self_conditioning=False, token_shift=True,
                              mask_token=True, next_token=False)
  mask_id: int
  eps: float = 1e-3
  block_size: int = 16

  def model_passes(self, seq_len: int, model_cfg) -> float:
    del seq_len, model_cfg
    return 2.0  # [canvas ; clean]: the whole row twice

  def _canvas_logits(self, model, noisy, batch, blocks_BL):
    """The logits that predict each position (shifted with `model.token_shift`), and the model's aux outputs."""
    canvas, clean, aux = canvas_clean_forward(model, noisy, batch["positions"], batch["segment_ids"], blocks_BL,
                                              batch, blocks_BL)
    if model.cfg.token_shift:
      canvas = shift_to_predecessor(canvas, clean, blocks_BL)
    return canvas, aux

  def canvas_logits_fn(self, model, batch, blocks_BL):
    return lambda noisy: self._canvas_logits(model, noisy, batch, blocks_BL)[0]

  def loss_fn(self, model, batch, rng):
    tokens = batch["tokens"]
    blocks, num_blocks = canvas_layout(batch, self.block_size)
    scored = scored_by(model, batch)
    t_rng, mask_rng = jax.random.split(rng)
    t_BL = per_token(block_t(t_rng, tokens.shape[0], num_blocks, self.eps), blocks)
    noisy, is_masked = corrupt(mask_rng, tokens, t_BL, mask_id=self.mask_id, corruptible_BL=scored)
    logits, aux = self._canvas_logits(model, noisy, batch, blocks)
    nll = masked_token_nll(logits, tokens, mask_id=self.mask_id)
    nelbo = normalise_loss(weighted_token_nll(nll, is_masked, t_BL), scored, sft_segments(batch))
    loss = nelbo + aux["aux_loss"]
    num_tokens = jnp.sum(scored)
    metrics = {"loss": loss, "nelbo_per_token": nelbo, "num_tokens": num_tokens,
               "masked_fraction": jnp.sum(is_masked) / jnp.maximum(num_tokens, 1), **router_metrics(aux)}
    return loss, metrics

  def sequence_bound(self, model, batch, rng, *, num_t_samples: int):
    """Per-row NELBO (nats) summed over blocks, its standard error, and the number of scored tokens."""
    blocks, num_blocks = canvas_layout(batch, self.block_size)
    scored = scored_by(model, batch)
    nelbo, stderr = block_nelbo(self.canvas_logits_fn(model, batch, blocks), batch["tokens"], blocks, num_blocks,
                                rng, mask_id=self.mask_id, num_t_samples=num_t_samples, eps=self.eps,
                                scored_BL=scored)
    return nelbo, stderr, jnp.sum(scored, axis=-1)

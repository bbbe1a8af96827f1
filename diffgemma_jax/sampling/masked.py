"""Reverse processes for masked diffusion, made of small swappable parts.

A canvas holds the prompt followed by `gen_length` mask tokens. Generation proceeds block by block (semi-
autoregressive, LLaDA); inside a block each step runs the denoiser over the whole canvas, proposes a token for
every masked position (`propose`: greedy or temperature via Gumbel noise), scores its confidence, and an
acceptance rule decides which proposals to commit:
- `low_confidence`: commit the `n_s` most confident, with `n_s` from an even schedule over `steps_per_block`
  (LLaDA's low-confidence remasking);
- `threshold`: commit every proposal with confidence >= `threshold`, at least one per step (Fast-dLLM).
Everything is jitted with static shapes; the loop is a `lax.while_loop` that stops when the canvas is full.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


ACCEPTANCE_RULES = ("low_confidence", "threshold")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  gen_length: int = 128
  block_length: int = 32
  steps_per_block: int = 16
  acceptance: str = "low_confidence"
  threshold: float = 0.9
  temperature: float = 0.0

  def __post_init__(self):
    if self.acceptance not in ACCEPTANCE_RULES:
      raise ValueError(f"sampler acceptance {self.acceptance!r} unknown; valid rules are {ACCEPTANCE_RULES}")
    if self.gen_length % self.block_length:
      raise ValueError(f"gen_length={self.gen_length} must be a multiple of block_length={self.block_length}")
    if not 1 <= self.steps_per_block <= self.block_length:
      raise ValueError(f"steps_per_block={self.steps_per_block} must lie in [1, block_length={self.block_length}]")


def even_schedule(num_masked, steps_left):
  """How many tokens to commit now so the block finishes in the remaining steps: ceil(masked / steps_left)."""
  return -(-num_masked // jnp.maximum(steps_left, 1))


def propose(logits_BLV, rng, *, temperature: float, mask_id: int):
  """A token per position and its probability under the (temperature-free) model distribution."""
  logits_BLV = logits_BLV.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  if temperature > 0:
    gumbel = jax.random.gumbel(rng, logits_BLV.shape)
    tokens_BL = jnp.argmax(logits_BLV / temperature + gumbel, axis=-1)
  else:
    tokens_BL = jnp.argmax(logits_BLV, axis=-1)
  log_probs = jax.nn.log_softmax(logits_BLV, axis=-1)
  confidence_BL = jnp.exp(jnp.take_along_axis(log_probs, tokens_BL[..., None], axis=-1)[..., 0])
  return tokens_BL.astype(jnp.int32), confidence_BL


def accept_low_confidence(confidence_BL, candidates_BL, num_to_commit_B):
  """Commits the `num_to_commit` most confident candidates of each row."""
  scores = jnp.where(candidates_BL, confidence_BL, -jnp.inf)
  ranks = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
  return candidates_BL & (ranks < num_to_commit_B[:, None])


def accept_threshold(confidence_BL, candidates_BL, threshold: float):
  """Commits every candidate at or above the threshold, and always at least the single most confident one."""
  scores = jnp.where(candidates_BL, confidence_BL, -jnp.inf)
  best = jnp.max(scores, axis=-1, keepdims=True)
  return candidates_BL & ((scores >= threshold) | (scores == best))


def generate(logits_fn: Callable[[jax.Array], jax.Array], prompt_BP, rng, cfg: SamplerConfig, *, mask_id: int):
  """Fills `cfg.gen_length` positions after each prompt; returns (canvas [B, P + G], model calls [B])."""
  B, P = prompt_BP.shape
  G = cfg.gen_length
  canvas = jnp.concatenate([prompt_BP, jnp.full((B, G), mask_id, prompt_BP.dtype)], axis=1)
  index = jnp.arange(P + G)
  num_blocks = G // cfg.block_length

  def cond(state):
    canvas, _, block, _, _ = state
    return block < num_blocks

  def body(state):
    canvas, rng, block, step, calls = state
    rng, key = jax.random.split(rng)
    start = P + block * cfg.block_length
    in_block = (index >= start) & (index < start + cfg.block_length)
    candidates = (canvas == mask_id) & in_block[None, :]
    tokens, confidence = propose(logits_fn(canvas), key, temperature=cfg.temperature, mask_id=mask_id)
    if cfg.acceptance == "threshold":
      commit = accept_threshold(confidence, candidates, cfg.threshold)
    else:
      num_masked = jnp.sum(candidates, axis=-1)
      commit = accept_low_confidence(confidence, candidates, even_schedule(num_masked, cfg.steps_per_block - step))
    canvas = jnp.where(commit, tokens, canvas)
    calls = calls + jnp.any(candidates, axis=-1).astype(jnp.int32)
    block_done = ~jnp.any((canvas == mask_id) & in_block[None, :])
    next_block = jnp.where(block_done, block + 1, block)
    next_step = jnp.where(block_done, 0, step + 1)
    return canvas, rng, next_block, next_step, calls

  state = (canvas, rng, jnp.int32(0), jnp.int32(0), jnp.zeros((B,), jnp.int32))
  canvas, _, _, _, calls = jax.lax.while_loop(cond, body, state)
  return canvas, calls


def truncate_at_eos(tokens, eos_id: int) -> list[int]:
  """Generated ids up to (not including) the first EOS."""
  out = []
  for token in tokens:
    if int(token) == eos_id:
      break
    out.append(int(token))
  return out

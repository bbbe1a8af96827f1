"""Autoregressive decoding with a KV cache: one prefill call over the prompt, then one call per new token.

The cache has a static number of slots (prompt + new tokens); slot i holds position i, or with a left-padded batch
of prompts of different lengths (`batching.py`, `prompt_starts_B`) position i - start of the row, padding slots never
attended. Each call writes its keys and values into its slots and attends causally to the slots written so far
(sliding-window layers additionally apply their window by position). The loop is a `lax.while_loop` that ends when
every row has produced `max_new_tokens` or, with `stop_at_eos`, an EOS (later slots are then EOS); a row that has
ended rides along to the end of the loop (static shapes) without counting model calls.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffgemma_jax.sampling.batching import real_slots, slot_mask, slot_positions, split_keys
from diffgemma_jax.sampling.parts import sample_next


@dataclasses.dataclass(frozen=True)
class ARConfig:
  max_new_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  stop_at_eos: bool = True

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")


def _num_slots(cache) -> int:
  return jax.tree.leaves(cache)[0].shape[2]


def prefill(model, prompt_BP, cache, starts_B=None):
  """Runs the prompt causally into slots [0, P) (`starts_B`: each row's first real slot, left padding); returns
  (logits of the last prompt position [B, V], cache)."""
  B, P = prompt_BP.shape
  S = _num_slots(cache)
  positions_BS = slot_positions(B, S, starts_B)
  logits, cache = model.decode(prompt_BP, positions_BS[:, :P], slot_mask(B, S, 0, P, starts_B), cache, positions_BS,
                               0, logits_start=P - 1, logits_length=1)
  return logits[:, 0], cache


def decode_step(model, token_B, index, cache, starts_B=None):
  """Runs one token at slot `index` against slots [0, index]; returns (logits [B, V], cache)."""
  B = token_B.shape[0]
  S = _num_slots(cache)
  positions_BS = slot_positions(B, S, starts_B)
  mask_B1S = ((jnp.arange(S)[None, :] <= index) & real_slots(B, S, starts_B))[:, None, :]
  positions_B1 = jax.lax.dynamic_slice_in_dim(positions_BS, index, 1, axis=1)
  logits, cache = model.decode(token_B[:, None], positions_B1, mask_B1S, cache, positions_BS, index)
  return logits[:, 0], cache


def generate(model, prompt_BP, rng, cfg: ARConfig, *, eos_id: int | None = None, prompt_starts_B=None):
  """Returns (tokens [B, P + max_new_tokens], model calls [B]); prompt tokens are kept as given. `rng`: one key or
  one per row; `prompt_starts_B`: each row's first prompt slot in a left-padded batch (None: no padding)."""
  B, P = prompt_BP.shape
  S = P + cfg.max_new_tokens
  stop_at_eos = cfg.stop_at_eos and eos_id is not None
  cache = model.init_kv_cache(B, S)
  tokens = jnp.concatenate([prompt_BP.astype(jnp.int32), jnp.zeros((B, cfg.max_new_tokens), jnp.int32)], axis=1)
  rng, key = split_keys(rng)
  logits, cache = prefill(model, prompt_BP, cache, prompt_starts_B)
  first = sample_next(logits, key, temperature=cfg.temperature, top_p=cfg.top_p)
  tokens = tokens.at[:, P].set(first)
  done = (first == eos_id) if stop_at_eos else jnp.zeros((B,), bool)
  calls = jnp.ones((B,), jnp.int32)

  def cond(state):
    _, _, index, _, done, _ = state
    return (index < S - 1) & ~jnp.all(done)

  def body(state):
    tokens, cache, index, rng, done, calls = state
    rng, key = split_keys(rng)
    logits, cache = decode_step(model, tokens[:, index], index, cache, prompt_starts_B)
    new = sample_next(logits, key, temperature=cfg.temperature, top_p=cfg.top_p)
    if stop_at_eos:
      new = jnp.where(done, eos_id, new)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], index + 1, axis=1)
    calls = calls + (~done).astype(jnp.int32)
    if stop_at_eos:
      done = done | (new == eos_id)
    return tokens, cache, index + 1, rng, done, calls

  tokens, _, index, _, _, calls = jax.lax.while_loop(cond, body, (tokens, cache, jnp.int32(P), rng, done, calls))
  if stop_at_eos:  # slots never reached once every row ended
    tokens = jnp.where(jnp.arange(S)[None, :] > index, eos_id, tokens)
  return tokens, calls

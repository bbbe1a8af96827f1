"""The device side of continuous batching for the autoregressive decoder (`autoregressive.py`).

Each of the engine's B slots (rows of one KV cache [B, S]) holds one request: its prompt at slots [0, p)
(position = slot), its n-th new token at slot p + n. `insert` prefills the prompts admitted together into their
rows in one call and samples each first new token from its prompt's last logits; every `step` is ONE model call
[B, 1] that runs each active row's last token at its own slot (`write_B`) against the slots before it and samples
the next. A row ends at EOS or its
`max_new_tokens`; each row splits its key once per sampled token, as `autoregressive.generate` does for the
request alone, so a request's tokens are its lone run's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffgemma_jax.model.transformer import write_window
from diffgemma_jax.sampling.autoregressive import ARConfig
from diffgemma_jax.sampling.batching import split_keys
from diffgemma_jax.sampling.parts import sample_next
from diffgemma_jax.sampling.serving import prefill_rows, put_rows, select_rows


class ARSlots(NamedTuple):
  cache: Any  # the KV cache [B, S]
  last_B: jax.Array  # the last sampled token, run at slot write_B next
  write_B: jax.Array
  count_B: jax.Array  # new tokens so far
  max_new_B: jax.Array
  rng_B: jax.Array  # the request's key, split once per token
  out_BG: jax.Array  # the new tokens (EOS after an EOS with stop_at_eos)
  calls_B: jax.Array
  active_B: jax.Array
  done_B: jax.Array  # the request has finished; the host collects it and frees the slot


class ARProgram:
  """The jittable functions of the AR engine for one `ARConfig` (its `max_new_tokens`: the most any request may
  ask for) and EOS id."""
  admission_calls = 1  # an admission prefills its prompts in one model call
  splits_rows = True  # every step is per row (no row reads another's): slots may be split over devices

  def __init__(self, cfg: ARConfig, *, eos_id: int | None):
    self.cfg, self.eos_id = cfg, eos_id
    self.stop_at_eos = cfg.stop_at_eos and eos_id is not None
    self.unit, self.max_new_tokens = 1, cfg.max_new_tokens
    self.fill = eos_id if self.stop_at_eos else 0  # what follows a row's EOS, and the unwritten tokens

  def _sample(self, logits_BV, key):
    return sample_next(logits_BV, key, temperature=self.cfg.temperature, top_p=self.cfg.top_p)

  def _finished(self, token_B, count_B, max_new_B):
    ended = count_B >= max_new_B
    return ended | (token_B == self.eos_id) if self.stop_at_eos else ended

  def init(self, model, num_slots: int, num_cache_slots: int) -> ARSlots:
    B, G = num_slots, self.cfg.max_new_tokens
    zeros = jnp.zeros((B,), jnp.int32)
    keys = jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32))
    return ARSlots(model.init_kv_cache(B, num_cache_slots), zeros, zeros, zeros, zeros, keys,
                   jnp.full((B, G), self.fill, jnp.int32), zeros, jnp.zeros((B,), bool), jnp.zeros((B,), bool))

  def insert(self, model, slots: ARSlots, rows_A, prompts_AW, lengths_A, rng_A, max_new_A) -> ARSlots:
    """Starts A requests in rows `rows_A` (out of range: a dummy, written nowhere): their prompts (right-padded,
    `lengths_A` real tokens) prefilled in one call (`serving.prefill_rows`) and each first new token sampled from
    its prompt's last logits with its own key."""
    logits, cache = prefill_rows(model, slots.cache, rows_A, prompts_AW, lengths_A)
    rng_A, key_A = split_keys(rng_A)
    first_A = self._sample(logits[:, 0], key_A)
    ended_A = self._finished(first_A, 1, max_new_A)
    out_AG = jnp.full((first_A.shape[0],) + slots.out_BG.shape[1:], self.fill, jnp.int32).at[:, 0].set(first_A)
    put = lambda array, value: put_rows(array, rows_A, value)  # noqa: E731
    return ARSlots(cache, put(slots.last_B, first_A), put(slots.write_B, lengths_A), put(slots.count_B, 1),
                   put(slots.max_new_B, max_new_A), put(slots.rng_B, rng_A), put(slots.out_BG, out_AG),
                   put(slots.calls_B, 1), put(slots.active_B, ~ended_A), put(slots.done_B, ended_A))

  def step(self, model, slots: ARSlots) -> ARSlots:
    """One model call: every active row's last token at its slot, and the next token sampled."""
    B = slots.last_B.shape[0]
    S = jax.tree.leaves(slots.cache)[0].shape[2]
    write_B, active_B = slots.write_B, slots.active_B
    slots_S = jnp.arange(S, dtype=jnp.int32)
    mask_B1S = (slots_S[None, :] <= write_B[:, None])[:, None, :]
    logits, cache = model.decode(slots.last_B[:, None], write_B[:, None], mask_B1S, slots.cache,
                                 jnp.broadcast_to(slots_S, (B, S)), write_B)
    next_rng, key = split_keys(slots.rng_B)
    new_B = self._sample(logits[:, 0], key)
    count_B = slots.count_B + active_B.astype(jnp.int32)
    ended_B = active_B & self._finished(new_B, count_B, slots.max_new_B)
    written = write_window(slots.out_BG, new_B[:, None], jnp.minimum(slots.count_B, slots.out_BG.shape[1] - 1))
    keep = lambda new, old: select_rows(active_B, new, old)  # noqa: E731
    return ARSlots(cache, keep(new_B, slots.last_B), write_B + active_B.astype(jnp.int32), count_B, slots.max_new_B,
                   keep(next_rng, slots.rng_B), keep(written, slots.out_BG),
                   slots.calls_B + active_B.astype(jnp.int32), active_B & ~ended_B, slots.done_B | ended_B)

  def max_steps(self, max_new_tokens: int) -> int:
    """The most steps a request of `max_new_tokens` takes (its prefill samples the first token, a step each next)."""
    return max_new_tokens - 1

  def step_calls(self, slots: ARSlots):
    del slots
    return 1  # every step is one model call

  def active(self, slots: ARSlots):
    return slots.active_B

  def results(self, slots: ARSlots) -> dict[str, Any]:
    """Every row's new tokens and model calls."""
    return {"tokens": slots.out_BG, "model_calls": slots.calls_B, "steps": None}

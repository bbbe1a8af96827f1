"""The device side of continuous batching for the masked-diffusion samplers (`masked.py`, caches "dual" and "none").

Each of the engine's B slots (rows of one KV cache [B, S]) holds one request laid out as its lone run's canvas: the
prompt at slots [0, p), its gen_length g of masks at [p, p + g) (position = slot), filled block after block. The
slots from p + g on are never attended, so every query sees exactly the slots its lone canvas has. Every `step`
advances each active row by one step of the static loop (`masked.generate`), of one of two kinds:
- REFRESH (a block's first step, with `refresh_every` also every that many steps, and every step without a
  cache): the row's whole canvas through the model, bidirectionally, storing every slot's keys/values
  (`ModelDenoiser.full`);
- CACHED (the dual cache's other steps): the block only (with `model.token_shift` also the slot before it) against
  the row's stored keys/values (`ModelDenoiser.cached`).
Rows reach block boundaries at different steps, so a step makes up to two model calls: one window call [B, b (+1)]
for every row, then one refresh call for the refreshing rows only, batched as admissions are: gathered into a call
of R rows (the next power of two at least their count, at most B; a compiled branch per size) on a fresh cache
[R, S] and scattered back over every slot of their rows, which also replaces what the window call wrote there.
A call no row needs is skipped. Admission makes no model call: a request's first step refreshes its row (prompt
included), as its lone run's does. Each row splits its request's key once per step, as the lone loop does, and
stops after the block holding its first EOS (masks left after it read as EOS) or after its last block, so a
request's tokens and steps are its lone run's; its model calls are its steps (the lone count: one call per step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffgemma_jax.model.masks import MaskSpec
from diffgemma_jax.model.transformer import write_window
from diffgemma_jax.sampling.batching import split_keys
from diffgemma_jax.sampling.masked import SamplerConfig
from diffgemma_jax.sampling.parts import masked_step
from diffgemma_jax.sampling.serving import admission_size, put_rows, select_rows

SERVED_CACHES = ("dual", "none")  # "block" (BlockDenoiser) commits finished blocks in a window of its own


class MaskedSlots(NamedTuple):
  cache: Any  # the KV cache [B, S]
  canvas_BS: jax.Array  # prompt, generated tokens and masks below end_B (padding beyond)
  prompt_B: jax.Array  # p: the first block's first slot
  end_B: jax.Array  # p + g: the slots the row's queries see
  block_B: jax.Array
  step_B: jax.Array  # steps taken on the block
  rng_B: jax.Array  # the request's key, split once per step
  calls_B: jax.Array
  active_B: jax.Array
  done_B: jax.Array  # the request has finished; the host collects it and frees the slot


class MaskedProgram:
  """The jittable functions of the masked engine for one `SamplerConfig` (its `gen_length`: the most any request
  may ask for) and special ids."""
  admission_calls = 0  # the first step refreshes the row: no prefill

  def __init__(self, cfg: SamplerConfig, *, mask_id: int, eos_id: int | None, pad_id: int = 0):
    if cfg.cache not in SERVED_CACHES:
      raise ValueError(f"the masked engine serves the caches {SERVED_CACHES}, not cache {cfg.cache!r}")
    self.cfg, self.mask_id, self.eos_id, self.pad_id = cfg, mask_id, eos_id, pad_id
    self.stop_at_eos = cfg.stop_at_eos and eos_id is not None
    self.unit = cfg.block_length  # a request's max new tokens: a multiple of this, at most max_new_tokens
    self.max_new_tokens = cfg.gen_length

  def init(self, model, num_slots: int, num_cache_slots: int) -> MaskedSlots:
    B, S = num_slots, num_cache_slots
    zeros, no = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool)
    keys = jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32))
    return MaskedSlots(model.init_kv_cache(B, S), jnp.full((B, S), self.pad_id, jnp.int32), zeros, zeros, zeros,
                       zeros, keys, zeros, no, no)

  def insert(self, model, slots: MaskedSlots, rows_A, prompts_AW, lengths_A, rng_A, num_blocks_A) -> MaskedSlots:
    """Starts A requests in rows `rows_A` (out of range: a dummy, written nowhere): each row's canvas is its prompt
    (right-padded in `prompts_AW`, `lengths_A` real tokens) and its budget of masks; its cache is left as it is,
    every slot of it rewritten by the first step's refresh."""
    del model
    S = slots.canvas_BS.shape[1]
    slots_S = jnp.arange(S, dtype=jnp.int32)
    end_A = lengths_A + num_blocks_A * self.cfg.block_length
    prompt_AS = jnp.pad(prompts_AW, ((0, 0), (0, S - prompts_AW.shape[1])))
    canvas_AS = jnp.where(slots_S < lengths_A[:, None], prompt_AS,
                          jnp.where(slots_S < end_A[:, None], self.mask_id, self.pad_id))
    put = lambda array, value: put_rows(array, rows_A, value)  # noqa: E731
    return slots._replace(canvas_BS=put(slots.canvas_BS, canvas_AS), prompt_B=put(slots.prompt_B, lengths_A),
                          end_B=put(slots.end_B, end_A), block_B=put(slots.block_B, 0),
                          step_B=put(slots.step_B, 0), rng_B=put(slots.rng_B, rng_A), calls_B=put(slots.calls_B, 0),
                          active_B=put(slots.active_B, True), done_B=put(slots.done_B, False))

  def _refreshing(self, slots: MaskedSlots):
    """The active rows whose step is a refresh, as `masked.generate` decides it."""
    if self.cfg.cache == "none":
      return slots.active_B
    refresh_B = slots.step_B == 0
    if self.cfg.refresh_every > 0:
      refresh_B = refresh_B | (slots.step_B % self.cfg.refresh_every == 0)
    return slots.active_B & refresh_B

  def _cached(self, model, slots: MaskedSlots, start_B):
    """Every row's block (and with token shift the slot before it) against its stored keys/values: the block's
    float32 logits [B, b, V] and the cache. Rows not stepping on the cache are run too; what they write is rewritten
    by their refresh (this step's, or the first step's after an admission) before any query of theirs reads it."""
    b, shift = self.cfg.block_length, int(model.cfg.token_shift)
    B, S = slots.canvas_BS.shape
    window_B = jnp.maximum(start_B - shift, 0)  # an empty row's (prompt length 0) stays in range
    query_BW = window_B[:, None] + jnp.arange(b + shift, dtype=jnp.int32)[None, :]
    slots_S = jnp.arange(S, dtype=jnp.int32)
    seen_BS = slots_S[None, :] < jnp.maximum(slots.end_B, 1)[:, None]  # an empty row sees slot 0, not nothing
    mask_BWS = jnp.broadcast_to(seen_BS[:, None, :], (B, b + shift, S))
    logits, cache = model.decode(jnp.take_along_axis(slots.canvas_BS, query_BW, axis=1), query_BW, mask_BWS,
                                 slots.cache, jnp.broadcast_to(slots_S, (B, S)), window_B, logits_start=0,
                                 logits_length=b)
    return logits, cache

  def refresh(self, model, slots: MaskedSlots, cache, start_B, refresh_B, logits_BbV):
    """The refreshing rows' whole canvases in one call of R rows (`admission_size` of their count): their block
    logits written into `logits_BbV` and their keys/values over every slot of their cache rows."""
    b, shift = self.cfg.block_length, int(model.cfg.token_shift)
    B, S = slots.canvas_BS.shape
    count = jnp.sum(refresh_B.astype(jnp.int32))
    order_B = jnp.argsort(~refresh_B, stable=True)  # the refreshing rows first, in row order
    sizes = sorted({admission_size(n, B) for n in range(1, B + 1)})

    def call_of(size: int):
      def run(operands):
        cache, logits_BbV = operands
        rows_R = jnp.where(jnp.arange(size) < count, order_B[:size], B)  # beyond the count: dummies, written nowhere
        take_R = jnp.minimum(rows_R, B - 1)
        positions_RS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (size, S))
        # A dummy copying an empty row gets one real token: no kernel sees a document of length 0.
        mask = MaskSpec.single_documents("bidirectional", jnp.maximum(slots.end_B[take_R], 1), S)
        logits_R, cache_R = model.decode(slots.canvas_BS[take_R], positions_RS, mask, model.init_kv_cache(size, S),
                                         positions_RS, 0, logits_start=start_B[take_R] - shift, logits_length=b)
        cache = jax.tree.map(lambda full, part: full.at[:, rows_R].set(part, mode="drop"), cache, cache_R)
        return cache, logits_BbV.at[rows_R].set(logits_R.astype(logits_BbV.dtype), mode="drop")
      return run

    branch = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), count))
    cache, logits_BbV = jax.lax.switch(branch, [lambda operands: operands] + [call_of(size) for size in sizes],
                                       (cache, logits_BbV))
    return logits_BbV, cache

  def step_calls(self, slots: MaskedSlots):
    """The model calls `step` makes from `slots`: a window call if a row steps cached, a refresh call if one
    refreshes."""
    refresh_B = self._refreshing(slots)
    return (jnp.any(refresh_B).astype(jnp.int32)
            + (jnp.any(slots.active_B & ~refresh_B).astype(jnp.int32) if self.cfg.cache == "dual" else 0))

  def step(self, model, slots: MaskedSlots) -> MaskedSlots:
    """One denoising step of every active row (see the module docstring)."""
    cfg, b = self.cfg, self.cfg.block_length
    B, S = slots.canvas_BS.shape
    active_B = slots.active_B
    start_B = slots.prompt_B + slots.block_B * b
    refresh_B = self._refreshing(slots)
    logits_BbV = jnp.zeros((B, b, model.cfg.vocab_size), jnp.float32)
    cache = slots.cache
    if cfg.cache == "dual":  # first: a refreshing row's cache row is then rewritten whole
      logits_BbV, cache = jax.lax.cond(jnp.any(active_B & ~refresh_B),
                                       lambda: self._cached(model, slots, start_B),
                                       lambda: (logits_BbV, cache))
    logits_BbV, cache = self.refresh(model, slots, cache, start_B, refresh_B, logits_BbV)

    next_rng_B, key_B = split_keys(slots.rng_B)
    block_Bb = jnp.take_along_axis(slots.canvas_BS, start_B[:, None] + jnp.arange(b)[None, :], axis=1)
    candidates_Bb = (block_Bb == self.mask_id) & active_B[:, None]
    tokens_Bb, commit_Bb = masked_step(logits_BbV, key_B, candidates_Bb, acceptance=cfg.acceptance,
                                       threshold=cfg.threshold, temperature=cfg.temperature,
                                       steps_left=cfg.steps_per_block - slots.step_B, mask_id=self.mask_id)
    block_Bb = jnp.where(commit_Bb, tokens_Bb, block_Bb)
    canvas_BS = write_window(slots.canvas_BS, block_Bb, start_B)
    block_done_B = active_B & ~jnp.any(block_Bb == self.mask_id, axis=-1)
    ended_B = block_done_B & ((slots.block_B + 1) * b >= slots.end_B - slots.prompt_B)
    if self.stop_at_eos:  # a row stops after the block that holds its first EOS
      slots_S = jnp.arange(S)[None, :]
      generated_BS = (slots_S >= slots.prompt_B[:, None]) & (slots_S < (start_B + b)[:, None])
      ended_B = ended_B | (block_done_B & jnp.any((canvas_BS == self.eos_id) & generated_BS, axis=-1))
    step_B = jnp.where(block_done_B, 0, slots.step_B + active_B.astype(jnp.int32))
    return slots._replace(
        cache=cache, canvas_BS=canvas_BS, block_B=slots.block_B + (block_done_B & ~ended_B).astype(jnp.int32),
        step_B=step_B, rng_B=select_rows(active_B, next_rng_B, slots.rng_B),
        calls_B=slots.calls_B + active_B.astype(jnp.int32), active_B=active_B & ~ended_B,
        done_B=slots.done_B | ended_B)

  def active(self, slots: MaskedSlots):
    return slots.active_B

  def results(self, slots: MaskedSlots) -> dict[str, Any]:
    """Every row's new tokens (masks of the blocks skipped after an EOS read as EOS) and model calls."""
    G = self.max_new_tokens
    tokens_BG = jnp.take_along_axis(slots.canvas_BS, slots.prompt_B[:, None] + jnp.arange(G)[None, :], axis=1,
                                    mode="clip")
    if self.stop_at_eos:
      tokens_BG = jnp.where(tokens_BG == self.mask_id, self.eos_id, tokens_BG)
    return {"tokens": tokens_BG, "model_calls": slots.calls_B, "steps": None}

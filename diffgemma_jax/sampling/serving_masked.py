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
Rows reach block boundaries at different steps, so a step makes up to two model calls on disjoint rows: one
window call for the rows stepping on the cache and one refresh call (on a fresh cache) for the refreshing rows.
Each call runs only its rows, over only the slots they use: its rows are gathered into R rows (the next power of
two at least their count, as admissions are sized) over W slots (the narrowest of `num_widths` even widths up to S
holding every one of their canvases), so a short request does not pay for the widest prompt and budget, nor a
refreshing or idle slot for a window it would throw away. A compiled `lax.switch` branch per (R, W); a window call
that would take B rows runs the whole batch in place instead of gathering it (the other rows' windows run at slot
0, their logits dropped, their writes rewritten before any query of theirs reads them). The step thus holds
2 x (ceil(log2 B) + 1) x num_widths model calls, one of each kind run (32 for B = 8). A refresh writes slots [0, W) of
its rows; a window call's keys/values are read by that call only (the row's next call, a window over the same block
or a refresh, rewrites them first), so a gathered window call writes nothing back.
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
NUM_WIDTHS = 4  # the slot widths a call compiles for: S / 4, S / 2, 3 S / 4 and S (`MaskedProgram.widths`)


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
  may ask for) and special ids; `num_widths`: how many slot widths each kind of call compiles for (more: calls
  nearer their rows' own width, and more compile time)."""
  admission_calls = 0  # the first step refreshes the row: no prefill

  def __init__(self, cfg: SamplerConfig, *, mask_id: int, eos_id: int | None, pad_id: int = 0,
               num_widths: int = NUM_WIDTHS):
    if cfg.cache not in SERVED_CACHES:
      raise ValueError(f"the masked engine serves the caches {SERVED_CACHES}, not cache {cfg.cache!r}")
    if num_widths < 1:
      raise ValueError(f"num_widths={num_widths} must be >= 1")
    self.num_widths = num_widths
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

  def sizes(self, num_slots: int) -> tuple[int, ...]:
    """The row counts a call is compiled for: the admission sizes (powers of two, at most B)."""
    return tuple(sorted({admission_size(n, num_slots) for n in range(1, num_slots + 1)}))

  def widths(self, num_cache_slots: int) -> tuple[int, ...]:
    """The slot widths a call is compiled for: `num_widths` even steps up to S (the last one S)."""
    quantum = -(-num_cache_slots // self.num_widths)
    return tuple(sorted({min(num_cache_slots, quantum * k) for k in range(1, self.num_widths + 1)}))

  def _grouped(self, slots: MaskedSlots, selected_B, operands, call, *, whole_batch=None):
    """`call(size, width, rows_R, take_R, operands) -> operands` on the selected rows gathered into R rows (the
    smallest of `sizes` that holds them) over the first W slots (the smallest of `widths` that holds every selected
    row's canvas, `end_B`): one `lax.switch` branch per (size, width), none run when no row is selected. `rows_R`:
    the selected rows in row order, then B (dummies: their writes are dropped); `take_R`: where each reads from
    (a dummy copies the first selected row, so every row it runs is a real canvas). `whole_batch(width)`, if
    given, makes the branches (one per width) for what would take B rows: every row in place."""
    B, S = slots.canvas_BS.shape
    sizes, widths = self.sizes(B), self.widths(S)
    if whole_batch is not None:
      sizes = sizes[:-1]
    count = jnp.sum(selected_B.astype(jnp.int32))
    order_B = jnp.argsort(~selected_B, stable=True)  # the selected rows first, in row order
    width_index = jnp.searchsorted(jnp.asarray(widths), jnp.max(jnp.where(selected_B, slots.end_B, 1)))
    branch = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count) * len(widths)
                       + width_index)

    def branch_of(size: int, width: int):
      def run(operands):
        real_R = jnp.arange(size) < count
        rows_R = jnp.where(real_R, order_B[:size], B)
        take_R = order_B[jnp.where(real_R, jnp.arange(size), 0)]
        return call(size, width, rows_R, take_R, operands)
      return run

    branches = [lambda operands: operands] + [branch_of(size, width) for size in sizes for width in widths]
    if whole_batch is not None:
      branch = jnp.where(count > (sizes[-1] if sizes else 0), len(branches) + width_index, branch)
      branches += [whole_batch(width) for width in widths]
    return jax.lax.switch(branch, branches, operands)

  def _cached(self, model, slots: MaskedSlots, start_B, cached_B, operands):
    """The cached-stepping rows' blocks (with token shift also the slot before each) against their stored
    keys/values over the first W slots (`_grouped`'s width): their block logits written into `logits_BbV`. The
    window's own keys/values are written into the call's cache and read by the call, never after it (a row's next
    call, a window over the same block or a refresh, rewrites them first), so rows that fit a size below B are
    gathered into a call of R rows on a copy of their cache rows and nothing is written back. More run as the whole
    batch (gathering would copy the whole cache for little): in place over all S slots, or on the first W slots of
    every row; the other rows run a window too (at slot 0), their logits dropped and their writes (in place: the
    window's slots) rewritten before any query of theirs reads them (a refreshing row's by this step's refresh, an
    idle row's by its first refresh)."""
    b, shift = self.cfg.block_length, int(model.cfg.token_shift)
    Q = b + shift
    B, S = slots.canvas_BS.shape

    def run(canvas_RW, cache_R, window_R, end_R):
      size, width = canvas_RW.shape
      query_RQ = window_R[:, None] + jnp.arange(Q, dtype=jnp.int32)[None, :]
      slots_W = jnp.arange(width, dtype=jnp.int32)
      seen_RW = slots_W[None, :] < end_R[:, None]
      return model.decode(jnp.take_along_axis(canvas_RW, query_RQ, axis=1), query_RQ,
                          jnp.broadcast_to(seen_RW[:, None, :], (size, Q, width)), cache_R,
                          jnp.broadcast_to(slots_W, (size, width)), window_R, logits_start=0, logits_length=b)

    def call(size, width, rows_R, take_R, operands):
      cache, logits_BbV = operands
      logits_R, _ = run(slots.canvas_BS[take_R, :width], jax.tree.map(lambda a: a[:, take_R, :width], cache),
                        start_B[take_R] - shift, slots.end_B[take_R])
      return cache, logits_BbV.at[rows_R].set(logits_R.astype(logits_BbV.dtype), mode="drop")

    def whole_batch(width: int):
      def run_all(operands):
        cache, logits_BbV = operands
        window_B = jnp.where(cached_B, start_B - shift, 0)  # the other rows' windows at slot 0: always in range
        end_B = jnp.maximum(slots.end_B, 1)  # a row never used sees slot 0, not nothing
        if width == S:  # in place
          logits, cache = run(slots.canvas_BS, cache, window_B, end_B)
        else:
          logits, _ = run(slots.canvas_BS[:, :width], jax.tree.map(lambda a: a[:, :, :width], cache), window_B, end_B)
        return cache, jnp.where(cached_B[:, None, None], logits.astype(logits_BbV.dtype), logits_BbV)
      return run_all

    return self._grouped(slots, cached_B, operands, call, whole_batch=whole_batch)

  def refresh(self, model, slots: MaskedSlots, cache, start_B, refresh_B, logits_BbV):
    """The refreshing rows' whole canvases in one call of R rows over W slots (`_grouped`) on a fresh cache: their
    block logits written into `logits_BbV` and their keys/values over slots [0, W) of their cache rows (a row's
    slots from W on lie beyond its canvas: no query of its reads them)."""
    b, shift = self.cfg.block_length, int(model.cfg.token_shift)

    def call(size, width, rows_R, take_R, operands):
      cache, logits_BbV = operands
      positions_RW = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (size, width))
      mask = MaskSpec.single_documents("bidirectional", slots.end_B[take_R], width)
      logits_R, cache_R = model.decode(slots.canvas_BS[take_R, :width], positions_RW, mask,
                                       model.init_kv_cache(size, width), positions_RW, 0,
                                       logits_start=start_B[take_R] - shift, logits_length=b)
      cache = jax.tree.map(lambda full, part: full.at[:, rows_R, :width].set(part, mode="drop"), cache, cache_R)
      return cache, logits_BbV.at[rows_R].set(logits_R.astype(logits_BbV.dtype), mode="drop")

    cache, logits_BbV = self._grouped(slots, refresh_B, (cache, logits_BbV), call)
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
    if cfg.cache == "dual":  # the rows stepping on the cache, first: a whole-batch window call's writes into the
      # refreshing rows are then rewritten by their refresh
      cache, logits_BbV = self._cached(model, slots, start_B, active_B & ~refresh_B, (cache, logits_BbV))
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

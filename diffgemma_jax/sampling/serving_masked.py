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
window call for the rows stepping on the cache, then one refresh call (on a fresh cache) for the refreshing rows.
Each call runs only its rows, over only the slots they use: its rows are gathered into R rows (the next power of
two at least their count, as admissions are sized) over W slots (the narrowest of `num_widths` even widths up to S
holding every one of their canvases), so a short request does not pay for the widest prompt and budget, nor a
refreshing or idle slot for a window it would throw away. A window call that would take B rows runs the whole
batch in place instead of gathering it (the other rows' windows run at slot 0, their logits dropped, their writes
rewritten before any query of theirs reads them). A refresh writes slots [0, W) of its rows; a window call's
keys/values are read by that call only (the row's next call, a window over the same block or a refresh, rewrites
them first), so a gathered window call writes nothing back.
Compiled pay-as-you-go: each (kind, R, W) is a CLASS of call, 2 x (ceil(log2 B) + 1) x num_widths of them (32 for
B = 8, 4 widths), and each is its own jitted program (the call and its rows' step: `call`), compiled the first
time a step needs it. The engine steps from the host (`host_steps`): `plan` says on the device which class of each
kind the next step runs (read back with the rows' flags, a few bytes; the engine has each call program return the
plan of the state it leaves), and the host runs those programs in order.
A run thus compiles only the classes its steps use (a few for a handful of prompts), where one device loop holding
every class would compile all of them before the first step; it pays a dispatch and a read-back per step instead.
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
from diffgemma_jax.sampling.serving import admission_size, put_rows

SERVED_CACHES = ("dual", "none")  # "block" (BlockDenoiser) commits finished blocks in a window of its own
NUM_WIDTHS = 4  # the slot widths a call runs at by default: S / 4, S / 2, 3 S / 4 and S (`MaskedProgram.widths`)


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
  may ask for) and special ids; `num_widths`: how many slot widths a call may run at (more: calls nearer their
  rows' own width, and more classes of call a run may compile, each on first use)."""
  admission_calls = 0  # the first step refreshes the row: no prefill
  host_steps = True  # the engine runs `plan` and each planned `call` from the host (module docstring)
  # Its calls gather a class of rows from anywhere in the slots (`rows`), which with the slots split over
  # devices would move rows between them at every call: the engine keeps this program's slots where the model is.
  splits_rows = False

  def __init__(self, cfg: SamplerConfig, *, mask_id: int, eos_id: int | None, pad_id: int = 0,
               num_widths: int = NUM_WIDTHS):
    if cfg.cache not in SERVED_CACHES:
      raise ValueError(f"the masked engine serves the caches {SERVED_CACHES}, not cache {cfg.cache!r}")
    if num_widths < 1:
      raise ValueError(f"num_widths={num_widths} must be >= 1")
    self.num_widths = num_widths
    self.cfg, self.mask_id, self.eos_id, self.pad_id = cfg, mask_id, eos_id, pad_id
    self.stop_at_eos = cfg.stop_at_eos and eos_id is not None
    self.kinds = ("window", "refresh") if cfg.cache == "dual" else ("refresh",)  # a step's calls, in this order
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
    """The row counts a call runs: the admission sizes (powers of two, at most B)."""
    return tuple(sorted({admission_size(n, num_slots) for n in range(1, num_slots + 1)}))

  def widths(self, num_cache_slots: int) -> tuple[int, ...]:
    """The slot widths a call runs: `num_widths` even steps up to S (the last one S)."""
    quantum = -(-num_cache_slots // self.num_widths)
    return tuple(sorted({min(num_cache_slots, quantum * k) for k in range(1, self.num_widths + 1)}))

  def classes(self, num_slots: int, num_cache_slots: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, width) a call of either kind may run, in the order `plan` numbers them (from 1)."""
    return tuple((size, width) for size in self.sizes(num_slots) for width in self.widths(num_cache_slots))

  def max_steps(self, max_new_tokens: int) -> int:
    """The most steps a request of `max_new_tokens` takes: `steps_per_block` per block (the even schedule commits
    every mask left at a block's last step)."""
    return max_new_tokens // self.cfg.block_length * self.cfg.steps_per_block

  def plan(self, slots: MaskedSlots):
    """The step's calls: (the class of each of `kinds` (`classes`' index + 1; 0: no call), the rows each kind
    selects). A kind's class is the smallest row count holding its rows and the narrowest width holding every one
    of their canvases (`end_B`)."""
    B, S = slots.canvas_BS.shape
    sizes, widths = jnp.asarray(self.sizes(B), jnp.int32), jnp.asarray(self.widths(S), jnp.int32)

    def class_of(selected_B):
      count = jnp.sum(selected_B.astype(jnp.int32))
      width_index = jnp.searchsorted(widths, jnp.max(jnp.where(selected_B, slots.end_B, 1)))
      return jnp.where(count == 0, 0, 1 + jnp.searchsorted(sizes, count) * len(widths) + width_index)

    refresh_B = self._refreshing(slots)
    selected = {"window": slots.active_B & ~refresh_B, "refresh": refresh_B}
    return jnp.stack([class_of(selected[kind]) for kind in self.kinds]).astype(jnp.int32), tuple(
        selected[kind] for kind in self.kinds)

  def call(self, model, slots: MaskedSlots, kind: str, size_width: tuple[int, int], selected) -> MaskedSlots:
    """The `plan`'s call of `kind` in class (R rows, W slots) on its selected rows, then their step (`_advance`).
    `selected`: `plan`'s rows of every kind."""
    size, width = size_width
    selected_B = selected[self.kinds.index(kind)]
    if kind == "window" and size == slots.canvas_BS.shape[0]:
      logits_R, cache = self.whole_batch_window(model, slots, selected_B, width)
      rows_R = jnp.arange(size, dtype=jnp.int32)
      rows_R, take_R = jnp.where(selected_B, rows_R, size), rows_R
    else:
      rows_R, take_R = self.rows(selected_B, size)
      logits_R, cache = (self.window if kind == "window" else self.refresh)(model, slots, rows_R, take_R, width)
    return self._advance(slots._replace(cache=cache), rows_R, take_R, logits_R)

  @staticmethod
  def rows(selected_B, size: int):
    """(rows_R, take_R) of a call of R = `size` rows: the selected rows in row order, then B (dummies: their writes
    dropped); where each reads from (a dummy copies the first selected row, so every row a call runs is a real
    canvas)."""
    B = selected_B.shape[0]
    count = jnp.sum(selected_B.astype(jnp.int32))
    order_B = jnp.argsort(~selected_B, stable=True)  # the selected rows first, in row order
    real_R = jnp.arange(size) < count
    return jnp.where(real_R, order_B[:size], B), order_B[jnp.where(real_R, jnp.arange(size), 0)]

  def window(self, model, slots: MaskedSlots, rows_R, take_R, width: int):
    """(block logits [R, b, V], the cache unchanged) of the cached step of R rows (fewer than B) gathered over
    their first W slots: each block (with token shift also the slot before it) against the row's stored
    keys/values. The window's own keys/values are written into the call's copy of the cache rows and read by the
    call only (a row's next call, a window over the same block or a refresh, rewrites them first): nothing is
    written back."""
    del rows_R
    logits_R, _ = self._decode_window(model, slots.canvas_BS[take_R, :width],
                                      jax.tree.map(lambda a: a[:, take_R, :width], slots.cache),
                                      self._start(slots)[take_R] - int(model.cfg.token_shift), slots.end_B[take_R])
    return logits_R, slots.cache

  def whole_batch_window(self, model, slots: MaskedSlots, cached_B, width: int):
    """(block logits [B, b, V], cache) of the cached step of more rows than the largest row count below B: every
    row runs (gathering would copy every cache row for little), in place when W = S, else on the first W slots of
    every row. The other rows' windows run at slot 0, their logits to be dropped and their writes (in place: the
    window's slots) rewritten before any query of theirs reads them (a refreshing row's by this step's refresh,
    which runs after this call; an idle row's by its first refresh)."""
    S = slots.canvas_BS.shape[1]
    window_B = jnp.where(cached_B, self._start(slots) - int(model.cfg.token_shift), 0)  # always in range
    end_B = jnp.maximum(slots.end_B, 1)  # a row never used sees slot 0, not nothing
    if width == S:
      return self._decode_window(model, slots.canvas_BS, slots.cache, window_B, end_B)
    logits_B, _ = self._decode_window(model, slots.canvas_BS[:, :width],
                                      jax.tree.map(lambda a: a[:, :, :width], slots.cache), window_B, end_B)
    return logits_B, slots.cache

  def _decode_window(self, model, canvas_RW, cache_R, window_R, end_R):
    """(block logits [R, b, V], cache) of each row's window at `window_R` (the block, with token shift from the
    slot before it) over the row's first `end_R` slots."""
    b, shift = self.cfg.block_length, int(model.cfg.token_shift)
    size, width = canvas_RW.shape
    query_RQ = window_R[:, None] + jnp.arange(b + shift, dtype=jnp.int32)[None, :]
    slots_W = jnp.arange(width, dtype=jnp.int32)
    seen_RW = slots_W[None, :] < end_R[:, None]
    return model.decode(jnp.take_along_axis(canvas_RW, query_RQ, axis=1), query_RQ,
                        jnp.broadcast_to(seen_RW[:, None, :], (size, b + shift, width)), cache_R,
                        jnp.broadcast_to(slots_W, (size, width)), window_R, logits_start=0, logits_length=b)

  def refresh(self, model, slots: MaskedSlots, rows_R, take_R, width: int):
    """(block logits [R, b, V], cache) of the refreshing rows' whole canvases in one call of R rows over W slots on
    a fresh cache: their keys/values written over slots [0, W) of their cache rows (a row's slots from W on lie
    beyond its canvas: no query of its reads them)."""
    size = rows_R.shape[0]
    positions_RW = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (size, width))
    mask = MaskSpec.single_documents("bidirectional", slots.end_B[take_R], width)
    logits_R, cache_R = model.decode(slots.canvas_BS[take_R, :width], positions_RW, mask,
                                     model.init_kv_cache(size, width), positions_RW, 0,
                                     logits_start=self._start(slots)[take_R] - int(model.cfg.token_shift),
                                     logits_length=self.cfg.block_length)
    return logits_R, jax.tree.map(lambda full, part: full.at[:, rows_R, :width].set(part, mode="drop"),
                                  slots.cache, cache_R)

  def _start(self, slots: MaskedSlots):
    """Each row's current block's first slot."""
    return slots.prompt_B + slots.block_B * self.cfg.block_length

  def _advance(self, slots: MaskedSlots, rows_R, take_R, logits_RbV) -> MaskedSlots:
    """One denoising step (of `masked.generate`'s loop) of the rows `take_R` from their block logits, written into
    rows `rows_R` (B: a dummy, written nowhere): the row's key split once, its block's masks committed by the
    acceptance rule, the block or the request ended."""
    cfg, b = self.cfg, self.cfg.block_length
    S = slots.canvas_BS.shape[1]
    canvas_RS, prompt_R, end_R = slots.canvas_BS[take_R], slots.prompt_B[take_R], slots.end_B[take_R]
    block_R, step_R = slots.block_B[take_R], slots.step_B[take_R]
    start_R = prompt_R + block_R * b
    next_rng_R, key_R = split_keys(slots.rng_B[take_R])
    block_Rb = jnp.take_along_axis(canvas_RS, start_R[:, None] + jnp.arange(b)[None, :], axis=1)
    tokens_Rb, commit_Rb = masked_step(logits_RbV.astype(jnp.float32), key_R, block_Rb == self.mask_id,
                                       acceptance=cfg.acceptance, threshold=cfg.threshold,
                                       temperature=cfg.temperature, steps_left=cfg.steps_per_block - step_R,
                                       mask_id=self.mask_id)
    block_Rb = jnp.where(commit_Rb, tokens_Rb, block_Rb)
    canvas_RS = write_window(canvas_RS, block_Rb, start_R)
    block_done_R = ~jnp.any(block_Rb == self.mask_id, axis=-1)
    ended_R = block_done_R & ((block_R + 1) * b >= end_R - prompt_R)
    if self.stop_at_eos:  # a row stops after the block that holds its first EOS
      slots_S = jnp.arange(S)[None, :]
      generated_RS = (slots_S >= prompt_R[:, None]) & (slots_S < (start_R + b)[:, None])
      ended_R = ended_R | (block_done_R & jnp.any((canvas_RS == self.eos_id) & generated_RS, axis=-1))
    put = lambda array, value: put_rows(array, rows_R, value)  # noqa: E731
    next_block_R = block_R + (block_done_R & ~ended_R).astype(jnp.int32)
    return slots._replace(
        canvas_BS=put(slots.canvas_BS, canvas_RS), block_B=put(slots.block_B, next_block_R),
        step_B=put(slots.step_B, jnp.where(block_done_R, 0, step_R + 1)), rng_B=put(slots.rng_B, next_rng_R),
        calls_B=put(slots.calls_B, slots.calls_B[take_R] + 1), active_B=put(slots.active_B, ~ended_R),
        done_B=put(slots.done_B, ended_R))

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

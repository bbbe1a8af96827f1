"""The device side of continuous batching for the multi-canvas sampler (`canvas.py`, masked canvases).

Each of the engine's B slots (rows of one KV cache [B, S]) holds one request at its own place: its prompt at
slots [0, p) (position = slot, as the request has alone), canvas c at slots [p + c*b, p + (c+1)*b), so each row has
its own write index (`write_B`). A row is in one of three phases:
- DENOISE: its canvas is being denoised; the step runs the canvas bidirectionally over the clean slots before it
  (`canvas.canvas_logits`'s mask) and applies one step of the `MaskedRule` (`parts.masked_step`);
- COMMIT: its canvas finished and another follows: the step runs the canvas's causal encoder pass
  (`canvas.encode_with_logits`'s mask), writing its clean keys/values and the logits the next canvas's first token
  reads (token shift);
- IDLE: no request (or a finished one the host has not collected); the row rides along and changes nothing.
One `step` is ONE model call [B, b] whatever the phases: rows get different dense masks and the per-token canvas
flag. Each row advances its random keys exactly as `canvas.generate` does for that row alone (one split per canvas
from the request's key, one per denoising step from the canvas key), so a request's tokens are its lone run's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffgemma_jax.model.transformer import write_window
from diffgemma_jax.sampling.batching import split_keys
from diffgemma_jax.sampling.canvas import CanvasConfig, MaskedRule
from diffgemma_jax.sampling.parts import has_eos, masked_step, pad_after_eos, shifted
from diffgemma_jax.sampling.serving import prefill_row, select_rows

IDLE, DENOISE, COMMIT = 0, 1, 2


class CanvasSlots(NamedTuple):
  cache: Any  # the KV cache [B, S]
  canvas_Bb: jax.Array  # the canvas being denoised (DENOISE) or committed (COMMIT)
  before_B1V: Any  # the clean pass's logits at the slot before the canvas (token-shift models; else None)
  write_B: jax.Array  # the canvas's first slot
  phase_B: jax.Array
  step_B: jax.Array  # denoising steps taken on the canvas
  canvas_index_B: jax.Array
  num_canvases_B: jax.Array  # the request's canvases (its max new tokens / b)
  rng_B: jax.Array  # the request's key, split once per canvas
  step_rng_B: jax.Array  # the canvas's key, split once per denoising step
  out_BG: jax.Array  # the request's new tokens so far (padding after EOS and beyond)
  steps_BC: jax.Array  # denoising steps per canvas
  calls_B: jax.Array  # model calls of the request
  done_B: jax.Array  # the request has finished; the host collects it and frees the slot


class CanvasProgram:
  """The jittable functions of the canvas engine for one `CanvasConfig` (its `num_canvases`: the most any request
  may ask for) and special ids."""

  def __init__(self, cfg: CanvasConfig, *, mask_id: int, eos_id: int | None, pad_id: int = 0):
    if not isinstance(cfg.rule, MaskedRule):
      raise ValueError("continuous batching runs masked canvases (MaskedRule); the entropy-bound rule is not "
                       "supported yet")
    self.cfg, self.mask_id, self.eos_id, self.pad_id = cfg, mask_id, eos_id, pad_id
    self.stop_at_eos = cfg.stop_at_eos and eos_id is not None
    self.unit = cfg.canvas_length  # a request's max new tokens: a multiple of this, at most max_new_tokens
    self.max_new_tokens = cfg.gen_length

  def init(self, model, num_slots: int, num_cache_slots: int) -> CanvasSlots:
    B, b, C = num_slots, self.cfg.canvas_length, self.cfg.num_canvases
    zeros = jnp.zeros((B,), jnp.int32)
    keys = jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32))
    before = jnp.zeros((B, 1, model.cfg.vocab_size), jnp.float32) if model.cfg.token_shift else None
    return CanvasSlots(model.init_kv_cache(B, num_cache_slots), jnp.full((B, b), self.mask_id, jnp.int32), before,
                       zeros, zeros, zeros, zeros, zeros, keys, keys, jnp.full((B, C * b), self.pad_id, jnp.int32),
                       jnp.zeros((B, C), jnp.int32), zeros, jnp.zeros((B,), bool))

  def insert(self, model, slots: CanvasSlots, row, prompt_1W, length, rng, num_canvases) -> CanvasSlots:
    """Starts a request in row `row`: its prompt (right-padded, `length` real tokens) prefilled
    (`serving.prefill_row`), its first canvas all masks; `rng`: the request's key."""
    before, cache = prefill_row(model, slots.cache, row, prompt_1W, length)
    rng, canvas_key = split_keys(rng)
    put = lambda array, value: array.at[row].set(value)  # noqa: E731
    return slots._replace(
        cache=cache, canvas_Bb=put(slots.canvas_Bb, self.mask_id),
        before_B1V=None if slots.before_B1V is None else put(slots.before_B1V, before[0]),
        write_B=put(slots.write_B, length), phase_B=put(slots.phase_B, DENOISE), step_B=put(slots.step_B, 0),
        canvas_index_B=put(slots.canvas_index_B, 0), num_canvases_B=put(slots.num_canvases_B, num_canvases),
        rng_B=put(slots.rng_B, rng), step_rng_B=put(slots.step_rng_B, canvas_key),
        out_BG=put(slots.out_BG, self.pad_id), steps_BC=put(slots.steps_BC, 0), calls_B=put(slots.calls_B, 1),
        done_B=put(slots.done_B, False))

  def step(self, model, slots: CanvasSlots) -> CanvasSlots:
    """One model call advancing every row by one step of its phase (see the module docstring)."""
    rule, b, mask_id = self.cfg.rule, self.cfg.canvas_length, self.mask_id
    canvas_Bb, write_B, phase_B = slots.canvas_Bb, slots.write_B, slots.phase_B
    B = canvas_Bb.shape[0]
    S = jax.tree.leaves(slots.cache)[0].shape[2]
    denoise_B, commit_B = phase_B == DENOISE, phase_B == COMMIT
    slots_S = jnp.arange(S, dtype=jnp.int32)
    query_Bb = write_B[:, None] + jnp.arange(b, dtype=jnp.int32)[None, :]
    causal_BbS = slots_S[None, None, :] <= query_Bb[:, :, None]
    canvas_BbS = jnp.broadcast_to((slots_S[None, :] < (write_B + b)[:, None])[:, None, :], (B, b, S))
    mask_BbS = jnp.where(commit_B[:, None, None], causal_BbS, canvas_BbS)
    logits_BbV, cache = model.decode(canvas_Bb, query_Bb, mask_BbS, slots.cache, jnp.broadcast_to(slots_S, (B, S)),
                                     write_B, canvas_BL=jnp.broadcast_to(~commit_B[:, None], (B, b)))

    # DENOISE rows: one step of the rule.
    next_step_rng, key = split_keys(slots.step_rng_B)
    candidates_Bb = (canvas_Bb == mask_id) & denoise_B[:, None]
    proposal_BbV = shifted(logits_BbV, slots.before_B1V) if model.cfg.token_shift else logits_BbV
    tokens_Bb, accept_Bb = masked_step(proposal_BbV, key, candidates_Bb, acceptance=rule.acceptance,
                                       threshold=rule.threshold, temperature=rule.temperature,
                                       steps_left=rule.steps_per_canvas - slots.step_B, mask_id=mask_id)
    denoised_Bb = jnp.where(accept_Bb, tokens_Bb, canvas_Bb)
    step_B = slots.step_B + denoise_B.astype(jnp.int32)
    finished_B = denoise_B & ((step_B >= rule.steps_per_canvas) | ~jnp.any(denoised_Bb == mask_id, axis=-1))
    committed_Bb = denoised_Bb
    ended_B = finished_B & (slots.canvas_index_B + 1 >= slots.num_canvases_B)
    if self.stop_at_eos:
      committed_Bb = pad_after_eos(denoised_Bb, self.eos_id, self.pad_id)
      ended_B = ended_B | (finished_B & has_eos(committed_Bb, self.eos_id))
    rows_B = jnp.arange(B)
    out_BG = select_rows(finished_B, write_window(slots.out_BG, committed_Bb, slots.canvas_index_B * b), slots.out_BG)
    steps_BC = slots.steps_BC.at[rows_B, slots.canvas_index_B].set(
        jnp.where(finished_B, step_B, slots.steps_BC[rows_B, slots.canvas_index_B]))

    # COMMIT rows: the next canvas starts (the request's key split once, as `canvas.generate` does per canvas).
    next_rng, canvas_key = split_keys(slots.rng_B)
    step_rng_B = select_rows(commit_B, canvas_key, select_rows(denoise_B, next_step_rng, slots.step_rng_B))
    before = slots.before_B1V
    if before is not None:
      before = select_rows(commit_B, logits_BbV[:, b - 1:], before)
    phase_B = jnp.where(finished_B, jnp.where(ended_B, IDLE, COMMIT), jnp.where(commit_B, DENOISE, phase_B))
    canvas_Bb = jnp.where(commit_B[:, None], mask_id, jnp.where(finished_B[:, None], committed_Bb, denoised_Bb))
    return CanvasSlots(
        cache, canvas_Bb, before, write_B + jnp.where(commit_B, b, 0), phase_B, jnp.where(commit_B, 0, step_B),
        slots.canvas_index_B + commit_B.astype(jnp.int32), slots.num_canvases_B, select_rows(commit_B, next_rng,
                                                                                        slots.rng_B),
        step_rng_B, out_BG, steps_BC, slots.calls_B + (denoise_B | commit_B).astype(jnp.int32),
        slots.done_B | ended_B)

  def active(self, slots: CanvasSlots):
    return slots.phase_B != IDLE

  def results(self, slots: CanvasSlots) -> dict[str, Any]:
    """Every row's new tokens (padding after EOS), model calls and denoising steps per canvas."""
    return {"tokens": slots.out_BG, "model_calls": slots.calls_B, "steps": slots.steps_BC}

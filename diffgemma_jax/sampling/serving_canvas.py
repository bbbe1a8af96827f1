"""The device side of continuous batching for the multi-canvas sampler (`canvas.py`), under either rule.

Each of the engine's B slots (rows of one KV cache [B, S]) holds one request at its own place: its prompt at
slots [0, p) (position = slot, as the request has alone), canvas c at slots [p + c*b, p + (c+1)*b), so each row has
its own write index (`write_B`). A row is in one of three phases:
- DENOISE: its canvas is being denoised; the step runs the canvas bidirectionally over the clean slots before it
  (`canvas.canvas_logits`'s mask) and applies one step of the rule: `MaskedRule` (`parts.masked_step`) or
  `EntropyBoundRule` (sample, accept by entropy, renoise the rest, annealed temperature, early stop; with a
  self-conditioned model the step's signal is carried to the row's next step);
- COMMIT: its canvas finished and another follows: the step runs the canvas's causal encoder pass
  (`canvas.encode_with_logits`'s mask), writing its clean keys/values and the logits the next canvas's first token
  reads (token shift);
- IDLE: no request (or a finished one the host has not collected); the row rides along and changes nothing.
One `step` is ONE model call [B, b] whatever the phases: rows get different dense masks and the per-token canvas
flag. Each row advances its random keys exactly as `canvas.generate` does for that row alone (one split per canvas
from the request's key, then the rule's splits of the canvas key: per step, and for the entropy-bound rule once
for the initial noise), so a request's tokens are its lone run's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffgemma_jax.model.self_conditioning import self_conditioning_embeddings
from diffgemma_jax.model.transformer import write_window
from diffgemma_jax.objectives.estimators import states_excluding
from diffgemma_jax.objectives.uniform import noise_token
from diffgemma_jax.sampling.batching import draw, split_keys
from diffgemma_jax.sampling.canvas import CanvasConfig, MaskedRule, entropy_bound_step
from diffgemma_jax.sampling.parts import has_eos, masked_step, pad_after_eos, shifted
from diffgemma_jax.sampling.serving import prefill_rows, put_rows, select_rows

IDLE, DENOISE, COMMIT = 0, 1, 2


class CanvasSlots(NamedTuple):
  cache: Any  # the KV cache [B, S]
  canvas_Bb: jax.Array  # the canvas being denoised (DENOISE) or committed (COMMIT)
  before_B1V: Any  # the clean pass's logits at the slot before the canvas (token-shift models; else None)
  argmax_Bb: Any  # entropy-bound: the previous step's argmax (-1 before the first; else None)
  signal_BbD: Any  # entropy-bound, self-conditioned models: the previous step's signal (zeros before the first)
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
  admission_calls = 1  # an admission prefills its prompts in one model call
  splits_rows = True  # every step is per row (no row reads another's): slots may be split over devices

  def __init__(self, cfg: CanvasConfig, *, mask_id: int, eos_id: int | None, pad_id: int = 0):
    self.cfg, self.mask_id, self.eos_id, self.pad_id = cfg, mask_id, eos_id, pad_id
    self.masked = isinstance(cfg.rule, MaskedRule)
    self.excluded = states_excluding(mask_id)  # entropy-bound: never proposed, never noise
    self.stop_at_eos = cfg.stop_at_eos and eos_id is not None
    self.unit = cfg.canvas_length  # a request's max new tokens: a multiple of this, at most max_new_tokens
    self.max_new_tokens = cfg.gen_length

  def _self_conditioned(self, model) -> bool:
    return not self.masked and getattr(model, "self_conditioning", None) is not None

  def init(self, model, num_slots: int, num_cache_slots: int) -> CanvasSlots:
    if model.cfg.token_shift and not self.masked:
      raise ValueError("model.token_shift models read each prediction one slot back, which uniform-state canvases "
                       "do not: serve such a model with a MaskedRule")
    B, b, C = num_slots, self.cfg.canvas_length, self.cfg.num_canvases
    zeros = jnp.zeros((B,), jnp.int32)
    keys = jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32))
    before = jnp.zeros((B, 1, model.cfg.vocab_size), jnp.float32) if model.cfg.token_shift else None
    argmax = None if self.masked else jnp.full((B, b), -1, jnp.int32)
    signal = jnp.zeros((B, b, model.cfg.embed_dim), jnp.float32) if self._self_conditioned(model) else None
    return CanvasSlots(model.init_kv_cache(B, num_cache_slots), jnp.full((B, b), self.mask_id, jnp.int32), before,
                       argmax, signal, zeros, zeros, zeros, zeros, zeros, keys, keys,
                       jnp.full((B, C * b), self.pad_id, jnp.int32), jnp.zeros((B, C), jnp.int32), zeros,
                       jnp.zeros((B,), bool))

  # ---- the rules ------------------------------------------------------------------------------------------------
  def _start_canvas(self, model, canvas_key_B):
    """(first canvas [B, b], step key [B]) of each row's new canvas from its canvas key, as the rule's loop in
    `canvas.py` starts: all masks; or uniform noise from a first split of the key."""
    B, b = canvas_key_B.shape[0], self.cfg.canvas_length
    if self.masked:
      return jnp.full((B, b), self.mask_id, jnp.int32), canvas_key_B
    step_key_B, init_key_B = split_keys(canvas_key_B)
    return self._noise(model, init_key_B, b), step_key_B

  def _noise(self, model, key_B, b: int):
    sample = lambda k, shape: noise_token(k, shape, vocab_size=model.cfg.vocab_size,  # noqa: E731
                                          excluded_ids=self.excluded)
    return draw(sample, key_B, (key_B.shape[0], b)).astype(jnp.int32)

  def _masked_step(self, model, slots: CanvasSlots, logits_BbV, denoise_B):
    """(next canvas, the canvas if it finished now, finished [B], next step keys, argmax, signal)."""
    rule, mask_id = self.cfg.rule, self.mask_id
    next_step_rng, key = split_keys(slots.step_rng_B)
    candidates_Bb = (slots.canvas_Bb == mask_id) & denoise_B[:, None]
    if model.cfg.token_shift:
      logits_BbV = shifted(logits_BbV, slots.before_B1V)
    tokens_Bb, accept_Bb = masked_step(logits_BbV, key, candidates_Bb, acceptance=rule.acceptance,
                                       threshold=rule.threshold, temperature=rule.temperature,
                                       steps_left=rule.steps_per_canvas - slots.step_B, mask_id=mask_id)
    denoised_Bb = jnp.where(accept_Bb, tokens_Bb, slots.canvas_Bb)
    finished_B = denoise_B & ((slots.step_B + 1 >= rule.steps_per_canvas)
                              | ~jnp.any(denoised_Bb == mask_id, axis=-1))
    return denoised_Bb, denoised_Bb, finished_B, next_step_rng, None, None

  def _entropy_bound_step(self, model, slots: CanvasSlots, logits_BbV, denoise_B):
    rule = self.cfg.rule
    B, b = slots.canvas_Bb.shape
    next_step_rng, sample_key, noise_key = split_keys(slots.step_rng_B, 3)
    renoised_Bb, scaled_BbV, argmax_Bb, stop_B = entropy_bound_step(
        rule, logits_BbV, slots.step_B, slots.argmax_Bb, sample_key, noise_key,
        lambda key: self._noise(model, key, b), self.excluded)
    finished_B = denoise_B & ((slots.step_B + 1 >= rule.max_denoising_steps) | stop_B)
    signal = slots.signal_BbD
    if signal is not None:
      signal = select_rows(denoise_B, self_conditioning_embeddings(model, scaled_BbV, jnp.ones((B,), bool),
                                                                   excluded_ids=self.excluded), signal)
    return renoised_Bb, argmax_Bb, finished_B, next_step_rng, select_rows(denoise_B, argmax_Bb, slots.argmax_Bb), signal

  # ---- the engine's functions -----------------------------------------------------------------------------------
  def insert(self, model, slots: CanvasSlots, rows_A, prompts_AW, lengths_A, rng_A, num_canvases_A) -> CanvasSlots:
    """Starts A requests in rows `rows_A` (out of range: a dummy, written nowhere): their prompts (right-padded,
    `lengths_A` real tokens) prefilled in one call (`serving.prefill_rows`), each first canvas begun from its
    request's key (`rng_A`)."""
    before, cache = prefill_rows(model, slots.cache, rows_A, prompts_AW, lengths_A)
    rng_A, canvas_key_A = split_keys(rng_A)
    canvas_Ab, step_key_A = self._start_canvas(model, canvas_key_A)
    put = lambda array, value: put_rows(array, rows_A, value)  # noqa: E731
    return slots._replace(
        cache=cache, canvas_Bb=put(slots.canvas_Bb, canvas_Ab), before_B1V=put(slots.before_B1V, before),
        argmax_Bb=put(slots.argmax_Bb, -1), signal_BbD=put(slots.signal_BbD, 0.0),
        write_B=put(slots.write_B, lengths_A), phase_B=put(slots.phase_B, DENOISE), step_B=put(slots.step_B, 0),
        canvas_index_B=put(slots.canvas_index_B, 0),
        num_canvases_B=put(slots.num_canvases_B, num_canvases_A), rng_B=put(slots.rng_B, rng_A),
        step_rng_B=put(slots.step_rng_B, step_key_A), out_BG=put(slots.out_BG, self.pad_id),
        steps_BC=put(slots.steps_BC, 0), calls_B=put(slots.calls_B, 1), done_B=put(slots.done_B, False))

  def step(self, model, slots: CanvasSlots) -> CanvasSlots:
    """One model call advancing every row by one step of its phase (see the module docstring)."""
    b = self.cfg.canvas_length
    canvas_Bb, write_B, phase_B = slots.canvas_Bb, slots.write_B, slots.phase_B
    B = canvas_Bb.shape[0]
    S = jax.tree.leaves(slots.cache)[0].shape[2]
    denoise_B, commit_B = phase_B == DENOISE, phase_B == COMMIT
    slots_S = jnp.arange(S, dtype=jnp.int32)
    query_Bb = write_B[:, None] + jnp.arange(b, dtype=jnp.int32)[None, :]
    causal_BbS = slots_S[None, None, :] <= query_Bb[:, :, None]
    canvas_BbS = jnp.broadcast_to((slots_S[None, :] < (write_B + b)[:, None])[:, None, :], (B, b, S))
    mask_BbS = jnp.where(commit_B[:, None, None], causal_BbS, canvas_BbS)
    # A commit row's signal is zero (reset when its canvas finished): adding it changes nothing, as no signal.
    logits_BbV, cache = model.decode(canvas_Bb, query_Bb, mask_BbS, slots.cache, jnp.broadcast_to(slots_S, (B, S)),
                                     write_B, embeddings_BLD=slots.signal_BbD,
                                     canvas_BL=jnp.broadcast_to(~commit_B[:, None], (B, b)))

    # DENOISE rows: one step of the rule.
    rule_step = self._masked_step if self.masked else self._entropy_bound_step
    denoised_Bb, result_Bb, finished_B, next_step_rng, argmax, signal = rule_step(model, slots, logits_BbV,
                                                                                   denoise_B)
    step_B = slots.step_B + denoise_B.astype(jnp.int32)
    ended_B = finished_B & (slots.canvas_index_B + 1 >= slots.num_canvases_B)
    if self.stop_at_eos:
      result_Bb = pad_after_eos(result_Bb, self.eos_id, self.pad_id)
      ended_B = ended_B | (finished_B & has_eos(result_Bb, self.eos_id))
    out_BG = select_rows(finished_B, write_window(slots.out_BG, result_Bb, slots.canvas_index_B * b), slots.out_BG)
    # elementwise (no gather or scatter across rows): each device writes its own slots' counts
    this_canvas_BC = jnp.arange(slots.steps_BC.shape[1]) == slots.canvas_index_B[:, None]
    steps_BC = jnp.where(finished_B[:, None] & this_canvas_BC, step_B[:, None], slots.steps_BC)

    # COMMIT rows: the next canvas starts (the request's key split once, as `canvas.generate` does per canvas).
    next_rng, canvas_key = split_keys(slots.rng_B)
    started_Bb, started_step_rng = self._start_canvas(model, canvas_key)
    step_rng_B = select_rows(commit_B, started_step_rng, select_rows(denoise_B, next_step_rng, slots.step_rng_B))
    before = slots.before_B1V
    if before is not None:
      before = select_rows(commit_B, logits_BbV[:, b - 1:], before)
    if argmax is not None:
      argmax = jnp.where(commit_B[:, None], -1, argmax)
    if signal is not None:
      signal = jnp.where(finished_B[:, None, None], 0.0, signal)
    phase_B = jnp.where(finished_B, jnp.where(ended_B, IDLE, COMMIT), jnp.where(commit_B, DENOISE, phase_B))
    canvas_Bb = jnp.where(commit_B[:, None], started_Bb, jnp.where(finished_B[:, None], result_Bb, denoised_Bb))
    return CanvasSlots(
        cache, canvas_Bb, before, argmax, signal, write_B + jnp.where(commit_B, b, 0), phase_B,
        jnp.where(commit_B, 0, step_B), slots.canvas_index_B + commit_B.astype(jnp.int32), slots.num_canvases_B,
        select_rows(commit_B, next_rng, slots.rng_B), step_rng_B, out_BG, steps_BC,
        slots.calls_B + (denoise_B | commit_B).astype(jnp.int32), slots.done_B | ended_B)

  def max_steps(self, max_new_tokens: int) -> int:
    """The most steps a request of `max_new_tokens` takes: every canvas its rule's most denoising steps, and a
    commit between two canvases."""
    canvases = max_new_tokens // self.cfg.canvas_length
    return canvases * self.cfg.rule.max_steps + canvases - 1

  def step_calls(self, slots: CanvasSlots):
    del slots
    return 1  # every step is one model call

  def active(self, slots: CanvasSlots):
    return slots.phase_B != IDLE

  def results(self, slots: CanvasSlots) -> dict[str, Any]:
    """Every row's new tokens (padding after EOS), model calls and denoising steps per canvas."""
    return {"tokens": slots.out_BG, "model_calls": slots.calls_B, "steps": slots.steps_BC}

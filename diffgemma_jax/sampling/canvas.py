"""Multi-canvas generation for block-diffusion models (DiffusionGemma's layout), masked or uniform-state.

The model was trained with a causal "encoder" pass over the clean tokens and a bidirectional "canvas" pass over one
noised block that sees the clean tokens before it (`objectives/block.py`, `objectives/uniform.py`). Sampling feeds
it the same way, with one KV cache of `prompt + gen_length` slots (slot i holds position i):
1. the prompt is encoded causally into slots [0, P) (one call);
2. canvas c occupies slots [P + c*b, P + (c+1)*b). Each denoising step runs only the canvas, bidirectionally
   within itself and attending to every clean slot before it (its own keys/values are written to its slots each
   step and overwritten by the next);
3. the finished canvas is committed: tokens after the first EOS become padding (rows that ended in an earlier
   canvas get padding throughout), then a causal encoder pass over it writes its clean keys/values into its
   slots, exactly as a causal pass over the whole sequence would have (the last canvas needs no commit);
4. generation ends after `num_canvases` canvases or once every row holds an EOS.
With `model.token_shift` a canvas position's prediction is the canvas output one slot back, and the canvas's first
position's is the clean pass's last logits (the prompt's, or the committed canvas's: the commit pass computes them).
Denoising steps are counted per row and canvas (0 for canvases a row did not run).

Denoising rules (a canvas's inner loop):
- `MaskedRule` (objective `block`): the canvas starts all mask tokens; each step proposes a token per masked
  position and commits the most confident ones, by LLaDA's low-confidence rule on an even schedule over
  `steps_per_canvas` or by Fast-dLLM's threshold rule (the parts of `parts.py`, as the masked samplers use them);
  the canvas ends when no mask is left.
- `EntropyBoundRule` (objective `uniform`, DiffusionGemma's released sampler): the canvas starts as uniform noise.
  Step s (0-based) divides the logits by a temperature annealed linearly from `temperature_start`
  (`parts.linear_temperature`), samples a token per position, accepts the lowest-entropy positions while
  sum(H) - H_k <= `entropy_bound` (at least one) and renoises every other position with a fresh uniform token.
  Accepted tokens are not frozen: every step re-decides the whole canvas from the model's new prediction, as the
  released sampler (transformers' `EntropyBoundSampler`) does. A row stops when its argmax canvas equals the previous step's and its mean entropy is below
  `stop_mean_entropy`, or after `max_denoising_steps`; its canvas is then the argmax of its last step. A model
  with self-conditioning gets, from the second step on, the expected embedding of the previous step's
  temperature-scaled prediction (its first step has none, as in training's first pass). Noise and predictions
  never use the mask token (the uniform objective never produces it; transformers draws noise from the whole
  vocabulary).

Rows stop one by one (EOS) and move from canvas to canvas together: a row done with a canvas waits for the others
without counting steps. A batch of prompts of different lengths is left-padded (`batching.py`, `prompt_starts_B`):
positions are per row and no query attends to padding; `rng` is one key or one per row.
Everything is jitted with static shapes: a `lax.while_loop` over canvases around a `lax.while_loop` over steps.
Only the current step's [batch, canvas, vocab] logits exist; self-conditioning carries a [batch, canvas, embed]
signal between steps, not logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp

from diffgemma_jax.model.self_conditioning import self_conditioning_embeddings
from diffgemma_jax.objectives.estimators import states_excluding, without
from diffgemma_jax.objectives.uniform import noise_token
from diffgemma_jax.sampling.batching import draw, real_slots, slot_mask, slot_positions, split_keys
from diffgemma_jax.sampling.parts import (ACCEPTANCE_RULES, accept_entropy_bound, has_eos, linear_temperature,
                                          masked_step, pad_after_eos, sample_categorical, shifted, stable_and_confident,
                                          token_entropy)


@dataclasses.dataclass(frozen=True)
class MaskedRule:
  """Masked canvases: commit proposals by `acceptance` until no mask is left (at most `steps_per_canvas` steps)."""
  steps_per_canvas: int
  acceptance: str = "threshold"
  threshold: float = 0.9
  temperature: float = 0.0

  def __post_init__(self):
    if self.acceptance not in ACCEPTANCE_RULES:
      raise ValueError(f"acceptance {self.acceptance!r} unknown; valid rules are {ACCEPTANCE_RULES}")
    if self.steps_per_canvas < 1:
      raise ValueError(f"steps_per_canvas={self.steps_per_canvas} must be >= 1")
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"threshold={self.threshold} must lie in (0, 1]")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")

  @property
  def max_steps(self) -> int:
    return self.steps_per_canvas


@dataclasses.dataclass(frozen=True)
class EntropyBoundRule:
  """Uniform-state canvases: DiffusionGemma's entropy-bound acceptance with renoising. The defaults are the released
  sampler's: at most 48 denoising steps per canvas, accept the lowest-entropy positions while the entropy sum minus
  the largest accepted stays <= 0.1, temperature annealed 0.8 -> 0.4, stop when the argmax canvas is stable and
  the mean entropy < 0.005."""
  max_denoising_steps: int = 48
  entropy_bound: float = 0.1
  temperature_start: float = 0.8
  temperature_end: float = 0.4
  stop_mean_entropy: float = 0.005

  def __post_init__(self):
    if self.max_denoising_steps < 1:
      raise ValueError(f"max_denoising_steps={self.max_denoising_steps} must be >= 1")
    if self.entropy_bound <= 0:
      raise ValueError(f"entropy_bound={self.entropy_bound} must be > 0")
    if not 0.0 <= self.temperature_end <= self.temperature_start or self.temperature_start <= 0:
      raise ValueError(f"temperatures must satisfy 0 <= temperature_end <= temperature_start and "
                       f"temperature_start > 0; got {self.temperature_start} -> {self.temperature_end}")
    if self.stop_mean_entropy < 0:
      raise ValueError(f"stop_mean_entropy={self.stop_mean_entropy} must be >= 0")

  @property
  def max_steps(self) -> int:
    return self.max_denoising_steps


# The released DiffusionGemma sampler: 256-token canvases (the model's objective.block_size) and the entropy-bound
# rule's defaults. The recipes import it (configs/diffusiongemma_26b_a4b.py).
RELEASED_CANVAS_LENGTH = 256
RELEASED_SAMPLER = dict(canvas_length=RELEASED_CANVAS_LENGTH, **dataclasses.asdict(EntropyBoundRule()))


@dataclasses.dataclass(frozen=True)
class CanvasConfig:
  canvas_length: int
  num_canvases: int
  rule: Union[MaskedRule, EntropyBoundRule]
  stop_at_eos: bool = True

  def __post_init__(self):
    if self.canvas_length < 1 or self.num_canvases < 1:
      raise ValueError(f"canvas_length={self.canvas_length} and num_canvases={self.num_canvases} must be >= 1")

  @property
  def gen_length(self) -> int:
    return self.canvas_length * self.num_canvases


class CanvasOutput(NamedTuple):
  tokens: jax.Array  # [B, P + gen_length]: the prompt, then the canvases (padding after EOS)
  steps: jax.Array  # [B, num_canvases] int32: denoising steps per canvas (0: not run for that row)
  cache: Any  # the KV cache; slots before the last canvas hold the causal encoder's keys/values


# ---- the model's two passes ------------------------------------------------------------------------------------
def _window(batch_size: int, cache, start, length: int, starts_B):
  """(positions of every slot [B, S], of slots [start, start + length) [B, length], real slots [B, S])."""
  num_slots = jax.tree.leaves(cache)[0].shape[2]
  positions_BS = slot_positions(batch_size, num_slots, starts_B)
  return (positions_BS, jax.lax.dynamic_slice_in_dim(positions_BS, start, length, axis=1),
          real_slots(batch_size, num_slots, starts_B))


def encode_with_logits(model, tokens_BL, cache, start, starts_B=None):
  """The causal encoder pass: clean tokens at slots [start, start + L) attend to every slot up to their own and
  write their keys/values there. Returns (float32 logits [B, 1, V] of the last token, the cache): with
  `model.token_shift` they predict the first token of the canvas that follows. `starts_B`: each row's first
  prompt slot (left padding; None: none)."""
  B, L = tokens_BL.shape
  positions_BS, positions_BL, real_BS = _window(B, cache, start, L, starts_B)
  mask = slot_mask(B, real_BS.shape[1], start, L, starts_B)  # a description: the prompt's pass may be long
  return model.decode(tokens_BL, positions_BL, mask, cache, positions_BS, start, logits_start=L - 1,
                      logits_length=1)


def encode(model, tokens_BL, cache, start, starts_B=None):
  """`encode_with_logits`, the cache only."""
  return encode_with_logits(model, tokens_BL, cache, start, starts_B)[1]


def canvas_logits(model, canvas_Bb, cache, start, *, embeddings_BbD=None, starts_B=None):
  """The canvas pass: the canvas at slots [start, start + b), bidirectional within itself, attending to the clean
  slots before it. Returns (float32 logits [B, b, V], the cache with the canvas's own entries in its slots)."""
  B, b = canvas_Bb.shape
  positions_BS, positions_Bb, real_BS = _window(B, cache, start, b, starts_B)
  mask_BbS = jnp.broadcast_to(((jnp.arange(real_BS.shape[1])[None, :] < start + b) & real_BS)[:, None, :],
                              (B, b, real_BS.shape[1]))
  return model.decode(canvas_Bb, positions_Bb, mask_BbS, cache, positions_BS, start, embeddings_BLD=embeddings_BbD,
                      canvas_BL=jnp.ones((B, b), bool))


# ---- one canvas under each rule: (model, cache, start, done_B, rng) -> (canvas [B, b], steps [B], cache) --------
def denoise_masked(rule: MaskedRule, model, cache, start, done_B, rng, *, canvas_length: int, mask_id: int,
                   before_B1V=None, starts_B=None):
  B, b = done_B.shape[0], canvas_length

  def cond(state):
    canvas, _, _, step, _ = state
    return (step < rule.steps_per_canvas) & jnp.any((canvas == mask_id) & ~done_B[:, None])

  def body(state):
    canvas, cache, rng, step, steps_B = state
    rng, key = split_keys(rng)
    candidates = (canvas == mask_id) & ~done_B[:, None]
    logits, cache = canvas_logits(model, canvas, cache, start, starts_B=starts_B)
    if model.cfg.token_shift:
      logits = shifted(logits, before_B1V)
    tokens, commit = masked_step(logits, key, candidates, acceptance=rule.acceptance, threshold=rule.threshold,
                                 temperature=rule.temperature, steps_left=rule.steps_per_canvas - step,
                                 mask_id=mask_id)
    steps_B = steps_B + jnp.any(candidates, axis=-1).astype(jnp.int32)
    return jnp.where(commit, tokens, canvas), cache, rng, step + 1, steps_B

  canvas = jnp.full((B, b), mask_id, jnp.int32)
  state = (canvas, cache, rng, jnp.int32(0), jnp.zeros((B,), jnp.int32))
  canvas, cache, _, _, steps_B = jax.lax.while_loop(cond, body, state)
  return canvas, steps_B, cache


def entropy_bound_step(rule: EntropyBoundRule, logits_BbV, step, previous_argmax_Bb, sample_key, noise_key,
                       noise, excluded):
  """One step of the entropy-bound rule on a canvas's logits at denoising step `step` (a scalar, or [B] for rows at
  different steps): (the canvas renoised: sampled where a token's entropy is within the bound, `noise(noise_key)`
  elsewhere; the tempered logits; their argmax; [B] whether each row's argmax is stable and confident)."""
  temperature = linear_temperature(step, rule.max_denoising_steps, rule.temperature_start, rule.temperature_end)
  scaled_BbV = without(logits_BbV, excluded) / (temperature[:, None, None] if jnp.ndim(temperature) else temperature)
  entropy_Bb = token_entropy(scaled_BbV)
  argmax_Bb = jnp.argmax(scaled_BbV, axis=-1).astype(jnp.int32)
  sampled_Bb = sample_categorical(sample_key, scaled_BbV)
  renoised_Bb = jnp.where(accept_entropy_bound(entropy_Bb, rule.entropy_bound), sampled_Bb, noise(noise_key))
  stop_B = stable_and_confident(argmax_Bb, previous_argmax_Bb, entropy_Bb, rule.stop_mean_entropy)
  return renoised_Bb, scaled_BbV, argmax_Bb, stop_B


def denoise_entropy_bound(rule: EntropyBoundRule, model, cache, start, done_B, rng, *, canvas_length: int,
                          mask_id: int, before_B1V=None, starts_B=None):
  del before_B1V  # uniform-state models read each position's own output (config validation: no token shift)
  B, b = done_B.shape[0], canvas_length
  V = model.cfg.vocab_size
  self_conditioned = getattr(model, "self_conditioning", None) is not None
  excluded = states_excluding(mask_id)  # the released tokenizer has no mask token (mask_id -1): nothing
  noise = lambda key: draw(lambda k, shape: noise_token(k, shape, vocab_size=V, excluded_ids=excluded), key,
                           (B, b)).astype(jnp.int32)

  def cond(state):
    _, _, _, _, _, step, finished_B, _ = state
    return (step < rule.max_denoising_steps) & ~jnp.all(finished_B)

  def body(state):
    canvas, argmax, signal_BbD, cache, rng, step, finished_B, steps_B = state
    rng, sample_key, noise_key = split_keys(rng, 3)
    logits, cache = canvas_logits(model, canvas, cache, start, embeddings_BbD=signal_BbD, starts_B=starts_B)
    renoised, scaled, new_argmax, stop_B = entropy_bound_step(rule, logits, step, argmax, sample_key, noise_key,
                                                              noise, excluded)
    active_B = ~finished_B
    keep = lambda new, old: jnp.where(active_B.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
    if self_conditioned:
      signal_BbD = keep(self_conditioning_embeddings(model, scaled, jnp.ones((B,), bool), excluded_ids=excluded),
                        signal_BbD)
    return (keep(renoised, canvas), keep(new_argmax, argmax), signal_BbD, cache, rng, step + 1,
            finished_B | stop_B, steps_B + active_B.astype(jnp.int32))

  rng, init_key = split_keys(rng)
  # The first step's argmax can never look stable: the previous argmax starts at -1.
  signal = jnp.zeros((B, b, model.cfg.embed_dim), jnp.float32) if self_conditioned else None
  state = (noise(init_key), jnp.full((B, b), -1, jnp.int32), signal, cache, rng, jnp.int32(0), done_B,
           jnp.zeros((B,), jnp.int32))
  _, argmax, _, cache, _, _, _, steps_B = jax.lax.while_loop(cond, body, state)
  return argmax, steps_B, cache


def denoise_canvas(rule, model, cache, start, done_B, rng, *, canvas_length: int, mask_id: int, before_B1V=None,
                   starts_B=None):
  """One canvas under `rule`; rows marked `done` take no steps (and their canvas is discarded). `before_B1V`: the
  clean pass's logits at the slot before the canvas (read with `model.token_shift`)."""
  fn = denoise_masked if isinstance(rule, MaskedRule) else denoise_entropy_bound
  return fn(rule, model, cache, start, done_B, rng, canvas_length=canvas_length, mask_id=mask_id,
            before_B1V=before_B1V, starts_B=starts_B)


# ---- the canvas loop -------------------------------------------------------------------------------------------
def generate(model, prompt_BP, rng, cfg: CanvasConfig, *, mask_id: int, eos_id: int | None = None,
             pad_id: int = 0, prompt_starts_B=None) -> CanvasOutput:
  """Generates `cfg.num_canvases` canvases after each prompt row; see the module docstring. `prompt_starts_B`:
  each row's first prompt slot of a left-padded batch (None: no padding)."""
  B, P = prompt_BP.shape
  b, C = cfg.canvas_length, cfg.num_canvases
  stop_at_eos = cfg.stop_at_eos and eos_id is not None
  prompt_BP = prompt_BP.astype(jnp.int32)
  if model.cfg.token_shift and not isinstance(cfg.rule, MaskedRule):
    raise ValueError("model.token_shift models (objective masked or block) read each prediction one slot back, "
                     "which uniform-state canvases do not: sample such a model with a MaskedRule")
  # `before`: the clean pass's logits at the last slot before the next canvas (its first token's, token shift).
  before, cache = encode_with_logits(model, prompt_BP, model.init_kv_cache(B, P + cfg.gen_length), 0,
                                     prompt_starts_B)
  tokens = jnp.concatenate([prompt_BP, jnp.full((B, cfg.gen_length), pad_id, jnp.int32)], axis=1)

  def cond(state):
    _, _, _, _, index, finished_B, _ = state
    return (index < C) & ~jnp.all(finished_B)

  def body(state):
    tokens, cache, before, rng, index, finished_B, steps_BC = state
    rng, key = split_keys(rng)
    start = P + index * b
    canvas, steps_B, cache = denoise_canvas(cfg.rule, model, cache, start, finished_B, key, canvas_length=b,
                                            mask_id=mask_id, before_B1V=before, starts_B=prompt_starts_B)
    if stop_at_eos:
      canvas = jnp.where(finished_B[:, None], pad_id, pad_after_eos(canvas, eos_id, pad_id))
      finished_B = finished_B | has_eos(canvas, eos_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, canvas, start, axis=1)
    steps_BC = jax.lax.dynamic_update_slice_in_dim(steps_BC, steps_B[:, None], index, axis=1)
    more = (index + 1 < C) & ~jnp.all(finished_B)
    before, cache = jax.lax.cond(more, lambda bc: encode_with_logits(model, canvas, bc[1], start, prompt_starts_B),
                                 lambda bc: bc, (before, cache))
    return tokens, cache, before, rng, index + 1, finished_B, steps_BC

  state = (tokens, cache, before, rng, jnp.int32(0), jnp.zeros((B,), bool), jnp.zeros((B, C), jnp.int32))
  tokens, cache, _, _, _, _, steps_BC = jax.lax.while_loop(cond, body, state)
  return CanvasOutput(tokens, steps_BC, cache)

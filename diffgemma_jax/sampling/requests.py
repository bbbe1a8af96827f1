"""Text in, text out: validated generation options, a restored model, and per-request speed numbers.

This is the library behind `diffgemma-generate` (the entry point only parses flags). Samplers by name:
  ar                     autoregressive decoding with a KV cache (greedy / temperature / top-p); AR models only
  low_confidence         LLaDA: semi-AR blocks, low-confidence remasking on an even schedule, no cache
  low_confidence_cached  the same with Fast-dLLM's approximate dual KV cache
  threshold              Fast-dLLM: confidence-threshold parallel decoding (>= 1 token per step), dual KV cache
  threshold_nocache      the same without the cache
  block_threshold        block-diffusion models (objective block): canvas after canvas, threshold decoding, each
                         finished canvas committed to the KV cache by a causal encoder pass (`canvas.py`)
  block_low_confidence   the same with low-confidence decoding on an even schedule
  entropy_bound          uniform-state models (objective uniform, DiffusionGemma): canvas after canvas, entropy-bound
                         acceptance with renoising, annealed temperature, stability-and-entropy early stop
Canvas samplers decode in canvases of the training block size (objective.block_size), pad after EOS and report
the denoising steps of every canvas; the entropy-bound defaults are the released model's (RELEASED_SAMPLER).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffgemma_jax.errors import GenerationError
from diffgemma_jax.sampling import autoregressive, batching, canvas, masked
from diffgemma_jax.sampling.parts import truncate_at_eos
from diffgemma_jax.train.dataset import load_tokenizer
from diffgemma_jax.train.reading import check_workdir, restore_model

# name -> (objective of the models it samples, acceptance rule, cache mode); "canvas": the multi-canvas sampler,
# "block": masked.BlockDenoiser (exact cache, fused commits).
SAMPLERS: dict[str, tuple[str, str | None, str | None]] = {
    "ar": ("ar", None, None),
    "low_confidence": ("masked", "low_confidence", "none"),
    "low_confidence_cached": ("masked", "low_confidence", "dual"),
    "threshold": ("masked", "threshold", "dual"),
    "threshold_nocache": ("masked", "threshold", "none"),
    "block_threshold": ("block", "threshold", "canvas"),
    "block_low_confidence": ("block", "low_confidence", "canvas"),
    # the same on `masked.BlockDenoiser`: a finished block is committed inside the next block's first call
    "block_fused": ("block", "threshold", "block"),
    "block_fused_low_confidence": ("block", "low_confidence", "block"),
    "entropy_bound": ("uniform", "entropy_bound", "canvas"),
}
# The entropy-bound options and their defaults: the released DiffusionGemma sampler's (RELEASED_SAMPLER).
ENTROPY_BOUND_DEFAULTS = {field.name: field.default for field in dataclasses.fields(canvas.EntropyBoundRule)}
ENTROPY_BOUND_OPTIONS = tuple(ENTROPY_BOUND_DEFAULTS)


# The sampler options each sampler reads (beyond --gen_length and --seed); the CLI refuses one set for a sampler
# that would ignore it.
_MASKED_FLAGS = ("block_length", "steps", "temperature")
SAMPLER_FLAGS: dict[str, tuple[str, ...]] = {
    "ar": ("temperature", "top_p"),
    "low_confidence": _MASKED_FLAGS,
    "low_confidence_cached": _MASKED_FLAGS,
    "threshold": _MASKED_FLAGS + ("threshold",),
    "threshold_nocache": _MASKED_FLAGS + ("threshold",),
    "block_threshold": _MASKED_FLAGS + ("threshold",),
    "block_low_confidence": _MASKED_FLAGS,
    "block_fused": _MASKED_FLAGS + ("threshold",),
    "block_fused_low_confidence": _MASKED_FLAGS,
    "entropy_bound": ("block_length",) + ENTROPY_BOUND_OPTIONS,
}
# Every sampler option flag, each once: the CLI reads these (None when unset) and check_flags vets them.
SAMPLER_OPTION_FLAGS = tuple(dict.fromkeys(flag for flags in SAMPLER_FLAGS.values() for flag in flags))


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
  sampler: str | None = None  # None: "ar" for AR models, "threshold" for masked diffusion
  gen_length: int = 128
  block_length: int = 32
  steps: int | None = None  # diffusion: total denoising steps over gen_length (None: gen_length)
  threshold: float = 0.9
  temperature: float = 0.0
  top_p: float = 1.0  # AR only
  seed: int = 0
  stop_at_eos: bool = True
  # entropy_bound only; None: the released model's value (ENTROPY_BOUND_DEFAULTS)
  max_denoising_steps: int | None = None  # per canvas, at most
  entropy_bound: float | None = None
  temperature_start: float | None = None
  temperature_end: float | None = None
  stop_mean_entropy: float | None = None  # early stop: argmax stable and mean entropy below this


def default_sampler(objective_name: str) -> str:
  return {"ar": "ar", "block": "block_threshold", "uniform": "entropy_bound"}.get(objective_name, "threshold")


def check_flags(sampler: str | None, objective_name: str, given: dict[str, Any]) -> None:
  """Refuses a sampler option the user set (`given`: flag -> value, None when unset) that `sampler` (None: the
  model's default sampler) does not read, so no setting is silently ignored."""
  sampler = sampler or default_sampler(objective_name)
  if sampler not in SAMPLER_FLAGS:
    return  # validate_options names the valid samplers
  for flag, value in given.items():
    if value is not None and flag not in SAMPLER_FLAGS[sampler]:
      users = [name for name, flags in SAMPLER_FLAGS.items() if flag in flags]
      raise GenerationError(f"--{flag} does not apply to --sampler {sampler} (it reads "
                            f"{', '.join('--' + f for f in SAMPLER_FLAGS[sampler])}); --{flag} is for "
                            f"{', '.join(users)}")


def _validate_entropy_bound(options: GenerationOptions) -> GenerationOptions:
  options = dataclasses.replace(options, **{name: ENTROPY_BOUND_DEFAULTS[name] for name in ENTROPY_BOUND_OPTIONS
                                            if getattr(options, name) is None})
  if options.max_denoising_steps < 1:
    raise GenerationError(f"--max_denoising_steps must be >= 1, got {options.max_denoising_steps}")
  if options.entropy_bound <= 0:
    raise GenerationError(f"--entropy_bound must be > 0 (the entropy the accepted tokens may share), got "
                          f"{options.entropy_bound}")
  if options.temperature_start <= 0:
    raise GenerationError(f"--temperature_start must be > 0, got {options.temperature_start}")
  if not 0 <= options.temperature_end <= options.temperature_start:
    raise GenerationError(f"--temperature_end must lie in [0, --temperature_start={options.temperature_start}], "
                          f"got {options.temperature_end}")
  if options.stop_mean_entropy < 0:
    raise GenerationError(f"--stop_mean_entropy must be >= 0, got {options.stop_mean_entropy}")
  if options.temperature:
    raise GenerationError("--temperature does not apply to the entropy_bound sampler; it anneals from "
                          "--temperature_start to --temperature_end")
  if options.steps is not None:
    raise GenerationError("--steps does not apply to the entropy_bound sampler; use --max_denoising_steps (per "
                          "canvas)")
  return options


def validate_options(options: GenerationOptions, objective_name: str, block_size: int | None = None,
                     context_length: int | None = None) -> GenerationOptions:
  """Fills the defaults for this model and checks every option; raises GenerationError (one line) otherwise.
  `block_size` is objective.block_size of block and uniform models (their canvas length); `context_length` is
  train.seq_len (a canvas may not be longer)."""
  sampler = options.sampler or default_sampler(objective_name)
  if sampler not in SAMPLERS:
    raise GenerationError(f"--sampler {sampler!r} is unknown; valid samplers are {', '.join(SAMPLERS)}")
  wanted, acceptance, cache = SAMPLERS[sampler]
  if wanted != objective_name:
    fitting = [name for name, spec in SAMPLERS.items() if spec[0] == objective_name]
    raise GenerationError(f"--sampler {sampler} needs a model trained with objective {wanted!r}; this config "
                          f"trains {objective_name!r}: use " + (", ".join(fitting) or "another model"))
  if cache in ("canvas", "block") and block_size and options.block_length != block_size:
    if options.block_length != GenerationOptions.block_length:
      raise GenerationError(f"--block_length {options.block_length} differs from the model's training block size "
                            f"objective.block_size={block_size}; use --block_length {block_size}")
    options = dataclasses.replace(options, block_length=block_size)
  if cache in ("canvas", "block") and context_length and options.block_length > context_length:
    raise GenerationError(f"the canvas (--block_length {options.block_length}, objective.block_size) is longer than "
                          f"the model's context of {context_length} tokens (train.seq_len); use a canvas of at "
                          f"most {context_length} tokens")
  if acceptance == "entropy_bound":
    options = _validate_entropy_bound(options)
  else:
    for name in ENTROPY_BOUND_OPTIONS:
      if getattr(options, name) is not None:
        raise GenerationError(f"--{name} applies to the entropy_bound sampler only (uniform-state models), not to "
                              f"--sampler {sampler}")
  if options.gen_length < 1:
    raise GenerationError(f"--gen_length must be >= 1, got {options.gen_length}")
  if not 0.0 < options.threshold <= 1.0:
    raise GenerationError(f"--threshold must lie in (0, 1], got {options.threshold}")
  if options.temperature < 0:
    raise GenerationError(f"--temperature must be >= 0, got {options.temperature}")
  if not 0.0 < options.top_p <= 1.0:
    raise GenerationError(f"--top_p must lie in (0, 1], got {options.top_p}")
  if cache in ("canvas", "block") and (options.block_length < 1 or options.gen_length % options.block_length):
    raise GenerationError(f"--gen_length {options.gen_length} must be a multiple of the model's canvas length "
                          f"{options.block_length} (objective.block_size)")
  if acceptance == "entropy_bound":
    return dataclasses.replace(options, sampler=sampler)
  steps = options.gen_length if options.steps is None else options.steps
  if steps < 1:
    raise GenerationError(f"--steps must be >= 1, got {steps}")
  if sampler != "ar":
    if options.block_length < 1 or options.gen_length % options.block_length:
      raise GenerationError(f"--block_length {options.block_length} must divide --gen_length {options.gen_length}")
    num_blocks = options.gen_length // options.block_length
    if steps % num_blocks or steps > options.gen_length:
      raise GenerationError(f"--steps {steps} must be a multiple of the number of blocks ({num_blocks} = gen_length "
                            f"/ block_length) and at most --gen_length {options.gen_length}")
  return dataclasses.replace(options, sampler=sampler, steps=steps)


def validate_prompt(text: str, prompt_ids: list[int], context_length: int) -> None:
  """The prompt must hold text and fit the context the model was trained on (bos included)."""
  if not text.strip():
    raise GenerationError("the prompt is empty; pass some text with --prompt or one prompt per line in --prompts")
  if len(prompt_ids) > context_length:
    raise GenerationError(f"the prompt is {len(prompt_ids)} tokens (bos included), longer than the model's context "
                          f"of {context_length} tokens (train.seq_len); shorten it")


def sampler_config(options: GenerationOptions):
  """The ARConfig, SamplerConfig or CanvasConfig of validated options."""
  _, acceptance, cache = SAMPLERS[options.sampler]
  if acceptance is None:
    return autoregressive.ARConfig(max_new_tokens=options.gen_length, temperature=options.temperature,
                                   top_p=options.top_p, stop_at_eos=options.stop_at_eos)
  num_blocks = options.gen_length // options.block_length
  if acceptance == "entropy_bound":
    rule = canvas.EntropyBoundRule(**{name: getattr(options, name) for name in ENTROPY_BOUND_OPTIONS})
  elif cache == "canvas":
    rule = canvas.MaskedRule(steps_per_canvas=options.steps // num_blocks, acceptance=acceptance,
                             threshold=options.threshold, temperature=options.temperature)
  if cache == "canvas":
    return canvas.CanvasConfig(canvas_length=options.block_length, num_canvases=num_blocks, rule=rule,
                               stop_at_eos=options.stop_at_eos)
  return masked.SamplerConfig(gen_length=options.gen_length, block_length=options.block_length,
                              steps_per_block=options.steps // num_blocks, acceptance=acceptance,
                              threshold=options.threshold, temperature=options.temperature, cache=cache,
                              stop_at_eos=options.stop_at_eos)


class Generator:
  """A model plus the special ids; compiles one sampler per (batch shape, sampler settings) and times runs."""

  def __init__(self, model, *, mask_id: int, eos_id: int, pad_id: int = 0):
    self.graphdef, self.state = nnx.split(model)
    self.mask_id, self.eos_id, self.pad_id = mask_id, eos_id, pad_id
    self._compiled: dict[Any, Any] = {}

  def _sample_fn(self, cfg):
    """(state, prompt [B, P], rng, starts [B] or None) -> (tokens [B, P + G], model calls [B], steps per canvas
    [B, C] or None); `starts`: each row's first prompt slot of a left-padded batch."""
    graphdef, mask_id, eos_id, pad_id = self.graphdef, self.mask_id, self.eos_id, self.pad_id
    if isinstance(cfg, autoregressive.ARConfig):
      def sample(state, prompt, rng, starts=None):
        return autoregressive.generate(nnx.merge(graphdef, state), prompt, rng, cfg, eos_id=eos_id,
                                       prompt_starts_B=starts) + (None,)
    elif isinstance(cfg, canvas.CanvasConfig):
      def sample(state, prompt, rng, starts=None):
        out = canvas.generate(nnx.merge(graphdef, state), prompt, rng, cfg, mask_id=mask_id, eos_id=eos_id,
                              pad_id=pad_id, prompt_starts_B=starts)
        return out.tokens, canvas_model_calls(out.steps), out.steps
    else:
      def sample(state, prompt, rng, starts=None):
        denoiser = masked.make_denoiser(nnx.merge(graphdef, state), cfg, prompt.shape[1], starts)
        return masked.generate(denoiser, prompt, rng, cfg, mask_id=mask_id, eos_id=eos_id) + (None,)
    return sample

  def compiled(self, cfg, batch_size: int, prompt_length: int, *, row_keys: bool = False, padded: bool = False):
    """The compiled sampler of `cfg` for [batch_size, prompt_length] prompts: fn(state, prompt, rng) with one key,
    or with `row_keys` one key per row; `padded` adds a last argument, each row's first prompt slot."""
    key = (cfg, batch_size, prompt_length, row_keys, padded)
    if key not in self._compiled:
      prompt = jax.ShapeDtypeStruct((batch_size, prompt_length), jnp.int32)
      rng = jax.eval_shape(lambda: batching.row_keys([0] * batch_size) if row_keys else jax.random.key(0))
      extra = (jax.ShapeDtypeStruct((batch_size,), jnp.int32),) if padded else ()
      self._compiled[key] = jax.jit(self._sample_fn(cfg)).lower(self.state, prompt, rng, *extra).compile()
    return self._compiled[key]

  def run(self, prompts, options: GenerationOptions, seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Samples after each prompt (a [B, P] array, or B lists of ids of any lengths: one left-padded batch); per
    row: ids up to EOS, model calls, new tokens, timings, and for canvas samplers the denoising steps of every
    canvas the row ran. Row r draws from `jax.random.key(seeds[r])` alone (default: every row `options.seed`), so
    a request's result does not depend on the batch it ran in."""
    prompt, starts = batching.left_pad([list(map(int, p)) for p in prompts], self.pad_id)
    B, P = prompt.shape
    padded = bool(np.any(starts))
    cfg = sampler_config(options)
    start = time.perf_counter()
    fn = self.compiled(cfg, B, P, row_keys=True, padded=padded)
    compile_seconds = time.perf_counter() - start
    seeds = [options.seed] * B if seeds is None else list(seeds)
    inputs = (jnp.asarray(prompt), batching.row_keys(seeds)) + ((jnp.asarray(starts),) if padded else ())
    inputs = jax.block_until_ready(inputs)  # not part of the timing
    start = time.perf_counter()
    tokens, calls, steps = jax.block_until_ready(fn(self.state, *inputs))
    seconds = time.perf_counter() - start
    tokens, calls = np.asarray(tokens), np.asarray(calls)
    results = []
    for row in range(B):
      ids = truncate_at_eos(tokens[row, P:], self.eos_id)
      results.append({"sampler": options.sampler, "ids": ids, "sequence": tokens[row, starts[row]:].tolist(),
                      "model_calls": int(calls[row]), "new_tokens": len(ids), "seconds": seconds,
                      "tokens_per_s": len(ids) / seconds if seconds > 0 else float("inf"),
                      "compile_seconds": compile_seconds, "batch_size": B,
                      "steps_per_canvas": None if steps is None else canvas_steps(np.asarray(steps)[row])})
    batch_tokens = sum(r["new_tokens"] for r in results)
    for r in results:
      r["batch_tokens_per_s"] = batch_tokens / seconds if seconds > 0 else float("inf")
    return results

  def run_batches(self, prompts: Sequence[Sequence[int]], options: GenerationOptions, batch_size: int,
                  seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """`run` over batches of at most `batch_size` prompts, in the given order's results. Prompts of similar
    lengths share a batch (sorted by length), so little padding is run; the results are what one request at a
    time gives (`run`)."""
    if batch_size < 1:
      raise GenerationError(f"--batch_size must be >= 1, got {batch_size}")
    seeds = [options.seed] * len(prompts) if seeds is None else list(seeds)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict[str, Any]] = [{} for _ in prompts]
    for first in range(0, len(order), batch_size):
      chunk = order[first:first + batch_size]
      for index, result in zip(chunk, self.run([prompts[i] for i in chunk], options, [seeds[i] for i in chunk])):
        results[index] = result
    return results


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any of the `stop` strings."""
  cut = min((at for at in (text.find(s) for s in stop if s) if at >= 0), default=len(text))
  return text[:cut]


def canvas_steps(steps_C) -> list[int]:
  """The denoising steps of the canvases a row ran (every run canvas takes >= 1 step; later ones were skipped)."""
  return [int(s) for s in steps_C if s > 0]


def canvas_model_calls(steps_BC):
  """Model calls of each row of a canvas sampler: the prompt's encoder pass, every denoising step, and one encoder
  pass committing each canvas the row ran but its last."""
  ran_B = jnp.sum(steps_BC > 0, axis=-1)
  return 1 + jnp.sum(steps_BC, axis=-1) + jnp.maximum(ran_B - 1, 0)


def generate_completions(config, workdir: str, prompts: list[str], options: GenerationOptions, *,
                         step: int | None = None, chat_template: str | None = None, batch_size: int = 1,
                         stop: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Completes each prompt (bos + text), `batch_size` requests at a time (`Generator.run_batches`: the same
  results as one at a time); every option and prompt is checked before the model is restored, so bad input fails
  fast. `options.gen_length=None`: as many new tokens as fit in the model's context after the longest prompt (at
  most GenerationOptions.gen_length, whole canvases or blocks). A completion ends before the first of the `stop`
  strings (the harness's `until`)."""
  fill_context, given_steps = options.gen_length is None, options.steps
  if fill_context:  # provisional, a multiple of every sampler's unit (the release's canvas is 256); fitted below
    options = dataclasses.replace(options, gen_length=math.lcm(GenerationOptions.gen_length, options.block_length,
                                                               int(config.objective.block_size)))
  options = validate_options(options, str(config.objective.name), int(config.objective.block_size),
                             int(config.train.seq_len))
  if not prompts:
    raise GenerationError("no prompts given; pass --prompt TEXT or --prompts FILE with one prompt per line")
  if batch_size < 1:
    raise GenerationError(f"--batch_size must be >= 1, got {batch_size}")
  for text in prompts:
    validate_prompt(text, [], 1)
  check_workdir(workdir, reading=True)  # before its tokenizer is looked for there
  tokenizer = load_tokenizer(config, workdir)
  context_length = int(config.train.seq_len)
  from diffgemma_jax.data.sft import encode_text, marker_ids
  markers = marker_ids(tokenizer, chat_template) if chat_template else None  # chat prompts: turn markers as ids
  encoded = []
  for text in prompts:
    ids = [tokenizer.bos_id] + list(encode_text(tokenizer, text, markers))
    validate_prompt(text, ids, context_length)
    encoded.append(ids)
  if fill_context:  # --gen_length not given: as much as fits after the longest prompt, at most the default
    room = context_length - max(len(ids) for ids in encoded)
    unit = 1 if options.sampler == "ar" else options.block_length
    fitted = max(min(GenerationOptions.gen_length, room) // unit, 1) * unit
    options = validate_options(dataclasses.replace(options, gen_length=fitted, steps=given_steps),
                               str(config.objective.name), int(config.objective.block_size), context_length)
  longest = max(len(ids) for ids in encoded) + options.gen_length
  if longest > context_length:
    import sys
    print(f"warning: prompt + --gen_length reach {longest} positions, past the {context_length} the model was "
          f"trained on (train.seq_len); text beyond position {context_length} is off-distribution",
          file=sys.stderr)
  model, step = restore_model(config, workdir, step)
  generator = Generator(model, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  results = generator.run_batches(encoded, options, batch_size)
  for text, ids, result in zip(prompts, encoded, results):
    completion = cut_at_stop(tokenizer.decode_continuation(ids, result["ids"]), stop)
    result.update(prompt=text, completion=completion, prompt_tokens=len(ids), step=step,
                  gen_length=options.gen_length)
  return results

"""What each sampler is and which options it reads: one frozen description per sampler, checked once at import.

A sampler is built from small parts: a runner that drives the model (the AR decoder of `autoregressive.py`, the
masked samplers of `masked.py`, or the multi-canvas sampler of `canvas.py`), an acceptance rule
(`parts.ACCEPTANCE_RULES`, or DiffusionGemma's entropy-bound rule) and a cache mode. Its description (`Sampler`)
names those parts, the objective of the models it samples and the options it reads; each option (`Option`) carries
its type, help and valid range. Every consumer asks these two tables: the CLI's flags and help
(`launch/generate.py`), the lm-eval model's arguments (`harness.py`), which set flags a sampler refuses
(`check_flags`), the values (`validate_options`) and the runner's own config (`sampler_config`).
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any, Callable

from diffgemma_jax.errors import GenerationError
from diffgemma_jax.objectives import OBJECTIVES
from diffgemma_jax.sampling import autoregressive, canvas, masked, serving_masked
from diffgemma_jax.sampling.parts import ACCEPTANCE_RULES

ENTROPY_BOUND = "entropy_bound"  # the acceptance rule of `canvas.EntropyBoundRule`
CANVAS = "canvas"  # the cache mode of the multi-canvas sampler (`canvas.py`): one KV cache, canvases committed


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
  """A generation request's settings; `validate_options` fills the model's defaults and checks them."""
  sampler: str | None = None  # None: the default sampler of the model's objective (`Sampler.default`)
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


# The entropy-bound options and their defaults: the released DiffusionGemma sampler's (canvas.RELEASED_SAMPLER).
ENTROPY_BOUND_DEFAULTS = dataclasses.asdict(canvas.EntropyBoundRule())


@dataclasses.dataclass(frozen=True)
class Option:
  """A sampler option: the flag `--name`, the `GenerationOptions` field `name`. `valid(value, options)` says
  whether a value is in range; `requirement` completes "--name must ..." (formatted with the options' fields)."""
  name: str
  type: type
  help: str
  valid: Callable[[Any, GenerationOptions], bool] = lambda value, options: True
  requirement: str = ""

  def __post_init__(self):
    if self.name not in {field.name for field in dataclasses.fields(GenerationOptions)}:
      raise ValueError(f"sampler option {self.name!r} is no field of GenerationOptions")

  @property
  def default(self):
    """The library's default: GenerationOptions', else the released entropy-bound rule's; None: none fixed."""
    value = {field.name: field.default for field in dataclasses.fields(GenerationOptions)}[self.name]
    return ENTROPY_BOUND_DEFAULTS.get(self.name) if value is None else value

  def check(self, options: GenerationOptions) -> None:
    value = getattr(options, self.name)
    if value is not None and not self.valid(value, options):
      requirement = self.requirement.format(**dataclasses.asdict(options))
      raise GenerationError(f"--{self.name} must {requirement}, got {value}")


OPTIONS: dict[str, Option] = {option.name: option for option in (
    Option("block_length", int, "diffusion: semi-autoregressive block length (default {default}; canvas samplers: "
           "the model's objective.block_size)"),
    Option("steps", int, "diffusion: denoising steps over gen_length (default: gen_length); a multiple of "
           "gen_length / block_length", lambda v, o: v >= 1, "be >= 1"),
    Option("threshold", float, "threshold samplers: commit confidence, in (0, 1] (default {default})",
           lambda v, o: 0.0 < v <= 1.0, "lie in (0, 1]"),
    Option("temperature", float, "0 (the default): greedy", lambda v, o: v >= 0, "be >= 0"),
    Option("top_p", float, "ar: nucleus mass, in (0, 1] (default {default:g})", lambda v, o: 0.0 < v <= 1.0,
           "lie in (0, 1]"),
    Option("max_denoising_steps", int, "at most this many steps per canvas (default {default})",
           lambda v, o: v >= 1, "be >= 1"),
    Option("entropy_bound", float, "accept the lowest-entropy tokens while their entropy sum minus the largest stays "
           "<= this, > 0 (default {default})", lambda v, o: v > 0,
           "be > 0 (the entropy the accepted tokens may share)"),
    Option("temperature_start", float, "temperature of the first step, > 0 (default {default})", lambda v, o: v > 0,
           "be > 0"),
    Option("temperature_end", float, "annealed linearly towards this, in [0, temperature_start] (default "
           "{default})", lambda v, o: 0 <= v <= o.temperature_start, "lie in [0, --temperature_start="
           "{temperature_start}]"),
    Option("stop_mean_entropy", float, "a canvas stops early once its argmax is stable and its mean entropy is "
           "below this (default {default})", lambda v, o: v >= 0, "be >= 0"),
)}
_MASKED_OPTIONS = ("block_length", "steps", "temperature")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """One sampler: its parts, the objective of the models it samples, and the options it reads (beyond
  --gen_length and --seed). `acceptance` and `cache` are None for the AR decoder (its own KV cache)."""
  name: str
  objective: str
  summary: str
  acceptance: str | None
  cache: str | None
  options: tuple[str, ...]
  default: bool = False  # the sampler of its objective's models when none is named

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"sampler {self.name}: objective {self.objective!r} unknown; valid are {tuple(OBJECTIVES)}")
    if self.acceptance not in ACCEPTANCE_RULES + (ENTROPY_BOUND, None):
      raise ValueError(f"sampler {self.name}: acceptance {self.acceptance!r} unknown")
    if self.cache not in masked.CACHE_MODES + (CANVAS, None) or (self.cache is None) != (self.acceptance is None):
      raise ValueError(f"sampler {self.name}: cache {self.cache!r} unknown or without an acceptance rule")
    if self.acceptance == ENTROPY_BOUND and self.cache != CANVAS:
      raise ValueError(f"sampler {self.name}: the entropy-bound rule runs on canvases (cache {CANVAS!r})")
    if self.canvases and not OBJECTIVES[self.objective].capabilities.canvases:
      raise ValueError(f"sampler {self.name} decodes canvases; objective {self.objective!r} trains none")
    unknown = set(self.options) - set(OPTIONS)
    if unknown:
      raise ValueError(f"sampler {self.name}: options {sorted(unknown)} unknown; valid are {tuple(OPTIONS)}")

  @property
  def canvases(self) -> bool:
    """Decodes in canvases of the model's training block size (objective.block_size)."""
    return self.cache in (CANVAS, "block")

  @property
  def serves(self) -> bool:
    """Runs on the continuous-batching engine (`serving.py`): the AR decoder, the multi-canvas samplers and the
    masked samplers of the caches `serving_masked.SERVED_CACHES` (not the exact block cache of `block_fused*`)."""
    return self.acceptance is None or self.cache == CANVAS or self.cache in serving_masked.SERVED_CACHES

  def length_unit(self, options: GenerationOptions) -> int:
    """What --gen_length must be a multiple of: one token for the AR decoder, a block (canvas) otherwise."""
    return 1 if self.acceptance is None else options.block_length


def _samplers(*samplers: Sampler) -> dict[str, Sampler]:
  for objective in OBJECTIVES:
    defaults = [s.name for s in samplers if s.objective == objective and s.default]
    if len(defaults) != 1:
      raise ValueError(f"objective {objective!r} needs exactly one default sampler, has {defaults}")
  return {sampler.name: sampler for sampler in samplers}


SAMPLERS: dict[str, Sampler] = _samplers(
    Sampler("ar", "ar", "autoregressive decoding with a KV cache (greedy / temperature / top-p)", None, None,
            ("temperature", "top_p"), default=True),
    Sampler("low_confidence", "masked", "LLaDA: semi-AR blocks, low-confidence remasking on an even schedule, no "
            "cache", "low_confidence", "none", _MASKED_OPTIONS),
    Sampler("low_confidence_cached", "masked", "the same with Fast-dLLM's approximate dual KV cache",
            "low_confidence", "dual", _MASKED_OPTIONS),
    Sampler("threshold", "masked", "Fast-dLLM: confidence-threshold parallel decoding (>= 1 token per step), dual "
            "KV cache", "threshold", "dual", _MASKED_OPTIONS + ("threshold",), default=True),
    Sampler("threshold_nocache", "masked", "the same without the cache", "threshold", "none",
            _MASKED_OPTIONS + ("threshold",)),
    Sampler("block_threshold", "block", "canvas after canvas, threshold decoding, each finished canvas committed "
            "to the KV cache by a causal encoder pass (canvas.py)", "threshold", CANVAS,
            _MASKED_OPTIONS + ("threshold",), default=True),
    Sampler("block_low_confidence", "block", "the same with low-confidence decoding on an even schedule",
            "low_confidence", CANVAS, _MASKED_OPTIONS),
    Sampler("block_fused", "block", "threshold decoding with an exact cache; a finished block is committed inside "
            "the next block's first call (masked.BlockDenoiser)", "threshold", "block",
            _MASKED_OPTIONS + ("threshold",)),
    Sampler("block_fused_low_confidence", "block", "the same with low-confidence decoding", "low_confidence",
            "block", _MASKED_OPTIONS),
    Sampler(ENTROPY_BOUND, "uniform", "DiffusionGemma's released sampler: canvas after canvas, entropy-bound "
            "acceptance with renoising, annealed temperature, stability-and-entropy early stop", ENTROPY_BOUND,
            CANVAS, ("block_length",) + tuple(ENTROPY_BOUND_DEFAULTS), default=True),
)


def default_sampler(objective_name: str) -> str:
  """The sampler of `objective_name`'s models when none is named."""
  for sampler in SAMPLERS.values():
    if sampler.objective == objective_name and sampler.default:
      return sampler.name
  raise GenerationError(f"objective {objective_name!r} has no sampler; valid objectives are {tuple(OBJECTIVES)}")


def readers(option: str) -> list[str]:
  """The samplers that read `option`."""
  return [name for name, sampler in SAMPLERS.items() if option in sampler.options]


def check_flags(sampler: str | None, objective_name: str, given: dict[str, Any]) -> None:
  """Refuses a sampler option the user set (`given`: flag -> value, None when unset) that `sampler` (None: the
  model's default sampler) does not read, so no setting is silently ignored."""
  sampler = sampler or default_sampler(objective_name)
  if sampler not in SAMPLERS:
    return  # validate_options names the valid samplers
  reads = SAMPLERS[sampler].options
  for flag, value in given.items():
    if value is not None and flag not in reads:
      raise GenerationError(f"--{flag} does not apply to --sampler {sampler} (it reads "
                            f"{', '.join('--' + f for f in reads)}); --{flag} is for {', '.join(readers(flag))}")


def requested_options(sampler: str | None, objective_name: str, given: dict[str, Any], **fields) -> GenerationOptions:
  """The options of a request whose sampler options came as flags or arguments (`given`: name -> value, None when
  unset): one the sampler would ignore is refused (`check_flags`); `validate_options` checks the values."""
  check_flags(sampler, objective_name, given)
  return GenerationOptions(sampler=sampler, **fields, **{name: value for name, value in given.items()
                                                         if value is not None})


def _fill_entropy_bound(options: GenerationOptions) -> GenerationOptions:
  options = dataclasses.replace(options, **{name: value for name, value in ENTROPY_BOUND_DEFAULTS.items()
                                            if getattr(options, name) is None})
  for name in ENTROPY_BOUND_DEFAULTS:
    OPTIONS[name].check(options)
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
  name = options.sampler or default_sampler(objective_name)
  if name not in SAMPLERS:
    raise GenerationError(f"--sampler {name!r} is unknown; valid samplers are {', '.join(SAMPLERS)}")
  sampler = SAMPLERS[name]
  if sampler.objective != objective_name:
    fitting = [s.name for s in SAMPLERS.values() if s.objective == objective_name]
    raise GenerationError(f"--sampler {name} needs a model trained with objective {sampler.objective!r}; this "
                          f"config trains {objective_name!r}: use " + (", ".join(fitting) or "another model"))
  if sampler.canvases and block_size and options.block_length != block_size:
    if options.block_length != GenerationOptions.block_length:
      raise GenerationError(f"--block_length {options.block_length} differs from the model's training block size "
                            f"objective.block_size={block_size}; use --block_length {block_size}")
    options = dataclasses.replace(options, block_length=block_size)
  if sampler.canvases and context_length and options.block_length > context_length:
    raise GenerationError(f"the canvas (--block_length {options.block_length}, objective.block_size) is longer than "
                          f"the model's context of {context_length} tokens (train.seq_len); use a canvas of at "
                          f"most {context_length} tokens")
  if sampler.acceptance == ENTROPY_BOUND:
    options = _fill_entropy_bound(options)
  else:
    for option in ENTROPY_BOUND_DEFAULTS:
      if getattr(options, option) is not None:
        raise GenerationError(f"--{option} applies to the entropy_bound sampler only (uniform-state models), not "
                              f"to --sampler {name}")
  if options.block_length < 1:
    raise GenerationError(f"--block_length must be >= 1, got {options.block_length}")
  if options.gen_length < 1:
    raise GenerationError(f"--gen_length must be >= 1, got {options.gen_length}")
  for option in ("threshold", "temperature", "top_p"):
    OPTIONS[option].check(options)
  if sampler.canvases and options.gen_length % options.block_length:
    raise GenerationError(f"--gen_length {options.gen_length} must be a multiple of the model's canvas length "
                          f"{options.block_length} (objective.block_size)")
  if sampler.acceptance == ENTROPY_BOUND:
    return dataclasses.replace(options, sampler=name)
  options = dataclasses.replace(options, sampler=name,
                                steps=options.gen_length if options.steps is None else options.steps)
  OPTIONS["steps"].check(options)
  if sampler.acceptance is not None:
    if options.gen_length % options.block_length:
      raise GenerationError(f"--block_length {options.block_length} must divide --gen_length {options.gen_length}")
    num_blocks = options.gen_length // options.block_length
    if options.steps % num_blocks or options.steps > options.gen_length:
      raise GenerationError(f"--steps {options.steps} must be a multiple of the number of blocks ({num_blocks} = "
                            f"gen_length / block_length) and at most --gen_length {options.gen_length}")
  return options


def sampler_config(options: GenerationOptions):
  """The runner's config of validated options: autoregressive.ARConfig, canvas.CanvasConfig or
  masked.SamplerConfig."""
  sampler = SAMPLERS[options.sampler]
  if sampler.acceptance is None:
    return autoregressive.ARConfig(max_new_tokens=options.gen_length, temperature=options.temperature,
                                   top_p=options.top_p, stop_at_eos=options.stop_at_eos)
  num_blocks = options.gen_length // options.block_length
  if sampler.cache == CANVAS:
    if sampler.acceptance == ENTROPY_BOUND:
      rule = canvas.EntropyBoundRule(**{name: getattr(options, name) for name in ENTROPY_BOUND_DEFAULTS})
    else:
      rule = canvas.MaskedRule(steps_per_canvas=options.steps // num_blocks, acceptance=sampler.acceptance,
                               threshold=options.threshold, temperature=options.temperature)
    return canvas.CanvasConfig(canvas_length=options.block_length, num_canvases=num_blocks, rule=rule,
                               stop_at_eos=options.stop_at_eos)
  return masked.SamplerConfig(gen_length=options.gen_length, block_length=options.block_length,
                              steps_per_block=options.steps // num_blocks, acceptance=sampler.acceptance,
                              threshold=options.threshold, temperature=options.temperature, cache=sampler.cache,
                              stop_at_eos=options.stop_at_eos)


def add_flags(parser) -> None:
  """The sampler flags of an argparse parser, from the tables: --sampler, then every option (default None: unset,
  so `check_flags` can refuse one the sampler would ignore); an option only one sampler reads goes in its group."""
  defaults = ", ".join(f"{s.name} for {s.objective}" for s in SAMPLERS.values() if s.default)
  parser.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)} (default: {defaults} models); "
                      "see the sampler groups below")
  groups: dict[str, Any] = {}
  for option in OPTIONS.values():
    users = readers(option.name)
    target = parser
    if len(users) == 1:
      sampler = SAMPLERS[users[0]]
      if sampler.name not in groups:
        groups[sampler.name] = parser.add_argument_group(f"{sampler.name} sampler ({sampler.objective} models)")
      target = groups[sampler.name]
    help_text = option.help.format(default=option.default)
    if len(users) > 1:
      help_text += f"; read by {', '.join(users)}"
    target.add_argument(f"--{option.name}", type=option.type, default=None, help=help_text)


def describe() -> str:
  """One line per sampler: name, the objective of its models, its summary (for docs and --help)."""
  width = max(map(len, SAMPLERS)) + 2
  return "\n".join(textwrap.fill(f"{s.objective}{' (default)' if s.default else ''}: {s.summary}", 118,
                                  initial_indent=f"  {s.name:<{width}}", subsequent_indent=" " * (width + 2))
                    for s in SAMPLERS.values())

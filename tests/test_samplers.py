"""The sampler descriptions (`sampling/samplers.py`): the tables are consistent, each sampler's options are checked
once with errors that name the flag, set flags a sampler would ignore are refused, defaults come from the model's
objective and the released sampler, and the CLI's flags and help are generated from the tables."""

import argparse

import pytest

from diffgemma_jax.errors import GenerationError
from diffgemma_jax.objectives import OBJECTIVES
from diffgemma_jax.sampling import autoregressive, canvas, masked
from diffgemma_jax.sampling.samplers import (OPTIONS, SAMPLERS, GenerationOptions, Sampler, add_flags, check_flags,
                                             requested_options, sampler_config, validate_options)


@pytest.mark.parametrize("options,objective,message", [
    (dict(sampler="beam"), "masked", "--sampler 'beam' is unknown"),
    (dict(threshold=0.0), "masked", "--threshold must lie in"),
    (dict(threshold=1.5), "masked", "--threshold must lie in"),
    (dict(steps=0), "masked", "--steps must be >= 1"),
    (dict(steps=6, gen_length=64, block_length=16), "masked", "multiple of the number of blocks"),
    (dict(gen_length=30, block_length=8), "masked", "must divide --gen_length"),
    (dict(block_length=0), "masked", "--block_length must be >= 1, got 0"),
    (dict(block_length=-4), "ar", "--block_length must be >= 1, got -4"),
    (dict(top_p=0.0), "ar", "--top_p"),
    (dict(sampler="ar"), "masked", "needs a model trained with objective 'ar'"),
    (dict(sampler="threshold"), "ar", "use ar"),
    (dict(sampler="threshold"), "block", "use block_threshold, block_low_confidence"),
    (dict(sampler="block_threshold", block_length=8), "block", "differs from the model's training block size"),
    (dict(sampler="block_fused", block_length=8), "block", "differs from the model's training block size"),
    (dict(sampler="block_fused", gen_length=20), "block", "multiple of the model's canvas length 16"),
])
def test_bad_options_fail_with_one_line(options, objective, message):
  with pytest.raises(GenerationError, match=message.replace("(", r"\(")) as info:
    validate_options(GenerationOptions(**options), objective, block_size=16)
  assert "\n" not in str(info.value)


def test_default_samplers_and_steps():
  assert validate_options(GenerationOptions(), "ar").sampler == "ar"
  options = validate_options(GenerationOptions(gen_length=64), "masked")
  assert (options.sampler, options.steps) == ("threshold", 64)
  options = validate_options(GenerationOptions(gen_length=64), "block", block_size=16)
  assert (options.sampler, options.block_length) == ("block_threshold", 16)
  options = validate_options(GenerationOptions(gen_length=64), "uniform", block_size=32)
  assert (options.sampler, options.block_length, options.max_denoising_steps) == ("entropy_bound", 32, 48)
  assert (options.entropy_bound, options.temperature_start, options.temperature_end) == (0.1, 0.8, 0.4)



@pytest.mark.parametrize("sampler,objective,flag,value", [
    (None, "block", "top_p", 0.5), ("ar", "ar", "steps", 3), ("ar", "ar", "block_length", 8),
    ("ar", "ar", "threshold", 0.3), ("low_confidence", "masked", "threshold", 0.3),
    ("block_low_confidence", "block", "threshold", 0.3), (None, "uniform", "threshold", 0.5)])
def test_a_flag_the_sampler_ignores_is_refused(sampler, objective, flag, value):
  with pytest.raises(GenerationError, match=rf"--{flag} does not apply to --sampler") as info:
    check_flags(sampler, objective, {flag: value})
  assert "\n" not in str(info.value)
  check_flags(sampler, objective, {flag: None})  # unset: fine
  check_flags("threshold", "masked", {"threshold": 0.3, "steps": 16, "temperature": 1.0, "block_length": 8})



@pytest.mark.parametrize("options,objective,message", [
    (dict(entropy_bound=0.0), "uniform", "--entropy_bound must be > 0"),
    (dict(entropy_bound=-1.0), "uniform", "--entropy_bound must be > 0"),
    (dict(max_denoising_steps=0), "uniform", "--max_denoising_steps must be >= 1"),
    (dict(temperature_start=0.0), "uniform", "--temperature_start must be > 0"),
    (dict(temperature_end=0.9), "uniform", "--temperature_end must lie in [0, --temperature_start=0.8]"),
    (dict(temperature_end=-0.1), "uniform", "--temperature_end must lie in"),
    (dict(stop_mean_entropy=-1.0), "uniform", "--stop_mean_entropy must be >= 0"),
    (dict(temperature=1.0), "uniform", "--temperature does not apply to the entropy_bound sampler"),
    (dict(steps=8), "uniform", "--steps does not apply to the entropy_bound sampler"),
    (dict(sampler="threshold"), "uniform", "use entropy_bound"),
    (dict(sampler="entropy_bound"), "block", "use block_threshold, block_low_confidence"),
    (dict(entropy_bound=0.2), "block", "--entropy_bound applies to the entropy_bound sampler only"),
    (dict(block_length=8), "uniform", "differs from the model's training block size"),
])
def test_bad_options_name_the_flag(options, objective, message):
  with pytest.raises(GenerationError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
    validate_options(GenerationOptions(**options), objective, block_size=32, context_length=128)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("objective", ["uniform", "block"])
def test_a_canvas_longer_than_the_context_fails(objective):
  with pytest.raises(GenerationError, match=r"the canvas \(--block_length 256, objective.block_size\) is longer "
                                            r"than the model's context of 128 tokens \(train.seq_len\)"):
    validate_options(GenerationOptions(gen_length=256), objective, block_size=256, context_length=128)


def test_every_objective_has_one_default_and_descriptions_are_checked():
  for objective in OBJECTIVES:
    assert sum(s.default for s in SAMPLERS.values() if s.objective == objective) == 1
  with pytest.raises(ValueError, match="options \\['beam'\\] unknown"):
    Sampler("x", "masked", "", "threshold", "dual", ("beam",))
  with pytest.raises(ValueError, match="cache 'kv' unknown"):
    Sampler("x", "masked", "", "threshold", "kv", ())
  with pytest.raises(ValueError, match="decodes canvases; objective 'masked' trains none"):
    Sampler("x", "masked", "", "threshold", "canvas", ())
  with pytest.raises(ValueError, match="runs on canvases"):
    Sampler("x", "uniform", "", "entropy_bound", "dual", ())


@pytest.mark.parametrize("sampler,runner", [("ar", autoregressive.ARConfig), ("threshold", masked.SamplerConfig),
                                            ("block_fused", masked.SamplerConfig),
                                            ("block_low_confidence", canvas.CanvasConfig),
                                            ("entropy_bound", canvas.CanvasConfig)])
def test_sampler_config_follows_the_parts(sampler, runner):
  spec = SAMPLERS[sampler]
  options = validate_options(GenerationOptions(sampler=sampler, gen_length=32, block_length=16), spec.objective,
                             block_size=16)
  cfg = sampler_config(options)
  assert isinstance(cfg, runner)
  assert spec.length_unit(options) == (1 if sampler == "ar" else 16)
  if runner is masked.SamplerConfig:
    assert (cfg.acceptance, cfg.cache, cfg.steps_per_block) == (spec.acceptance, spec.cache, 16)
  if runner is canvas.CanvasConfig:
    assert (cfg.canvas_length, cfg.num_canvases) == (16, 2)
    rule = canvas.EntropyBoundRule() if sampler == "entropy_bound" else canvas.MaskedRule(
        steps_per_canvas=16, acceptance="low_confidence")
    assert cfg.rule == rule


def test_cli_flags_and_help_come_from_the_tables():
  parser = argparse.ArgumentParser()
  add_flags(parser)
  args = parser.parse_args(["--sampler", "ar", "--top_p", "0.5", "--entropy_bound", "0.2"])
  assert (args.sampler, args.top_p, args.entropy_bound, args.threshold) == ("ar", 0.5, 0.2, None)
  assert {action.dest for action in parser._actions} >= set(OPTIONS) | {"sampler"}
  text = " ".join(parser.format_help().split())
  assert "entropy_bound sampler (uniform models)" in text and "(default 48)" in text
  assert "in (0, 1] (default 0.9); read by threshold, threshold_nocache, block_threshold, block_fused" in text
  for name in SAMPLERS:
    assert name in text


def test_requested_options_keep_what_was_set_and_refuse_what_is_ignored():
  given = dict.fromkeys(OPTIONS) | {"threshold": 0.5, "steps": 8}
  options = requested_options("threshold", "masked", given, gen_length=16, seed=3)
  assert options == GenerationOptions(sampler="threshold", gen_length=16, seed=3, threshold=0.5, steps=8)
  assert requested_options(None, "uniform", {"entropy_bound": None}) == GenerationOptions()
  with pytest.raises(GenerationError, match="--steps does not apply to --sampler entropy_bound"):
    requested_options(None, "uniform", given)

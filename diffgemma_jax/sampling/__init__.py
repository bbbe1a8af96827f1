"""Samplers (reverse processes) for diffusion language models, the autoregressive decoder, and sample quality."""

from diffgemma_jax.sampling import autoregressive, canvas, serving
from diffgemma_jax.sampling.autoregressive import ARConfig
from diffgemma_jax.sampling.canvas import RELEASED_SAMPLER, CanvasConfig, CanvasOutput, EntropyBoundRule, MaskedRule
from diffgemma_jax.sampling.masked import (CACHE_MODES, BlockDenoiser, LogitsFnDenoiser, ModelDenoiser, SamplerConfig,
                                           generate, make_denoiser)
from diffgemma_jax.sampling.parts import (ACCEPTANCE_RULES, accept_entropy_bound, accept_low_confidence,
                                          accept_threshold, even_schedule, linear_temperature, pad_after_eos, propose,
                                          sample_next, stable_and_confident, token_entropy, top_p_filter,
                                          truncate_at_eos)
from diffgemma_jax.sampling.serving import Engine, Request
from diffgemma_jax.sampling.serving_ar import ARProgram
from diffgemma_jax.sampling.serving_canvas import CanvasProgram
from diffgemma_jax.sampling.serving_masked import MaskedProgram
from diffgemma_jax.sampling.samplers import (OPTIONS, SAMPLERS, GenerationOptions, Option, Sampler, default_sampler,
                                             sampler_config, validate_options)

__all__ = ["ACCEPTANCE_RULES", "ARConfig", "ARProgram", "BlockDenoiser", "CACHE_MODES", "CanvasConfig",
           "CanvasOutput", "CanvasProgram", "Engine", "EntropyBoundRule", "GenerationOptions", "LogitsFnDenoiser",
           "MaskedProgram", "MaskedRule", "ModelDenoiser", "OPTIONS", "Option", "RELEASED_SAMPLER", "Request",
           "SAMPLERS", "Sampler", "SamplerConfig", "accept_entropy_bound", "accept_low_confidence",
           "accept_threshold", "autoregressive", "canvas", "default_sampler", "even_schedule", "generate",
           "linear_temperature", "make_denoiser", "pad_after_eos", "propose", "sample_next", "sampler_config",
           "serving", "stable_and_confident", "token_entropy", "top_p_filter", "truncate_at_eos", "validate_options"]

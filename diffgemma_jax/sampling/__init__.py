"""Samplers (reverse processes) for diffusion language models, the autoregressive decoder, and sample quality."""

from diffgemma_jax.sampling import autoregressive
from diffgemma_jax.sampling.autoregressive import ARConfig
from diffgemma_jax.sampling.masked import (CACHE_MODES, BlockDenoiser, LogitsFnDenoiser, ModelDenoiser, SamplerConfig,
                                           generate, make_denoiser)
from diffgemma_jax.sampling.parts import (ACCEPTANCE_RULES, accept_low_confidence, accept_threshold, even_schedule,
                                          propose, sample_next, top_p_filter, truncate_at_eos)

__all__ = ["ACCEPTANCE_RULES", "ARConfig", "BlockDenoiser", "CACHE_MODES", "LogitsFnDenoiser", "ModelDenoiser",
           "SamplerConfig", "accept_low_confidence", "accept_threshold", "autoregressive", "even_schedule", "generate",
           "make_denoiser", "propose", "sample_next", "top_p_filter", "truncate_at_eos"]

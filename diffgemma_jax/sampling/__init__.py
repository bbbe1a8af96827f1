"""Samplers (reverse processes) for diffusion language models."""

from diffgemma_jax.sampling.masked import (ACCEPTANCE_RULES, SamplerConfig, accept_low_confidence, accept_threshold,
                                           even_schedule, generate, propose, truncate_at_eos)

__all__ = ["ACCEPTANCE_RULES", "SamplerConfig", "accept_low_confidence", "accept_threshold", "even_schedule",
           "generate", "propose", "truncate_at_eos"]

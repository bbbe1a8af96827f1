"""The autoregressive twin of pretrain_tiny: the same backbone, data, tokens and schedule with a causal mask and
next-token loss, so its exact held-out perplexity and its generation speed compare directly with the diffusion
model's bound and samplers."""

from diffgemma_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "pretrain_tiny")
  c.objective.name = "ar"
  return c

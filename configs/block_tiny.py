"""Tiny masked block diffusion (BD3-LM layout, blocks of 16) on the CPython standard library: pretrain_tiny with the
block objective, so its held-out bound compares directly with plain masked diffusion and the AR baseline."""

from diffgemma_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "pretrain_tiny")
  c.objective.name = "block"
  c.objective.block_size = 16
  return c

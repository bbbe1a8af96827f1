"""The 1B GPU config with the block objective (BD3-LM / DiffusionGemma layout): each step runs the shared stack over
[canvas ; clean], 2 x train.seq_len tokens, canvases of 64 tokens."""

from diffgemma_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "pretrain_gpu_1b")
  c.objective.name = "block"
  c.objective.block_size = 64
  return c

"""block_tiny adapted from its autoregressive twin (Dream / Fast-dLLM v2's recipe at tiny scale): the AR run's
weights, token shift (each prediction read one slot back, so a block's first token starts as the AR model's next-
token prediction), then block-diffusion training. Train the AR twin first:

  diffgemma-train --config configs/ar_tiny.py --workdir runs/ar_tiny
  diffgemma-train --config configs/block_from_ar_tiny.py --workdir runs/block_from_ar_tiny

As committed both runs take 800 steps (minutes on a CPU). BENCHMARKS.md's numbers (1.35-1.48x AR's gen-PPL) come
from a 4000-step AR run adapted for 3000 steps (--config.train.num_steps on each).
"""

from diffgemma_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "block_tiny")
  c.model.token_shift = True
  c.init.checkpoint = "runs/ar_tiny/checkpoints"
  return c

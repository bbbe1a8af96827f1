"""`ar_code_100m` adapted to block diffusion (blocks of 16) with token shift, the recipe that holds the quality bar
on CPU (BENCHMARKS.md): the diffusion half of the GPU speed experiment (`bench/gpu_pair.sh`). The block objective
runs [canvas ; clean] (twice the row), so the attention logits are rematerialised (`remat=dots` saves only the
weight matmuls) to keep the step's memory near the AR one's.

  diffgemma-train --config configs/ar_code_100m.py --workdir runs/ar_code_100m
  diffgemma-train --config configs/block_from_ar_code_100m.py --workdir runs/block_code_100m
"""

from diffgemma_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "ar_code_100m")
  c.objective.name = "block"
  c.objective.block_size = 16
  c.model.token_shift = True
  c.model.remat = "dots"
  c.init.checkpoint = "runs/ar_code_100m/checkpoints"
  c.train.learning_rate = 1e-3  # adaptation, from trained weights
  c.train.warmup_steps = 50
  return c

"""The DiffusionGemma 26B-A4B reference architecture (public config values; docs/model.md) and its recipe.

25.2B parameters in total, 3.8B active per token. Build it with `diffgemma-inspect` (under jax.eval_shape).
Recipe of the released model: uniform-state block diffusion on 256-token canvases with self-conditioning; samples
with the entropy-bound rule (`RELEASED_SAMPLER`, the multi-canvas sampler's settings, defined in the library's
`diffgemma_jax/sampling/canvas.py`).
"""

from diffgemma_jax.config import base_config
from diffgemma_jax.sampling.canvas import RELEASED_SAMPLER


def get_config():
  c = base_config()
  c.model.update(
      vocab_size=262_144,
      embed_dim=2816,
      num_layers=30,
      layer_pattern=("sliding",) * 5 + ("global",),
      num_heads=16,
      head_dim=256,
      num_kv_heads=8,
      sliding_window=1024,
      rope_base=10_000.0,
      rope_fraction=1.0,
      global_head_dim=512,
      global_num_kv_heads=2,
      global_k_eq_v=True,
      global_rope_base=1_000_000.0,
      global_rope_fraction=0.25,
      mlp_dim=2112,
      num_experts=128,
      top_k=8,
      expert_dim=704,
      logit_softcap=30.0,
      norm_eps=1e-6,
      compute_dtype="bfloat16",
      remat="dots",
      scan_layers=True,
      self_conditioning=True,
      canvas_input_norm=True,  # the release normalises the canvas pass's input embeddings (parameter-free)
  )
  c.objective.name = "uniform"
  c.objective.block_size = RELEASED_SAMPLER["canvas_length"]
  c.objective.encoder_loss_weight = 1.0
  c.objective.self_cond_prob = 0.5
  c.train.seq_len = 4096
  c.train.batch_size = 8
  return c

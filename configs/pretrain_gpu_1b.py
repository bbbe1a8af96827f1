"""About 1B total parameters (MoE, ~0.25B active), sized for one 80 GB GPU in bfloat16 compute."""

from diffgemma_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update(
      vocab_size=32768,
      embed_dim=1024,
      num_layers=16,
      layer_pattern=("sliding", "sliding", "sliding", "global"),
      num_heads=8,
      head_dim=128,
      num_kv_heads=4,
      sliding_window=512,
      rope_base=10_000.0,
      global_head_dim=256,
      global_num_kv_heads=1,
      global_k_eq_v=True,
      global_rope_base=1_000_000.0,
      global_rope_fraction=0.25,
      mlp_dim=1024,
      num_experts=32,
      top_k=4,
      expert_dim=512,
      compute_dtype="bfloat16",
      remat="dots",
      scan_layers=True,
  )
  c.data.recipe = "pypi_code"  # pinned PyPI sdists (data_recipes/pypi_code.py); the stdlib is ~11 MB
  c.data.tokenizer_sample_lines = 500_000  # 120,000 lines of code hold too few pieces for 32,768
  c.train.num_steps = 20_000
  c.train.batch_size = 32
  c.train.seq_len = 2048
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 1000
  c.checkpoint.every_steps = 1000
  c.eval.every_steps = 1000
  c.eval.num_t_samples = 16
  return c

"""About 100M active parameters (MoE: 8 experts top-2 beside a dense GeGLU), autoregressive, on the Python sources
installed on the machine (`python_packages`): the AR half of the GPU speed experiment (`bench/gpu_pair.sh`), sized
for one H100/H200 in bfloat16. `configs/block_from_ar_code_100m.py` adapts it to block diffusion.

Tokens per step: 128 rows x 512 = 65,536. bench/gpu_pair.py sizes the run by the clock: `train.lr_schedule=wsd_time`
with `train.max_runtime_s` set, so the trainer measures its step time and places the learning-rate decay to end
with the budget (`train.num_steps` then only caps it); the arithmetic of each run is in BENCHMARKS.md.
"""

from diffgemma_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update(
      vocab_size=16384,  # code: byte fallback plus 16k pieces (indents, keywords, common identifiers)
      embed_dim=768,
      num_layers=12,
      layer_pattern=("sliding", "sliding", "global"),
      num_heads=12,
      head_dim=64,
      num_kv_heads=4,
      sliding_window=256,
      global_head_dim=128,
      global_num_kv_heads=2,
      global_k_eq_v=True,
      mlp_dim=1024,
      num_experts=8,
      top_k=2,
      expert_dim=1024,
      compute_dtype="bfloat16",
      remat="none",
      scan_layers=True,
  )
  c.objective.name = "ar"
  c.data.recipe = "python_packages"
  c.train.num_steps = 2000  # gpu_pair.py replaces it by a cap its time budget cannot reach
  c.train.batch_size = 128
  c.train.seq_len = 512
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 100
  c.train.log_every_steps = 20
  c.checkpoint.every_steps = 100_000  # the last step (or the time budget's stop) saves
  c.checkpoint.keep = 2
  c.eval.every_steps = 0  # the final evaluation only
  c.eval.batch_size = 32
  c.eval.max_sequences = 256
  c.eval.num_t_samples = 4
  return c

"""DiffusionGemma's recipe at tiny width: uniform-state noise, canvases of 32 tokens, the encoder's next-token loss,
two-pass self-conditioning with the release's canvas input norm, and the reference layer pattern (5 sliding-window
layers, then 1 global layer with its own head_dim, one shared K=V head and partial RoPE). Sized to train on two CPU
cores."""

from diffgemma_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update(
      vocab_size=512,
      embed_dim=128,
      num_layers=6,
      layer_pattern=("sliding",) * 5 + ("global",),
      num_heads=4,
      head_dim=32,
      num_kv_heads=2,
      sliding_window=64,
      rope_base=10_000.0,
      global_head_dim=64,
      global_num_kv_heads=1,
      global_k_eq_v=True,
      global_rope_base=1_000_000.0,
      global_rope_fraction=0.25,
      mlp_dim=256,
      num_experts=8,
      top_k=2,
      expert_dim=128,
      self_conditioning=True,
      canvas_input_norm=True,
  )
  c.objective.name = "uniform"
  c.objective.block_size = 32
  c.objective.encoder_loss_weight = 1.0
  c.objective.self_cond_prob = 0.5
  c.data.recipe = "python_stdlib"
  c.train.num_steps = 400
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  c.checkpoint.every_steps = 200
  c.eval.every_steps = 200
  c.eval.num_t_samples = 8
  c.eval.max_sequences = 128
  return c

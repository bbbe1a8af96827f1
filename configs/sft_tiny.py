"""Supervised fine-tuning of the tiny pretrained model (configs/pretrain_tiny.py, README's main job in runs/tiny) on
`python_docstrings`: prompt = a stdlib function's signature and docstring, response = its body, held out by module
exactly as the pretraining split. Full fine-tuning; `--config.model.lora_rank=8` trains LoRA adapters instead."""

from diffgemma_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "pretrain_tiny")
  c.init.checkpoint = "runs/tiny"  # the pretraining workdir: parameters and tokenizer come from there
  c.data.recipe = "python_docstrings"
  c.data.chat_template = "plain"  # completion data: the prompt is code, so no chat markers
  c.model.lora_alpha = 16.0
  c.train.num_steps = 300
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 150
  c.eval.max_sequences = 0  # every held-out pair
  return c

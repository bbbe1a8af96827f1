"""Hugging Face DiffusionGemma checkpoints: name/layout mapping, import to Orbax, export to safetensors."""

from diffgemma_jax.hf.export_hf import export_hf, restore_pure_params, run_tokenizer
from diffgemma_jax.hf.import_hf import import_hf, load_params, model_config_from_hf, pure_params
from diffgemma_jax.hf.mapping import hf_config_from_model, model_overrides_from_hf, rules

__all__ = ["export_hf", "hf_config_from_model", "import_hf", "load_params", "model_config_from_hf",
           "model_overrides_from_hf", "pure_params", "restore_pure_params", "rules", "run_tokenizer"]

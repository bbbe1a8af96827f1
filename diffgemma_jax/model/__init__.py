"""The sparse-MoE denoiser (Flax NNX)."""

from diffgemma_jax.model.config import ModelConfig, model_config_dict
from diffgemma_jax.model.masks import MASK_KINDS, MaskSpec, make_mask
from diffgemma_jax.model.transformer import Denoiser, build_model

__all__ = ["Denoiser", "MASK_KINDS", "MaskSpec", "ModelConfig", "build_model", "make_mask", "model_config_dict"]

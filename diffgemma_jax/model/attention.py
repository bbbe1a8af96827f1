"""Grouped-query attention with QK RMSNorm (scaled), V RMSNorm (unscaled), attention scale 1.0 and RoPE.

The mask is a description (`MaskSpec`: per-token segment ids, positions, canvas flags and blocks) or a dense
[B, L, S] bool array; `model.attention_impl` picks what computes it (`attention_impl.py`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.layers import LoRA, RMSNorm, param
from diffgemma_jax.model.masks import MaskSpec, sliding_window
from diffgemma_jax.model.placement import LOCAL, Placement
from diffgemma_jax.model.rope import apply_rope


class Attention(nnx.Module):
  """One attention layer of kind "sliding" or "global" (global layers may share K and V)."""

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs, placement: Placement = LOCAL):
    self.kind = kind
    self.placement = placement
    self.num_heads = cfg.num_heads
    self.head_dim, self.num_kv_heads, self.k_eq_v = cfg.attention_dims(kind)
    self.rope_base, self.rope_fraction = cfg.rope(kind)
    self.window = cfg.sliding_window if kind == "sliding" else None
    self.impl = cfg.attention_impl
    D, N, K, H = cfg.embed_dim, cfg.num_heads, self.num_kv_heads, self.head_dim
    self.q_proj = param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"))
    self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
    self.v_proj = None if self.k_eq_v else param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"))
    self.o_proj = param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), fan_in=N * H)
    self.q_norm = RMSNorm(H, eps=cfg.norm_eps, axis_name="head_dim", rngs=rngs)
    self.k_norm = RMSNorm(H, eps=cfg.norm_eps, axis_name="head_dim", rngs=rngs)
    self.v_norm = RMSNorm(H, eps=cfg.norm_eps, with_scale=False)
    # LoRA adapters (model.lora_rank > 0 and the projection in model.lora_targets), None otherwise.
    lora = lambda target, in_shape, in_axes, out_shape, out_axes: (  # noqa: E731
        LoRA(in_shape, in_axes, out_shape, out_axes, rank=cfg.lora_rank, alpha=cfg.lora_alpha, rngs=rngs)
        if cfg.lora(target) else None)
    self.q_proj_lora = lora("q_proj", (D,), ("embed",), (N, H), ("q_heads", "head_dim"))
    self.k_proj_lora = lora("k_proj", (D,), ("embed",), (K, H), ("kv_heads", "head_dim"))
    self.v_proj_lora = None if self.k_eq_v else lora("v_proj", (D,), ("embed",), (K, H), ("kv_heads", "head_dim"))
    self.o_proj_lora = lora("o_proj", (N, H), ("q_heads", "head_dim"), (D,), ("embed",))

  @staticmethod
  def _adapted(y, adapter, x, dtype):
    return y if adapter is None else y + adapter(x, dtype)

  def project_kv(self, x_BLD, positions_BL, dtype):
    """Keys and values of `x` (also what a KV cache stores), normalised and rotated."""
    k_BLKH = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.k_proj[...].astype(dtype))
    k_BLKH = self._adapted(k_BLKH, self.k_proj_lora, x_BLD, dtype)
    if self.v_proj is None:
      v_BLKH = k_BLKH
    else:
      v_BLKH = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.v_proj[...].astype(dtype))
      v_BLKH = self._adapted(v_BLKH, self.v_proj_lora, x_BLD, dtype)
    k_BLKH = apply_rope(self.k_norm(k_BLKH), positions_BL, base=self.rope_base, fraction=self.rope_fraction)
    return k_BLKH, self.v_norm(v_BLKH)

  def __call__(self, x_BLD, positions_BL, mask, dtype, *, kv=None, kv_positions_BS=None, canvas_window=None):
    """Attends from `x` to its own keys or, when `kv=(k, v)` is given, to those (positions `kv_positions`).
    `mask` is a MaskSpec (its `kv` side describing the keys; sliding layers add their window) or a dense [B, L, S]
    array; with a dense mask `canvas_window` (sliding layers only) is where canvas queries measure their window
    over clean keys from, see `masks.sliding_window`."""
    q_BLNH = jnp.einsum("BLD,DNH->BLNH", x_BLD, self.q_proj[...].astype(dtype))
    q_BLNH = self._adapted(q_BLNH, self.q_proj_lora, x_BLD, dtype)
    q_BLNH = apply_rope(self.q_norm(q_BLNH), positions_BL, base=self.rope_base, fraction=self.rope_fraction)
    if kv is None:
      k_BSKH, v_BSKH = self.project_kv(x_BLD, positions_BL, dtype)
      kv_positions_BS = positions_BL
    else:
      k_BSKH, v_BSKH = kv
    if isinstance(mask, MaskSpec):
      mask = mask.with_window(self.window)
    elif self.window is not None:
      mask = mask & sliding_window(positions_BL, kv_positions_BS, self.window, canvas_window=canvas_window)
    out_BLNH = self.placement.attend(q_BLNH, k_BSKH, v_BSKH, mask, self.impl)
    out_BLD = jnp.einsum("BLNH,NHD->BLD", out_BLNH, self.o_proj[...].astype(dtype))
    return self._adapted(out_BLD, self.o_proj_lora, out_BLNH, dtype)

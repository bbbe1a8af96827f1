"""Self-conditioning: the denoiser's previous prediction, fed back into the canvas embeddings.

The signal of a canvas position is the embedding the previous prediction expects there,
`softmax(logits) @ E * sqrt(D)` (the same scale as a token embedding), taken under `stop_gradient`. A small
GeGLU (RMSNorm with scale -> gate|up -> down) maps it to an additive term on the token embeddings, entering the
denoiser through `embeddings_BLD`. The down projection starts at zero, so a model with self-conditioning switched
on but untrained computes exactly what the same model without the module computes.

The released DiffusionGemma (`self_conditioning.*` tensors) has the same three weights (pre-norm scale, gate|up,
down); it also applies a parameter-free RMSNorm to the sum of token embedding and signal on the canvas pass: that
is `model.canvas_input_norm` (off by default, since it changes the canvas inputs whether or not the signal is on).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.layers import RMSNorm, dtype_of, geglu, param


class SelfConditioning(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D = cfg.embed_dim
    hidden = cfg.self_conditioning_dim or cfg.mlp_dim
    self.pre_norm = RMSNorm(D, eps=cfg.norm_eps, rngs=rngs)
    self.w_gate_up = param(rngs, (D, 2 * hidden), ("embed", "mlp"))
    self.w_down = param(rngs, (hidden, D), ("mlp", "embed"), init="zeros")

  def __call__(self, signal_BLD, dtype):
    return geglu(self.pre_norm(signal_BLD), self.w_gate_up[...], self.w_down[...], dtype)


def expected_embedding(embedding_VD, logits_BLV, *, excluded_ids: Sequence[int] = (), mix=None):
  """`stop_gradient(softmax(logits)) @ E * sqrt(D)` in float32; `excluded_ids` get probability zero. `mix(p_BLV,
  E_VD)` computes `p @ E` in float32 (a placement's: on a mesh, gathering the table a tile at a time)."""
  logits_BLV = jax.lax.stop_gradient(logits_BLV).astype(jnp.float32)
  for token in excluded_ids:
    logits_BLV = logits_BLV.at[..., token].set(-jnp.inf)
  probs_BLV = jax.nn.softmax(logits_BLV, axis=-1)
  embed_dim = embedding_VD.shape[-1]
  if mix is not None:
    return mix(probs_BLV, embedding_VD) * embed_dim ** 0.5
  return jnp.einsum("BLV,VD->BLD", probs_BLV, embedding_VD.astype(jnp.float32)) * embed_dim ** 0.5


def self_conditioning_embeddings(model, logits_BLV, use_B, *, excluded_ids: Sequence[int] = ()):
  """The additive embeddings [B, L, D] of pass 2 from pass 1's logits; zero for rows where `use_B` is False.

  `model` must have been built with `model.self_conditioning=True`.
  """
  if getattr(model, "self_conditioning", None) is None:
    raise ValueError("self-conditioning needs a model built with model.self_conditioning=True")
  signal_BLD = expected_embedding(model.embedder.embedding[...], logits_BLV, excluded_ids=excluded_ids,
                                  mix=model.placement.mix)
  out_BLD = model.self_conditioning(signal_BLD, dtype_of(model.cfg.compute_dtype)).astype(jnp.float32)
  return jnp.where(use_B[:, None, None], out_BLD, 0.0)

"""Routed GeGLU experts: a pure router function, the dispatch backends (in `dispatch`), and a thin Module."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from diffgemma_jax.model import dispatch
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.layers import param, rms_normalize
from diffgemma_jax.model.placement import LOCAL, Placement


class Routing(NamedTuple):
  expert_ids_TK: jax.Array  # int32, top-k expert ids per token
  combine_weights_TK: jax.Array  # float32, renormalised top-k probabilities times the per-expert scale
  load_balance_loss: jax.Array  # E**2 * mean(density * density_prob): 1.0 when perfectly balanced
  router_z_loss: jax.Array  # mean(logsumexp(router logits)**2)
  expert_load_E: jax.Array  # fraction of routed slots per expert (sums to 1)
  # (token, k) assignments that expert-parallel dispatch dropped at a full shard (0 without expert parallelism)
  dropped: jax.Array | int = 0


def top_k_per_row(x_TE, k: int):
  """`jax.lax.top_k(x_TE, k)` (the k largest of each row, largest first, the lower index first among equals: the
  same values and indices) as k argmax passes. Under GSPMD a token axis split over the devices stays split:
  XLA's SPMD partitioner runs its TopK custom call whole on every device (it splits only the sorted axis), so
  `lax.top_k` on the routed tokens of a data-parallel step all-gathers the router's probabilities, [every token
  of the global batch, E] per MoE layer, and ranks them all on each device; an argmax is a reduction along E,
  which each device runs on its own tokens. k passes over E values a token cost little beside its experts."""
  E = x_TE.shape[-1]
  experts_E = jnp.arange(E, dtype=jnp.int32)
  values, ids = [], []
  for _ in range(k):
    id_T = jnp.argmax(x_TE, axis=-1).astype(jnp.int32)
    values.append(jnp.take_along_axis(x_TE, id_T[:, None], axis=-1)[:, 0])
    ids.append(id_T)
    x_TE = jnp.where(experts_E == id_T[:, None], -jnp.inf, x_TE)
  return jnp.stack(values, axis=-1), jnp.stack(ids, axis=-1)


def route(x_TD, router_scale_D, router_w_DE, per_expert_scale_E, *, top_k: int, eps: float,
          token_mask_T=None) -> Routing:
  """RMSNorm_noscale(x) * D**-0.5 * scale @ W_r in float32 -> softmax over all E -> top-k -> renormalise -> scale.

  `token_mask_T` (1 = real token) keeps padding out of the balance statistics; it does not change routing.
  """
  D = x_TD.shape[-1]
  E = router_w_DE.shape[-1]
  h_TD = rms_normalize(x_TD, eps) * (D ** -0.5) * router_scale_D.astype(jnp.float32)
  logits_TE = jnp.einsum("TD,DE->TE", h_TD, router_w_DE.astype(jnp.float32))
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  top_probs_TK, expert_ids_TK = top_k_per_row(probs_TE, top_k)
  top_probs_TK = top_probs_TK / jnp.sum(top_probs_TK, axis=-1, keepdims=True)
  combine_TK = top_probs_TK * per_expert_scale_E.astype(jnp.float32)[expert_ids_TK]

  weight_T = jnp.ones(x_TD.shape[:1], jnp.float32) if token_mask_T is None else token_mask_T.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(weight_T), 1.0)
  chosen_TE = jnp.sum(jax.nn.one_hot(expert_ids_TK, E, dtype=jnp.float32), axis=1)
  density_E = jnp.sum(chosen_TE * weight_T[:, None], axis=0) / (denom * top_k)
  density_prob_E = jnp.sum(probs_TE * weight_T[:, None], axis=0) / denom
  load_balance = E ** 2 * jnp.mean(density_E * density_prob_E)
  z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)) * weight_T) / denom
  return Routing(expert_ids_TK.astype(jnp.int32), combine_TK, load_balance, z_loss, density_E)


class MoE(nnx.Module):
  """Router plus E routed GeGLU experts with weights [E, D, 2F] (gate|up) and [E, F, D]; `placement` runs the
  experts (expert-parallel on a mesh with an `expert` axis, `model/placement.py`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, placement: Placement = LOCAL):
    D, E, F = cfg.embed_dim, cfg.num_experts, cfg.expert_dim
    self.top_k = cfg.top_k
    self.eps = cfg.norm_eps
    self.backend = dispatch.resolve_backend(cfg.dispatch)
    self.capacity_factor, self.dropless, self.collective = cfg.capacity_factor, cfg.dropless, cfg.expert_collective
    self.placement = placement
    self.router_scale = param(rngs, (D,), ("norm",), init="ones")
    self.router_w = param(rngs, (D, E), ("embed", "experts_unsharded"))
    self.per_expert_scale = param(rngs, (E,), ("experts_unsharded",), init="ones")
    self.w_gate_up = param(rngs, (E, D, 2 * F), ("experts", "embed_expert", "expert_mlp"), fan_in=D)
    self.w_down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed_expert"), fan_in=F)

  def __call__(self, router_in_BLD, expert_in_BLD, dtype, token_mask_BL=None):
    B, L, D = expert_in_BLD.shape
    routing = route(router_in_BLD.reshape(B * L, D), self.router_scale[...], self.router_w[...],
                    self.per_expert_scale[...], top_k=self.top_k, eps=self.eps,
                    token_mask_T=None if token_mask_BL is None else token_mask_BL.reshape(B * L))
    args = (expert_in_BLD.reshape(B * L, D), routing.expert_ids_TK, routing.combine_weights_TK, self.w_gate_up[...],
            self.w_down[...])
    y_TD, dropped = self.placement.routed_experts(*args, backend=self.backend, compute_dtype=dtype,
                                                  capacity_factor=self.capacity_factor, dropless=self.dropless,
                                                  collective=self.collective)
    return y_TD.reshape(B, L, D), routing._replace(dropped=dropped)

"""The placement of a device mesh (`model.placement`): what the denoiser is built with to run sharded.

Rows of the residual stream stay split over the batch axes between sublayers (`rules.constrain`). The fused
attention kernel runs per shard (`per_shard.sharded_attend`). The MoE layers dispatch expert-parallel
(`expert.expert_parallel_routed_experts`) with an `expert` mesh axis > 1, else each token shard dispatches its own
tokens (`per_shard.token_parallel_routed_experts`), whenever the tokens split over the token axes. Otherwise
(sampling one sequence on an 8-device mesh, say) every expert shard runs its own experts on every token
(`expert.replicated_token_routed_experts`) with an `expert` axis > 1, and they dispatch under GSPMD without one;
both compute the same function.
With a `context` axis and `context_load_balance` (`mesh.context_load_balance`), rows whose attention work grows
along them run in the balanced order of `parallel/balance.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh

from diffgemma_jax.model.placement import LOCAL, Placement
from diffgemma_jax.parallel import balance, embedding, expert, per_shard, rules
from diffgemma_jax.parallel.mesh import context_load_balance


@dataclasses.dataclass(frozen=True)
class MeshPlacement(Placement):
  mesh: Mesh
  context_load_balance: bool = True

  def _balances(self, mask) -> bool:
    return self.context_load_balance and balance.balances(self.mesh, mask)

  def reorder_row(self, inputs, mask):
    return balance.reorder_inputs(self.mesh, inputs, mask) if self._balances(mask) else (inputs, mask)

  def restore_row(self, x_BLD, mask):
    return balance.reorder(x_BLD, self.mesh, inverse=True) if self._balances(mask) else x_BLD

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    return rules.constrain(x, axes, self.mesh)

  def lookup(self, table_VD: jax.Array, tokens_BL: jax.Array, dtype) -> jax.Array:
    return embedding.sharded_lookup(table_VD, tokens_BL, dtype, self.mesh)

  def logits(self, x_BLD: jax.Array, table_VD: jax.Array) -> jax.Array:
    return embedding.sharded_logits(x_BLD, table_VD, self.mesh)

  def mix(self, weights_BLV: jax.Array, table_VD: jax.Array) -> jax.Array:
    return embedding.sharded_mix(weights_BLV, table_VD, self.mesh)

  def attend(self, q_BLNH, k_BSKH, v_BSKH, mask, impl: str) -> jax.Array:
    return per_shard.sharded_attend(q_BLNH, k_BSKH, v_BSKH, mask, impl, self.mesh)

  def routed_experts(self, x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *, backend: str,
                     compute_dtype, capacity_factor: float, dropless: bool, collective: str):
    args = (x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD)
    if per_shard.dispatches_token_parallel(self.mesh, x_TD.shape[0], backend):
      return per_shard.token_parallel_routed_experts(*args, mesh=self.mesh, backend=backend,
                                                     compute_dtype=compute_dtype), 0
    if not expert.dispatches_expert_parallel(self.mesh, x_TD.shape[0]):
      if expert.expert_shards(self.mesh) > 1:  # tokens replicated, experts kept on their shards
        return expert.replicated_token_routed_experts(*args, mesh=self.mesh, backend=backend,
                                                      compute_dtype=compute_dtype), 0
      return super().routed_experts(*args, backend=backend, compute_dtype=compute_dtype,
                                    capacity_factor=capacity_factor, dropless=dropless, collective=collective)
    return expert.expert_parallel_routed_experts(*args, mesh=self.mesh, backend=backend, compute_dtype=compute_dtype,
                                                 capacity_factor=capacity_factor, dropless=dropless,
                                                 collective=collective)


def placement_for(mesh: Mesh | None, config=None) -> Placement:
  """The placement a model built for `mesh` runs with (`LOCAL` without a mesh), with the run config's
  `mesh.context_load_balance` (default on: also for a config without the key, a run's from before it)."""
  if mesh is None:
    return LOCAL
  return MeshPlacement(mesh, context_load_balance(config) if config is not None else True)

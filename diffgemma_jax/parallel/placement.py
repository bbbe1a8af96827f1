"""The placement of a device mesh (`model.placement`): what the denoiser is built with to run sharded.

Rows of the residual stream stay split over the batch axes between sublayers (`rules.constrain`). The fused
attention kernel runs per shard (`per_shard.sharded_attend`). The MoE layers dispatch expert-parallel
(`expert.expert_parallel_routed_experts`) with an `expert` mesh axis > 1, else each token shard dispatches its own
tokens (`per_shard.token_parallel_routed_experts`), whenever the tokens split over the token axes; otherwise
(sampling one sequence on an 8-device mesh, say) they dispatch under GSPMD, which computes the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh

from diffgemma_jax.model.placement import LOCAL, Placement
from diffgemma_jax.parallel import expert, per_shard, rules


@dataclasses.dataclass(frozen=True)
class MeshPlacement(Placement):
  mesh: Mesh

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    return rules.constrain(x, axes, self.mesh)

  def attend(self, q_BLNH, k_BSKH, v_BSKH, mask, impl: str) -> jax.Array:
    return per_shard.sharded_attend(q_BLNH, k_BSKH, v_BSKH, mask, impl, self.mesh)

  def routed_experts(self, x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *, backend: str,
                     compute_dtype, capacity_factor: float, dropless: bool, collective: str):
    args = (x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD)
    if per_shard.dispatches_token_parallel(self.mesh, x_TD.shape[0], backend):
      return per_shard.token_parallel_routed_experts(*args, mesh=self.mesh, backend=backend,
                                                     compute_dtype=compute_dtype), 0
    if not expert.dispatches_expert_parallel(self.mesh, x_TD.shape[0]):
      return super().routed_experts(*args, backend=backend, compute_dtype=compute_dtype,
                                    capacity_factor=capacity_factor, dropless=dropless, collective=collective)
    return expert.expert_parallel_routed_experts(*args, mesh=self.mesh, backend=backend, compute_dtype=compute_dtype,
                                                 capacity_factor=capacity_factor, dropless=dropless,
                                                 collective=collective)


def placement_for(mesh: Mesh | None) -> Placement:
  """The placement a model built for `mesh` runs with (`LOCAL` without a mesh)."""
  return LOCAL if mesh is None else MeshPlacement(mesh)

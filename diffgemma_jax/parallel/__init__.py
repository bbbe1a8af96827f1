"""Mesh construction, the logical-axis sharding rules, expert-parallel dispatch (`parallel.expert`), and the
placement a model built for a mesh runs with (`MeshPlacement`)."""

from diffgemma_jax.parallel.mesh import MESH_AXES, check_mesh_fits, make_mesh, mesh_from_config, resolve_mesh_shape
from diffgemma_jax.parallel.placement import MeshPlacement, placement_for
from diffgemma_jax.parallel.rules import (
                                          BATCH_AXES,
                                          LOGICAL_AXIS_RULES,
                                          batch_sharding,
                                          constrain,
                                          partition_spec,
                                          replicated,
                                          shardings_for,
)

__all__ = ["BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "MeshPlacement", "batch_sharding", "check_mesh_fits",
           "constrain", "make_mesh", "mesh_from_config", "partition_spec", "placement_for", "replicated",
           "resolve_mesh_shape", "shardings_for"]

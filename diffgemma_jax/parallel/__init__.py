"""Mesh construction, the logical-axis sharding rules, and expert-parallel dispatch (`parallel.expert`)."""

from diffgemma_jax.parallel.mesh import (MESH_AXES, check_mesh_fits, current_mesh, make_mesh, mesh_from_config,
                                         resolve_mesh_shape, use_mesh)
from diffgemma_jax.parallel.rules import (BATCH_AXES, LOGICAL_AXIS_RULES, batch_sharding, constrain, partition_spec,
                                          replicated, shardings_for)

__all__ = ["BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "check_mesh_fits", "constrain",
           "current_mesh", "make_mesh", "mesh_from_config", "partition_spec", "replicated", "resolve_mesh_shape",
           "shardings_for", "use_mesh"]

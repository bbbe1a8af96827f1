"""Mesh construction and the logical-axis sharding rules."""

from diffgemma_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_from_config, resolve_mesh_shape
from diffgemma_jax.parallel.rules import (BATCH_AXES, LOGICAL_AXIS_RULES, batch_sharding, partition_spec,
                                          replicated, shardings_for)

__all__ = ["BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "make_mesh", "mesh_from_config",
           "partition_spec", "replicated", "resolve_mesh_shape", "shardings_for"]

"""Logical axis names (tagged on every `nnx.Param` as metadata `axes`) -> mesh axes: one short rules table.

Plain GSPMD shardings: XLA inserts the collectives. A mesh axis of size 1 shards nothing, so the same table serves
one device and many. A logical name missing from the table is replicated, and a mesh axis is used at most once per
array (the first logical dimension that claims it wins).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),  # the scan axis stays whole on every device
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("experts", "expert"),
    ("experts_unsharded", None),  # router columns and per-expert scales: small, needed whole on every device
    ("embed_expert", "fsdp"),
    ("expert_mlp", "tensor"),
    ("batch", ("data", "fsdp", "expert")),  # activations: rows over every batch axis, features whole
    ("length", "context"),  # the sequence over `context` (context parallelism, an optional mesh axis)
)

# Rows of a batch are split over every axis that does not shard a weight's output dimension.
BATCH_AXES = ("data", "fsdp", "expert")
# The optional axis that splits each row's sequence (context parallelism); its shards hold the same rows.
CONTEXT_AXIS = "context"


def partition_spec(axes: Sequence[str | None], mesh: Mesh | None = None,
                   rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
  """The PartitionSpec of an array whose dimensions carry the logical names `axes`."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used and (mesh is None or t in mesh.axis_names))
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


def _fits(shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Drops the sharding of any dimension the mesh axes do not divide (e.g. 2 KV heads on 4 tensor shards)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = 1
    for n in names:
      size *= mesh.shape[n]
    out.append(entry if dim % size == 0 else None)
  return PartitionSpec(*out)


def param_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
  axes = variable.get_metadata().get("axes") or (None,) * len(variable.shape)
  return NamedSharding(mesh, _fits(variable.shape, partition_spec(axes, mesh), mesh))


def shardings_for(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree (nnx.State, optax state, TrainState) of nnx Variables and plain arrays.

  Variables with `axes` metadata follow the rules table; anything else (step counters, scalars) is replicated.
  Optimizer moments are `nnx.Param`-shaped copies that keep the metadata, so they shard like their parameter.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(param_sharding(leaf, mesh))
    return replicated

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over ("data", "fsdp", "expert"); the sequence and later dimensions are not split."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
  """Pins an activation to the sharding its logical `axes` get from the rules on `mesh` (the identity on one
  device). Keeps XLA from trading the FSDP all-gather of a weight for a resharded activation."""
  if mesh is None or mesh.devices.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fits(x.shape, partition_spec(axes, mesh), mesh)))

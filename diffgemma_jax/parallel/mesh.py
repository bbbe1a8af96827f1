"""The device mesh of a run, from `config.mesh.shape` and `config.mesh.axes`.

One device is a 1x1x1x1 mesh built by the same code as many, so the single-device path is the sharded path.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from diffgemma_jax.model.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 by the devices left over; the product must equal the device count."""
  shape = tuple(int(s) for s in shape)
  wildcards = [i for i, s in enumerate(shape) if s == -1]
  if len(wildcards) > 1:
    raise ConfigError(f"mesh.shape={shape}: at most one -1 (the remaining devices) is allowed")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"mesh.shape={shape}: sizes must be positive or -1")
  known = math.prod(s for s in shape if s != -1)
  if wildcards:
    if num_devices % known:
      raise ConfigError(f"mesh.shape={shape}: the fixed sizes multiply to {known}, which does not divide the "
                        f"{num_devices} available devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(f"mesh.shape={shape} holds {math.prod(shape)} devices but {num_devices} are available; "
                      f"make the product equal the device count or put -1 in one place")
  return shape


def make_mesh(shape: Sequence[int] = (1, 1, 1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  axes = tuple(axes)
  if len(shape) != len(axes):
    raise ConfigError(f"mesh.shape={tuple(shape)} and mesh.axes={axes} must have the same length")
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"mesh.axes: unknown axis name(s) {sorted(unknown)}; valid names are {MESH_AXES}")
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(shape, len(devices))
  try:  # topology-aware placement where the platform offers it (TPU/GPU slices)
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, axes)


def mesh_from_config(config) -> Mesh:
  return make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes))

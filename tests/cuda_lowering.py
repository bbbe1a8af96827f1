"""Lowering for a CUDA GPU on a host without one: how the CPU suite checks the GPU kernels (Triton, Mosaic GPU) and
the train steps that call them, short of running them.

jax up to 0.11 lowers a Pallas GPU kernel for `lowering_platforms=("cuda",)` from any host. From jax 0.12 the
Triton and Mosaic GPU lowerings read the target's compute capability from the device, and without a GPU they refuse
("No supported GPU devices found, please specify an abstract GPU device using AbstractDevice"): the lowering is
then done under an abstract mesh whose abstract device names the GPU (an H100, the Hopper the kernels are tuned for).
On a machine with a GPU nothing is set: its own device is the target.
"""

from __future__ import annotations

import contextlib

import jax
import pytest

HOPPER = "NVIDIA H100 80GB HBM3"
HOPPER_SMS = 132


@contextlib.contextmanager
def gpu_target():
  """Lowerings inside it target a Hopper GPU, on a host with or without one."""
  if jax.default_backend() == "gpu":
    yield
    return
  device = jax.sharding.AbstractDevice(device_kind=HOPPER, num_cores=HOPPER_SMS, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("gpu",), (jax.sharding.AxisType.Auto,), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    yield


def lowered_for_cuda(fn, *args):
  """fn (a function or a jitted one) traced with args (arrays or ShapeDtypeStructs) and lowered for CUDA; skips
  where this jaxlib cannot lower for CUDA at all."""
  try:
    with gpu_target():
      return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  except Exception as e:  # pylint: disable=broad-except
    if "cuda" in str(e).lower() and "platform" in str(e).lower():
      pytest.skip(f"this jaxlib cannot lower for CUDA: {e}")
    raise

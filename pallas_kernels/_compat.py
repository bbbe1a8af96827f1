"""The few Pallas calls whose spelling moved between jax releases (0.10 here, 0.11 on the GPU machines)."""

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)


def load(ref_view, mask=None, other=None):
  """Masked load of a ref view (`ref.at[...]`); masked-off entries read `other`."""
  if hasattr(plgpu, "load"):
    return plgpu.load(ref_view, mask=mask, other=other)
  return pl.load(ref_view, (), mask=mask, other=other)  # Older jax: pl.load(ref, idx, ...).


def store(ref_view, value, mask=None):
  """Masked store into a ref view; masked-off entries are left untouched."""
  if hasattr(plgpu, "store"):
    return plgpu.store(ref_view, value, mask=mask)
  return pl.store(ref_view, (), value, mask=mask)


def resolve_interpret(interpret):
  """interpret=None means: compile for the GPU when one is the default backend, else interpret."""
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)


def pallas_call_kwargs(tiling, interpret: bool) -> dict:
  """interpret / compiler_params for pl.pallas_call; Triton parameters only when compiling."""
  if interpret:
    return {"interpret": True}
  if _CompilerParams is None:
    return {}
  return {"compiler_params": _CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)}


# Mosaic GPU interpret mode (Mosaic GPU kernels run on the CPU with SMEM/GMEM, threads, barriers, TMA copies and
# wgmma simulated). jax 0.10.2 and 0.11.x keep its parameters class private, at the same path in both; the public
# `jax.experimental.pallas.mosaic_gpu` module exports no interpret-mode name in either. Any later public spelling is
# tried first.
_MOSAIC_INTERPRET_PUBLIC_NAMES = ("InterpretGPUParams", "InterpretParams")


def mosaic_interpret_params_class():
  """The class whose instances, passed as `interpret=`, select Mosaic GPU interpret mode."""
  from jax.experimental.pallas import mosaic_gpu as plmgpu  # pylint: disable=import-outside-toplevel
  for name in _MOSAIC_INTERPRET_PUBLIC_NAMES:
    if hasattr(plmgpu, name):
      return getattr(plmgpu, name)
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=import-outside-toplevel
  return InterpretGPUParams


def resolve_mosaic_interpret(interpret):
  """`interpret=` for a Mosaic GPU kernel: None or False compiles (None: interpret when no GPU is the default
  backend), True means default interpret-mode parameters, and a parameters instance is used as it is."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret is False:
    return None
  params_class = mosaic_interpret_params_class()
  if interpret is True:
    return params_class()
  if isinstance(interpret, params_class):
    return interpret
  raise ValueError(f"interpret={interpret!r}: expected None, a bool or a {params_class.__name__}")


def reset_mosaic_interpret_state():
  """Mosaic GPU interpret mode keeps global state that a kernel raising mid-run leaves dirty; this clears it."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # pylint: disable=import-outside-toplevel
  interpret_pallas_call.reset_gpu_interpret_mode_state()

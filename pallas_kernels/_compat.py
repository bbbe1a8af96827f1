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

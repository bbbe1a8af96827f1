"""Spellings of the Pallas Mosaic GPU (Hopper) API that differ between jax releases, kept apart from `_compat.py`
(the Triton spellings) so the attention and grouped-matmul ports can each add theirs without touching the other's.

The Mosaic GPU interpret mode (`InterpretGPUParams`, passed as `interpret=` to `plgpu.kernel`) runs a Mosaic GPU
kernel on the CPU with simulated GMEM / SMEM, warpgroup threads, barriers, TMA copies and wgmma. jax 0.10.2 ships it
under `jax._src.pallas.mosaic_gpu.interpret.params` only; the jax-ml/jax tree of August 2026 (0.11.1.dev) exports it
from no public module either, while the latest jax documentation lists it as
`jax.experimental.pallas.mosaic_gpu.InterpretGPUParams` (with `set_gpu_interpret_mode`): the public spelling is tried
first, the private one is the fallback. The fields used here (detect_races, uninitialized_memory,
out_of_bounds_reads) exist in both.
"""

from __future__ import annotations

import inspect

import jax


def interpret_params_class():
  """The InterpretGPUParams class of the installed jax, or None where it has none."""
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  except ImportError:  # A jaxlib without the Mosaic GPU bindings.
    return None
  public = getattr(plgpu, "InterpretGPUParams", None)
  if public is not None:
    return public
  try:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return getattr(params, "InterpretGPUParams", None)


def load(ref, *, layout):
  """The whole of `ref` loaded with a register layout (`plgpu.load`): jax 0.10.2 and 0.11 take an index after the
  ref (`load(ref, (), layout=)`), jax 0.12 takes none (`load(ref, layout=)`; a part is read by indexing the ref)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  if "idx" in inspect.signature(plgpu.load).parameters:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def interpreter_reads_transposed() -> bool:
  """Whether the Mosaic GPU interpreter reads an SMEM operand through a transpose (`ref.transpose(...)`).

  jax 0.12's does: its accessors take an `Access` (a range in the buffer's coordinates and a permutation), built by
  `to_access`. jax 0.10.2's and 0.11's wgmma callbacks apply only indexing to an operand ("'TransposeTransform'
  object has no attribute 'indices'")."""
  try:
    from jax._src.pallas.mosaic.interpret import utils  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return hasattr(utils, "to_access")


def resolve_interpret(interpret) -> bool:
  """interpret=None means: compile for the GPU when one is the default backend, else interpret."""
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)


def kernel_kwargs(interpret: bool, *, detect_races: bool = False) -> dict:
  """`interpret=` for plgpu.kernel: the Mosaic GPU interpreter's parameters, or nothing when compiling.

  Uninitialized memory reads as NaN and out-of-bounds reads raise, so an unwritten tile or a copy past an edge fails
  a test instead of passing quietly."""
  if not interpret:
    return {}
  params = interpret_params_class()
  if params is None:
    raise RuntimeError("this jax has no Mosaic GPU interpret mode (InterpretGPUParams): the Mosaic attention kernels "
                       "run only compiled, on a Hopper GPU")
  return {"interpret": params(detect_races=detect_races, uninitialized_memory="nan", out_of_bounds_reads="raise")}


def reset_interpret_state():
  """After an exception inside the interpreter its global state must be reset before the next kernel runs."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  reset = getattr(interpret_pallas_call, "reset_gpu_interpret_mode_state", None)
  if reset is not None:
    reset()


def interpret_params(interpret):
  """`interpret=` for the grouped-matmul kernels (gmm_mosaic): None to compile, else interpret-mode parameters.

  None means: compile when a GPU is the default backend, else interpret; True: the parameters above's defaults (NaN
  for uninitialised memory, out-of-bounds reads raising); a parameters instance (detect_races=True, say) is used as
  it is; False compiles.
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret is False:
    return None
  params = interpret_params_class()
  if params is None:
    raise RuntimeError("this jax has no Mosaic GPU interpret mode (InterpretGPUParams): the Mosaic grouped matmul "
                       "runs only compiled, on a Hopper GPU")
  if interpret is True:
    return params(uninitialized_memory="nan", out_of_bounds_reads="raise")
  if isinstance(interpret, params):
    return interpret
  raise ValueError(f"interpret={interpret!r}: expected None, a bool or a {params.__name__}")

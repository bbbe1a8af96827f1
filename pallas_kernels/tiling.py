"""Tile sizes for the grouped-matmul kernels: a small table keyed on kernel and dtype, shrunk to fit the shape.

Triton needs power-of-two block shapes and at least 16 along each side of a dot. The table's entries follow
the usual Hopper choices for Triton matmuls (128x128 output tiles, 64-deep k steps, 3-4 pipeline stages);
any field can be overridden by passing a Tiling (or a (block_m, block_k, block_n) tuple).

Triton's software pipeline keeps `num_stages` copies of both operand tiles in shared memory; a launch that asks
for more than the card has fails to compile ("out of resource: shared memory"). The table's choice is therefore
fitted to the card's per-block limit (fewer stages first, then a shallower k step), with tiles counted in the
dtypes they are loaded in (a float32 gradient tile is twice a bfloat16 one even when the dot runs in bfloat16).
"""

import dataclasses

import jax
import jax.numpy as jnp

MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Blocks of one kernel launch.

  gmm: block_m rows of lhs, block_k of the contraction, block_n output columns.
  tgmm: block_m rows of the reduction (the grouped dimension), block_k x block_n of each output [k, n].
  group_m: row tiles that share a run of output-column tiles in launch order (L2 reuse of rhs).
  """
  block_m: int
  block_k: int
  block_n: int
  num_warps: int = 4
  num_stages: int = 3
  group_m: int = 8

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n"):
      value = getattr(self, name)
      if value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"Tiling.{name}={value}: must be a power of two >= {MIN_BLOCK} (Triton block shapes)")
    if self.group_m < 1:
      raise ValueError(f"Tiling.group_m={self.group_m}: must be >= 1")


# (kernel, bytes per element) -> tiling for large problems.
_TABLE = {
    ("gmm", 2): Tiling(block_m=128, block_k=64, block_n=128, num_warps=4, num_stages=4),
    ("gmm", 4): Tiling(block_m=64, block_k=32, block_n=64, num_warps=4, num_stages=3),
    ("tgmm", 2): Tiling(block_m=64, block_k=128, block_n=128, num_warps=4, num_stages=4),
    ("tgmm", 4): Tiling(block_m=32, block_k=64, block_n=64, num_warps=4, num_stages=3),
}


# Opt-in shared memory per thread block (bytes), by device-kind substring; Hopper when the card is unknown.
_SHARED_MEMORY_BYTES = (("H100", 232448), ("H200", 232448), ("H800", 232448), ("GH200", 232448),
                        ("A100", 166912), ("A800", 166912), ("L40", 101376), ("L4", 101376), ("A10", 101376))
DEFAULT_SHARED_MEMORY_BYTES = 232448


def device_shared_memory_bytes() -> int:
  """Shared memory a block may use on the default GPU (the Hopper value when there is none or it is unknown)."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return DEFAULT_SHARED_MEMORY_BYTES
  if device.platform != "gpu":
    return DEFAULT_SHARED_MEMORY_BYTES
  kind = getattr(device, "device_kind", "")
  for name, size in _SHARED_MEMORY_BYTES:
    if name in kind:
      return size
  return DEFAULT_SHARED_MEMORY_BYTES


def pipeline_shared_bytes(kernel: str, tiling: Tiling, operand_bytes=(2, 2)) -> int:
  """Shared memory of the pipelined operand tiles: num_stages x (first tile + second tile), in load dtypes.

  gmm loads lhs [block_m, block_k] and rhs [block_k, block_n]; tgmm loads lhs [block_m, block_k] and
  rhs [block_m, block_n] (block_m being the grouped reduction).
  """
  a_bytes, b_bytes = operand_bytes
  second = tiling.block_k * tiling.block_n if kernel == "gmm" else tiling.block_m * tiling.block_n
  return tiling.num_stages * (tiling.block_m * tiling.block_k * a_bytes + second * b_bytes)


def _fit_shared_memory(kernel: str, tiling: Tiling, operand_bytes, budget: int) -> Tiling:
  while pipeline_shared_bytes(kernel, tiling, operand_bytes) > budget:
    if tiling.num_stages > 2:
      tiling = dataclasses.replace(tiling, num_stages=tiling.num_stages - 1)
    elif tiling.block_k > MIN_BLOCK:
      tiling = dataclasses.replace(tiling, block_k=tiling.block_k // 2)
    elif tiling.block_n > MIN_BLOCK:
      tiling = dataclasses.replace(tiling, block_n=tiling.block_n // 2)
    else:
      break
  return tiling


def _fit(block: int, dim: int) -> int:
  """Largest useful block for a dimension: no bigger than the next power of two above it, at least 16."""
  return max(MIN_BLOCK, min(block, 1 << max(0, (dim - 1).bit_length())))


def choose_tiling(kernel: str, m: int, k: int, n: int, dtype, override=None, operand_dtypes=None,
                  shared_memory_bytes=None) -> Tiling:
  """Tiling for `kernel` ('gmm' or 'tgmm') on lhs rows m, contraction k, output columns n.

  For tgmm, m is the grouped reduction dimension and [k, n] the shape of each output group.
  `override` (a Tiling or a (block_m, block_k, block_n) tuple) wins when given, as it is.
  operand_dtypes: the dtypes the two operand tiles are loaded in (default: `dtype` for both), and
  shared_memory_bytes the per-block limit (default: the default GPU's, see device_shared_memory_bytes).
  """
  if isinstance(override, Tiling):
    return override
  if override is not None:
    block_m, block_k, block_n = override
    return Tiling(block_m, block_k, block_n)
  if kernel not in ("gmm", "tgmm"):
    raise ValueError(f"kernel={kernel!r}: expected 'gmm' or 'tgmm'")
  itemsize = min(jnp.dtype(dtype).itemsize, 4)
  base = _TABLE[(kernel, 4 if itemsize >= 4 else 2)]
  tiling = dataclasses.replace(base, block_m=_fit(base.block_m, m), block_k=_fit(base.block_k, k),
                               block_n=_fit(base.block_n, n))
  # Wide 2-byte gmm outputs amortise lhs loads over a 256-wide tile; 8 warps keep the accumulator in registers.
  if kernel == "gmm" and itemsize == 2 and m >= 4096 and n >= 4096:
    tiling = dataclasses.replace(tiling, block_n=256, num_warps=8, num_stages=3)
  operand_dtypes = operand_dtypes or (dtype, dtype)
  operand_bytes = tuple(jnp.dtype(d).itemsize for d in operand_dtypes)
  budget = shared_memory_bytes or device_shared_memory_bytes()
  return _fit_shared_memory(kernel, tiling, operand_bytes, budget)

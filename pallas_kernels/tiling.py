"""Tile sizes for the grouped-matmul kernels: a small table keyed on kernel and dtype, shrunk to fit the shape.

Triton needs power-of-two block shapes and at least 16 along each side of a dot. The table's entries follow
the usual Hopper choices for Triton matmuls (128x128 output tiles, 64-deep k steps, 3-4 pipeline stages);
any field can be overridden by passing a Tiling (or a (block_m, block_k, block_n) tuple).
"""

import dataclasses

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


def _fit(block: int, dim: int) -> int:
  """Largest useful block for a dimension: no bigger than the next power of two above it, at least 16."""
  return max(MIN_BLOCK, min(block, 1 << max(0, (dim - 1).bit_length())))


def choose_tiling(kernel: str, m: int, k: int, n: int, dtype, override=None) -> Tiling:
  """Tiling for `kernel` ('gmm' or 'tgmm') on lhs rows m, contraction k, output columns n.

  For tgmm, m is the grouped reduction dimension and [k, n] the shape of each output group.
  `override` (a Tiling or a (block_m, block_k, block_n) tuple) wins when given.
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
  return tiling

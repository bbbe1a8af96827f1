"""Tile sizes of the flash-attention kernels: a small table keyed on head dim, dtype and pass, fitted to the shape.

Triton needs power-of-two tiles of at least 16 on each side of a dot. The forward keeps a [block_q, H] query tile
and a float32 [block_q, H] accumulator in registers and streams [block_k, H] key and value tiles through shared
memory (`num_stages` copies of each); the backward's dK/dV kernel also keeps two float32 [block_k, H]
accumulators, so it gets smaller tiles. Head dims of 256 and 512 (DiffusionGemma's sliding and global layers) get
smaller tiles than 128. The table is a starting point from the usual Triton flash-attention choices on Hopper,
not yet tuned on a GPU: `bench/attention_gpu.py --tiling` measures overrides.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class AttentionTiling:
  """One kernel launch's tiles: block_q query rows (rows are (position, head) pairs under GQA) by block_k keys."""
  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"AttentionTiling.{name}={value}: must be a power of two >= {MIN_BLOCK} (Triton tiles)")


# (pass, largest head dim) -> tiling, for 2-byte operands; float32 operands halve block_k.
_TABLE = (
    ("forward", 64, AttentionTiling(128, 64, num_warps=4, num_stages=3)),
    ("forward", 128, AttentionTiling(128, 64, num_warps=8, num_stages=2)),
    ("forward", 256, AttentionTiling(64, 64, num_warps=8, num_stages=2)),
    ("forward", 512, AttentionTiling(64, 32, num_warps=8, num_stages=2)),
    ("backward", 64, AttentionTiling(64, 64, num_warps=4, num_stages=2)),
    ("backward", 128, AttentionTiling(64, 64, num_warps=8, num_stages=2)),
    ("backward", 256, AttentionTiling(32, 32, num_warps=8, num_stages=2)),
    ("backward", 512, AttentionTiling(32, 16, num_warps=8, num_stages=1)),
)


def _fit(block: int, length: int) -> int:
  """No larger than the next power of two above `length`, at least 16."""
  return max(MIN_BLOCK, min(block, 1 << max(0, (length - 1).bit_length())))


def choose_attention_tiling(direction: str, head_dim: int, dtype, q_rows: int, kv_length: int,
                            override=None) -> AttentionTiling:
  """The tiling of the `direction` ('forward' or 'backward') kernels; `override` (an AttentionTiling or a
  (block_q, block_k) pair) wins as it is."""
  if isinstance(override, AttentionTiling):
    return override
  if override is not None:
    return AttentionTiling(*override)
  if direction not in ("forward", "backward"):
    raise ValueError(f"direction={direction!r}: expected 'forward' or 'backward'")
  rows = [t for d, h, t in _TABLE if d == direction and head_dim <= h]
  base = rows[0] if rows else [t for d, _, t in _TABLE if d == direction][-1]
  block_k = base.block_k if jnp.dtype(dtype).itemsize <= 2 else max(MIN_BLOCK, base.block_k // 2)
  return dataclasses.replace(base, block_q=_fit(base.block_q, q_rows), block_k=_fit(block_k, kv_length))


def shared_memory_bytes(tiling: AttentionTiling, head_dim: int, itemsize: int, direction: str) -> int:
  """Shared memory of the pipelined operand tiles: the streamed tiles (keys and values forward and for dQ; queries
  and output gradients for dK/dV) x num_stages, plus the tiles held for the whole loop."""
  if direction == "forward":
    streamed, held = 2 * tiling.block_k, tiling.block_q
  else:
    streamed, held = 2 * max(tiling.block_q, tiling.block_k), 2 * max(tiling.block_q, tiling.block_k)
  return (tiling.num_stages * streamed + held) * head_dim * itemsize

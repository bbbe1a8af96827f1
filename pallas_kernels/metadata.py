"""Group metadata: which rows each local group owns, and the list of (row tile, group) visits for gmm.

Rows of lhs are sorted by group. gmm walks a "visit list": for each segment of rows, the row tiles that
overlap it. The segments partition [0, m): the rows before the local groups, each local group, and the rows
after them. A tile straddling a boundary is therefore visited once per segment and each visit writes only its
own rows, so every output row is written exactly once; segments that belong to no local group write zeros.
The list has a static length, num_row_tiles + num_local_groups + 1, which bounds the number of (segment, tile)
overlaps; unused entries are padding visits that write nothing.
"""

from typing import NamedTuple

import jax.numpy as jnp


class GroupBounds(NamedTuple):
  """Rows [row_start[g], row_end[g]) belong to local group g (both clipped to [0, m])."""
  row_start: jnp.ndarray  # int32[num_local_groups]
  row_end: jnp.ndarray  # int32[num_local_groups]


class Visits(NamedTuple):
  """Per visit v: the row tile to compute, its local group (-1: write zeros) and the rows it may write."""
  row_tile: jnp.ndarray  # int32[num_visits]
  group: jnp.ndarray  # int32[num_visits]
  row_start: jnp.ndarray  # int32[num_visits]
  row_end: jnp.ndarray  # int32[num_visits]


def num_visits(num_rows: int, block_m: int, num_local_groups: int) -> int:
  return -(-num_rows // block_m) + num_local_groups + 1


def group_bounds(group_sizes, num_rows: int, num_local_groups: int, group_offset=0) -> GroupBounds:
  """Row range of each local group (global groups group_offset .. group_offset + num_local_groups - 1)."""
  num_groups = group_sizes.shape[0]
  group_ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  boundaries = jnp.concatenate([jnp.zeros((1,), jnp.int32), group_ends])  # [num_groups + 1]
  first = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local_groups, dtype=jnp.int32)
  # Groups past the end of group_sizes are empty: both bounds land on the total.
  row_start = boundaries[jnp.clip(first, 0, num_groups)]
  row_end = boundaries[jnp.clip(first + 1, 0, num_groups)]
  return GroupBounds(jnp.minimum(row_start, num_rows), jnp.minimum(row_end, num_rows))


def gmm_visits(group_sizes, num_rows: int, block_m: int, num_local_groups: int, group_offset=0) -> Visits:
  """The visit list described in the module docstring, of length num_visits(...)."""
  bounds = group_bounds(group_sizes, num_rows, num_local_groups, group_offset)
  if num_local_groups:
    local_first_row = bounds.row_start[:1]
    local_end_row = bounds.row_end[-1:]
  else:
    local_first_row = local_end_row = jnp.zeros((1,), jnp.int32)
  seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), bounds.row_start, local_end_row])
  seg_end = jnp.concatenate([local_first_row, bounds.row_end, jnp.full((1,), num_rows, jnp.int32)])
  num_segments = num_local_groups + 2

  first_tile = seg_start // block_m
  end_tile = (seg_end + block_m - 1) // block_m
  tiles_per_segment = jnp.where(seg_end > seg_start, end_tile - first_tile, 0)
  visits_end = jnp.cumsum(tiles_per_segment)
  visits_start = visits_end - tiles_per_segment

  visit = jnp.arange(num_visits(num_rows, block_m, num_local_groups), dtype=jnp.int32)
  segment = jnp.searchsorted(visits_end, visit, side="right").astype(jnp.int32)
  is_real = segment < num_segments
  segment = jnp.minimum(segment, num_segments - 1)
  row_tile = jnp.where(is_real, first_tile[segment] + visit - visits_start[segment], 0)
  is_local = is_real & (segment >= 1) & (segment <= num_local_groups)
  return Visits(
      row_tile=row_tile.astype(jnp.int32),
      group=jnp.where(is_local, segment - 1, -1).astype(jnp.int32),
      row_start=jnp.where(is_real, seg_start[segment], 0).astype(jnp.int32),
      row_end=jnp.where(is_real, seg_end[segment], 0).astype(jnp.int32),
  )


class TileGroups(NamedTuple):
  """For the Mosaic GPU gmm: the (row tile, local group) pairs that overlap, sorted by row tile.

  Row tile t overlaps the entries [first[t], end[t]) of `group`, `row_start` and `row_end` (the group's rows,
  clipped to [0, m)). Only non-empty local groups appear, so a tile no local group reaches has an empty range.
  """
  first: jnp.ndarray  # int32[num_row_tiles]
  end: jnp.ndarray  # int32[num_row_tiles]
  group: jnp.ndarray  # int32[num_row_tiles + num_local_groups]
  row_start: jnp.ndarray  # int32[num_row_tiles + num_local_groups]
  row_end: jnp.ndarray  # int32[num_row_tiles + num_local_groups]


def tile_groups(group_sizes, num_rows: int, block_m: int, num_local_groups: int, group_offset=0) -> TileGroups:
  """The pairs described in TileGroups. A non-empty group of s rows overlaps at most ceil(s / block_m) + 1 tiles
  and the groups' rows are disjoint, so num_row_tiles + num_local_groups entries always suffice."""
  num_tiles = -(-num_rows // block_m)
  num_entries = num_tiles + num_local_groups
  if not num_local_groups:
    zeros = jnp.zeros((num_tiles,), jnp.int32)
    empty = jnp.zeros((num_entries,), jnp.int32)
    return TileGroups(zeros, zeros, empty, empty, empty)
  bounds = group_bounds(group_sizes, num_rows, num_local_groups, group_offset)
  first_tile = bounds.row_start // block_m
  tiles = jnp.where(bounds.row_end > bounds.row_start, (bounds.row_end + block_m - 1) // block_m - first_tile, 0)
  entries_end = jnp.cumsum(tiles)
  entries_start = entries_end - tiles
  entry = jnp.arange(num_entries, dtype=jnp.int32)
  group = jnp.searchsorted(entries_end, entry, side="right").astype(jnp.int32)
  is_real = group < num_local_groups
  group = jnp.minimum(group, num_local_groups - 1)
  # Groups are consecutive runs of rows, so the tiles of the entries never decrease; padding entries sort last.
  tile = jnp.where(is_real, first_tile[group] + entry - entries_start[group], num_tiles)
  tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
  return TileGroups(
      first=jnp.searchsorted(tile, tile_ids, side="left").astype(jnp.int32),
      end=jnp.searchsorted(tile, tile_ids, side="right").astype(jnp.int32),
      group=jnp.where(is_real, group, 0).astype(jnp.int32),
      row_start=jnp.where(is_real, bounds.row_start[group], 0).astype(jnp.int32),
      row_end=jnp.where(is_real, bounds.row_end[group], 0).astype(jnp.int32),
  )


def check_group_sizes(group_sizes):
  """A one-line ValueError unless `group_sizes` is a 1-D integer array."""
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes: expected a 1-D integer array, got {group_sizes.dtype}{group_sizes.shape}")


def gmm_shapes(lhs, rhs, group_sizes, transpose_rhs: bool):
  """(m, k, n, local groups) of a grouped matmul lhs [m, k] x rhs [G, k, n] (or [G, n, k]), after checking that
  the operands agree; the one check of every backend's gmm."""
  check_group_sizes(group_sizes)
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"gmm: expected lhs [m,k] and rhs [G,k,n]; got lhs {lhs.shape} and rhs {rhs.shape}")
  m, k = lhs.shape
  num_local_groups, rhs_k, n = (rhs.shape[0], rhs.shape[2], rhs.shape[1]) if transpose_rhs else rhs.shape
  if rhs_k != k:
    layout = "[G, n, k]" if transpose_rhs else "[G, k, n]"
    raise ValueError(f"gmm: lhs is [m={m}, k={k}] but rhs {rhs.shape} read as {layout} has k={rhs_k}")
  return m, k, n, num_local_groups


def tgmm_shapes(lhs, rhs, group_sizes, transpose_lhs: bool):
  """(m, k, n) of a weight-gradient grouped matmul lhs [k, m] (or [m, k]) x rhs [m, n], after checking that the
  operands agree; the one check of every backend's tgmm."""
  check_group_sizes(group_sizes)
  if lhs.ndim != 2 or rhs.ndim != 2:
    raise ValueError(f"tgmm: expected 2-D lhs and rhs; got {lhs.shape} and {rhs.shape}")
  m, k = lhs.shape if transpose_lhs else lhs.shape[::-1]
  if rhs.shape[0] != m:
    layout = "[m, k]" if transpose_lhs else "[k, m]"
    raise ValueError(f"tgmm: lhs {lhs.shape} read as {layout} has m={m} but rhs {rhs.shape} has m={rhs.shape[0]}")
  return m, k, rhs.shape[1]

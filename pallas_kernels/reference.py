"""Pure-jnp references for the grouped matmuls, used by the tests and the benchmark's checks.

They favour obvious correctness over speed: every product is taken in float32 at the highest precision.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def local_group_of_rows(group_sizes, num_rows, group_offset=0, num_local_groups=None):
  """Local group index of each row of lhs, or -1 for rows of other shards' groups and rows past the groups.

  Rows are grouped in order: rows [sum(sizes[:g]), sum(sizes[:g+1])) belong to global group g. The local
  groups are the global groups [group_offset, group_offset + num_local_groups).
  """
  num_groups = group_sizes.shape[0]
  if num_local_groups is None:
    num_local_groups = num_groups
  group_ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  global_group = jnp.searchsorted(group_ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")
  local_group = global_group - jnp.asarray(group_offset, jnp.int32)
  is_local = (local_group >= 0) & (local_group < num_local_groups) & (global_group < num_groups)
  return jnp.where(is_local, local_group, -1).astype(jnp.int32)


def gmm_rows_reference(lhs_rows, row_groups, rhs, transpose_rhs=False, preferred_element_type=jnp.float32):
  """out[r] = lhs_rows[r] @ rhs[row_groups[r]] (zero where row_groups[r] < 0); rhs is [G,k,n] or [G,n,k].

  Works on any subset of rows, so the benchmark can check large problems on a sample.
  """
  # Widen before the gather: its transpose (the weight gradient) is a scatter-add, which would otherwise add the
  # rows' contributions one at a time in the weights' own dtype (bfloat16: an error of up to a few tenths).
  weights = rhs.astype(jnp.float32)[jnp.maximum(row_groups, 0)]
  spec = "rk,rnk->rn" if transpose_rhs else "rk,rkn->rn"
  out = jnp.einsum(spec, lhs_rows.astype(jnp.float32), weights, precision=_HIGHEST)
  return jnp.where(row_groups[:, None] >= 0, out, 0.0).astype(preferred_element_type)


def gmm_reference(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, group_offset=None,
                  transpose_rhs=False):
  """lhs[m,k] x rhs[G,k,n] (or [G,n,k]) -> [m,n]; rows outside the local groups are zero."""
  row_groups = local_group_of_rows(group_sizes, lhs.shape[0], group_offset or 0, rhs.shape[0])
  return gmm_rows_reference(lhs, row_groups, rhs, transpose_rhs, preferred_element_type)


def tgmm_reference(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, group_offset=None,
                   num_actual_groups=None):
  """lhs[k,m] x rhs[m,n] -> [G,k,n], out[g] = lhs[:, rows of g] @ rhs[rows of g]; empty groups give zeros."""
  if num_actual_groups is None:
    num_actual_groups = group_sizes.shape[0]
  row_groups = local_group_of_rows(group_sizes, lhs.shape[1], group_offset or 0, num_actual_groups)
  one_hot = (row_groups[None, :] == jnp.arange(num_actual_groups)[:, None]).astype(jnp.float32)
  out = jnp.einsum("km,gm,mn->gkn", lhs.astype(jnp.float32), one_hot, rhs.astype(jnp.float32),
                   precision=_HIGHEST)
  return out.astype(preferred_element_type)

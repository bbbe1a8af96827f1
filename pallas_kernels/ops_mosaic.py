"""Differentiable grouped matmul on Mosaic GPU: the custom_vjp around gmm_mosaic's gmm / tgmm kernels.

  out   = gmm(lhs, rhs)                              [m, n]
  dlhs  = gmm(grad, rhs, transpose_rhs=not transpose_rhs)
  drhs  = tgmm(lhs^T, grad)   (or tgmm(grad^T, lhs) when rhs is [G, n, k])

As ops.gmm (the Triton one), with one difference: wgmma reads 16-bit operands from SMEM, so the incoming
gradient (float32 when the forward returned float32) is cast to the operands' dtype in HBM before the two
backward kernels, where the Triton kernels cast each tile in registers.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gmm_mosaic import MosaicTiling
from pallas_kernels.gmm_mosaic import gmm as gmm_kernel
from pallas_kernels.gmm_mosaic import tgmm as tgmm_kernel


def _split_tilings(tiling):
  """tiling: None, one tiling for the forward kernel, or a (fwd, dlhs, drhs) triple of tilings."""
  if tiling is None or isinstance(tiling, MosaicTiling):
    return (tiling, None, None)
  tiling = tuple(tiling)
  if len(tiling) == 3 and all(t is None or isinstance(t, (MosaicTiling, tuple, list)) for t in tiling):
    return tuple(t if t is None or isinstance(t, MosaicTiling) else MosaicTiling(*t) for t in tiling)
  return (MosaicTiling(*tiling), None, None)


def gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=None, group_offset=None,
        transpose_rhs=False, interpret=None):
  """Differentiable grouped matmul on Mosaic GPU; arguments as pallas_kernels.gmm_mosaic.gmm.

  lhs and rhs are bf16 or f16 (one dtype). tiling may also be a (fwd, dlhs, drhs) triple, each None (table), a
  MosaicTiling or (block_m, block_k, block_n). Gradients flow to lhs and rhs.
  """
  group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
  return _gmm(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), group_offset,
              jnp.dtype(preferred_element_type or jnp.float32), _split_tilings(tiling), bool(transpose_rhs),
              interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, group_offset, preferred_element_type, tilings, transpose_rhs, interpret):
  return gmm_kernel(lhs, rhs, group_sizes, preferred_element_type, tilings[0], group_offset, transpose_rhs,
                    interpret)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, preferred_element_type, tilings, transpose_rhs, interpret):
  out = _gmm(lhs, rhs, group_sizes, group_offset, preferred_element_type, tilings, transpose_rhs, interpret)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(preferred_element_type, tilings, transpose_rhs, interpret, residuals, grad):
  del preferred_element_type
  lhs, rhs, group_sizes, group_offset = residuals
  grad = grad.astype(lhs.dtype)
  dlhs = gmm_kernel(grad, rhs, group_sizes, lhs.dtype, tilings[1], group_offset,
                    transpose_rhs=not transpose_rhs, interpret=interpret)
  if transpose_rhs:  # rhs[g] is [n, k]: drhs[g] = grad_g^T @ lhs_g.
    tgmm_lhs, tgmm_rhs = grad, lhs
  else:  # rhs[g] is [k, n]: drhs[g] = lhs_g^T @ grad_g.
    tgmm_lhs, tgmm_rhs = lhs, grad
  drhs = tgmm_kernel(tgmm_lhs, tgmm_rhs, group_sizes, rhs.dtype, tilings[2], group_offset,
                     num_actual_groups=rhs.shape[0], interpret=interpret, transpose_lhs=True)
  return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)

"""Differentiable grouped matmul: the custom_vjp around the gmm / tgmm kernels.

  out   = gmm(lhs, rhs)                              [m, n]
  dlhs  = gmm(grad, rhs, transpose_rhs=not transpose_rhs)
  drhs  = tgmm(lhs^T, grad)   (or tgmm(grad^T, lhs) when rhs is [G, n, k])

The transposes are never materialised: tgmm reads lhs (or grad) in its [m, k] layout. `differentiable_gmm` builds
the same entry point around another backend's kernels (ops_mosaic.py: the Mosaic GPU ones).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import gmm as gmm_kernel
from pallas_kernels.gmm import tgmm as tgmm_kernel
from pallas_kernels.tiling import Tiling


def differentiable_gmm(forward_kernel, weight_grad_kernel, tiling_type, backward_operands):
  """The differentiable `gmm(lhs, rhs, group_sizes, ...)` of a backend: `forward_kernel` (also the dlhs kernel)
  and `weight_grad_kernel` (tgmm) take the Triton kernels' arguments; `tiling_type` is the backend's tiling class;
  `backward_operands(grad, lhs, rhs) -> (grad, extra kernel kwargs)` says how the backward kernels get the incoming
  gradient (cast inside the kernels, or in HBM first)."""

  def split_tilings(tiling):
    """tiling: None, one tiling for the forward kernel, or a (fwd, dlhs, drhs) triple of tilings."""
    if tiling is None or isinstance(tiling, tiling_type):
      return (tiling, None, None)
    tiling = tuple(tiling)
    if len(tiling) == 3 and all(t is None or isinstance(t, (tiling_type, tuple, list)) for t in tiling):
      return tuple(t if t is None or isinstance(t, tiling_type) else tiling_type(*t) for t in tiling)
    return (tiling_type(*tiling), None, None)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
  def call(lhs, rhs, group_sizes, group_offset, preferred_element_type, tilings, transpose_rhs, interpret):
    return forward_kernel(lhs, rhs, group_sizes, preferred_element_type, tilings[0], group_offset, transpose_rhs,
                          interpret)

  def forward(lhs, rhs, group_sizes, group_offset, preferred_element_type, tilings, transpose_rhs, interpret):
    out = call(lhs, rhs, group_sizes, group_offset, preferred_element_type, tilings, transpose_rhs, interpret)
    return out, (lhs, rhs, group_sizes, group_offset)

  def backward(preferred_element_type, tilings, transpose_rhs, interpret, residuals, grad):
    del preferred_element_type
    lhs, rhs, group_sizes, group_offset = residuals
    grad, kwargs = backward_operands(grad, lhs, rhs)
    dlhs = forward_kernel(grad, rhs, group_sizes, lhs.dtype, tilings[1], group_offset,
                          transpose_rhs=not transpose_rhs, interpret=interpret, **kwargs)
    if transpose_rhs:  # rhs[g] is [n, k]: drhs[g] = grad_g^T @ lhs_g.
      tgmm_lhs, tgmm_rhs = grad, lhs
    else:  # rhs[g] is [k, n]: drhs[g] = lhs_g^T @ grad_g.
      tgmm_lhs, tgmm_rhs = lhs, grad
    drhs = weight_grad_kernel(tgmm_lhs, tgmm_rhs, group_sizes, rhs.dtype, tilings[2], group_offset,
                              num_actual_groups=rhs.shape[0], interpret=interpret, transpose_lhs=True, **kwargs)
    return dlhs, drhs, None, None

  call.defvjp(forward, backward)

  def gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=None, group_offset=None,
          transpose_rhs=False, interpret=None):
    group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
    return call(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), group_offset,
                jnp.dtype(preferred_element_type or jnp.float32), split_tilings(tiling), bool(transpose_rhs),
                interpret)

  return gmm


def _cast_in_kernels(grad, lhs, rhs):
  """The Triton kernels cast the gradient to the operands' dtype tile by tile (no extra pass over it in HBM)."""
  return grad, {"compute_dtype": jnp.promote_types(lhs.dtype, rhs.dtype)}


gmm = differentiable_gmm(gmm_kernel, tgmm_kernel, Tiling, _cast_in_kernels)
gmm.__doc__ = """Differentiable grouped matmul; arguments as the raw kernel pallas_kernels.gmm_kernel.

  tiling may also be a (fwd, dlhs, drhs) triple, each None (table), a Tiling or (block_m, block_k, block_n).
  Gradients flow to lhs and rhs; group_sizes and group_offset are integer inputs with no gradient.
  """

"""Differentiable grouped matmul on Mosaic GPU: ops.py's custom_vjp around gmm_mosaic's gmm / tgmm kernels.

  out   = gmm(lhs, rhs)                              [m, n]
  dlhs  = gmm(grad, rhs, transpose_rhs=not transpose_rhs)
  drhs  = tgmm(lhs^T, grad)   (or tgmm(grad^T, lhs) when rhs is [G, n, k])

As ops.gmm (the Triton one), with one difference: wgmma reads 16-bit operands from SMEM, so the incoming
gradient (float32 when the forward returned float32) is cast to the operands' dtype in HBM before the two
backward kernels, where the Triton kernels cast each tile in registers.
"""

from pallas_kernels.gmm_mosaic import MosaicTiling
from pallas_kernels.gmm_mosaic import gmm as gmm_kernel
from pallas_kernels.gmm_mosaic import tgmm as tgmm_kernel
from pallas_kernels.ops import differentiable_gmm


def _cast_in_hbm(grad, lhs, rhs):
  del rhs
  return grad.astype(lhs.dtype), {}


gmm = differentiable_gmm(gmm_kernel, tgmm_kernel, MosaicTiling, _cast_in_hbm)
gmm.__doc__ = """Differentiable grouped matmul on Mosaic GPU; arguments as pallas_kernels.gmm_mosaic.gmm.

  lhs and rhs are bf16 or f16 (one dtype). tiling may also be a (fwd, dlhs, drhs) triple, each None (table), a
  MosaicTiling or (block_m, block_k, block_n). Gradients flow to lhs and rhs.
  """

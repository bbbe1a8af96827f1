"""Pallas routed grouped matmuls (megablox-style API) for sparse-MoE layers, with a Triton GPU lowering.

`gmm` is the differentiable entry point (custom_vjp); `gmm_kernel` and `tgmm` are the raw forward and
weight-gradient kernels; the references are pure jnp.
"""

from pallas_kernels.gmm import gmm as gmm_kernel
from pallas_kernels.gmm import tgmm
from pallas_kernels.metadata import GroupBounds, Visits, gmm_visits, group_bounds
from pallas_kernels.ops import gmm
from pallas_kernels.reference import gmm_reference, tgmm_reference
from pallas_kernels.tiling import Tiling, choose_tiling, pipeline_shared_bytes

__all__ = [
    "GroupBounds",
    "Tiling",
    "Visits",
    "choose_tiling",
    "gmm",
    "gmm_kernel",
    "gmm_reference",
    "gmm_visits",
    "group_bounds",
    "pipeline_shared_bytes",
    "tgmm",
    "tgmm_reference",
]

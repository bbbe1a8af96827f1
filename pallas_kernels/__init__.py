"""Pallas kernels with a Triton GPU lowering: routed grouped matmuls (megablox-style API) for sparse-MoE layers,
and flash attention under mask descriptions (also ported to Mosaic GPU for Hopper: `flash_attention_mosaic`).

`gmm` is the differentiable entry point (custom_vjp); `gmm_kernel` and `tgmm` are the raw forward and
weight-gradient kernels. `flash_attention` is differentiable attention under a `MaskSpec`. The references are
pure jnp.

The same grouped matmul on the Pallas Mosaic GPU backend (Hopper: TMA and wgmma) lives in `gmm_mosaic` (kernels)
and `ops_mosaic` (its custom_vjp), imported from there rather than here: docs/grouped_matmul.md.
"""

from pallas_kernels.attention_mask import MaskSpec, Tokens, count_visible, tile_visits
from pallas_kernels.attention_ops import flash_attention
from pallas_kernels.attention_mosaic_ops import flash_attention_mosaic
from pallas_kernels.attention_chunked import ChunkPlan, chunked_attention, plan_chunks, span_ladder
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.attention_tiling import AttentionTiling, choose_attention_tiling
from pallas_kernels.gmm import gmm as gmm_kernel
from pallas_kernels.gmm import tgmm
from pallas_kernels.metadata import GroupBounds, Visits, gmm_visits, group_bounds
from pallas_kernels.ops import gmm
from pallas_kernels.reference import gmm_reference, tgmm_reference
from pallas_kernels.tiling import Tiling, choose_tiling, pipeline_shared_bytes

__all__ = [
    "AttentionTiling",
    "ChunkPlan",
    "MaskSpec",
    "Tokens",
    "attention_reference",
    "chunked_attention",
    "choose_attention_tiling",
    "count_visible",
    "flash_attention",
    "flash_attention_mosaic",
    "plan_chunks",
    "span_ladder",
    "tile_visits",
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

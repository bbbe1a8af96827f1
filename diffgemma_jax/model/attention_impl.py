"""Which attention computes a layer: `model.attention_impl` and the kind of mask decide.

- `xla`: [B, heads, L, S] float32 logits under the dense boolean mask (`pallas_kernels.attention_reference`): the
  reference, and the path of every dense mask (the samplers build their KV-cache windows as arrays).
- `chunked`: the same arithmetic as `xla` a chunk of CHUNK queries at a time (`chunked_attention`: the mask made
  per chunk from the description, each chunk on the key blocks it can see where they fit a narrow span, recomputed
  in the backward pass): memory O(CHUNK x S) per head, not O(L x S), for long rows where no fused kernel runs (CPU,
  TPU).
- `pallas`: our flash-attention kernel (`pallas_kernels.flash_attention`) for mask descriptions (`MaskSpec`): no
  [L, S] array, fully masked tiles skipped; the Pallas interpreter where there is no GPU (slow: tests only).
- `cudnn`: cuDNN's fused attention through `jax.nn.dot_product_attention`, for the masks it expresses: rows that
  each hold one document from position 0 (`MaskSpec.single_documents`), causal or bidirectional, causal with a
  sliding window. Every other mask (packed rows, block-causal, the [canvas ; clean] layouts) goes to `pallas`.
- `pallas_mosaic`: the same kernel written for Pallas Mosaic GPU (`pallas_kernels.flash_attention_mosaic`: TMA,
  barriers, wgmma), for Hopper GPUs and bfloat16 / float16 activations; the Mosaic GPU interpreter where there is
  no GPU (tests only). Chosen only by name: `auto` does not pick it until it is measured on a GPU.
- `auto`: `pallas` on a GPU; elsewhere `xla`, or `chunked` for rows longer than 2 x CHUNK queries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model.config import ATTENTION_IMPLS
from pallas_kernels.attention_mask import MaskSpec
from pallas_kernels.attention_ops import flash_attention
from pallas_kernels.attention_mosaic_ops import DTYPES as MOSAIC_DTYPES
from pallas_kernels.attention_mosaic_ops import flash_attention_mosaic
from pallas_kernels.attention_chunked import chunked_attention
from pallas_kernels.attention_reference import attention_reference

CHUNK = 512  # queries per chunk of the `chunked` path

__all__ = ["ATTENTION_IMPLS", "attend", "cudnn_arguments", "cudnn_attention", "mosaic_attention", "resolve"]


def resolve(impl: str, mask) -> str:
  """The implementation that runs: 'xla', 'chunked', 'pallas', 'pallas_mosaic' or 'cudnn'."""
  if not isinstance(mask, MaskSpec):
    return "xla"
  if impl == "auto":
    if jax.default_backend() == "gpu":
      return "pallas"
    return "chunked" if mask.q.length > 2 * CHUNK else "xla"
  if impl == "cudnn" and cudnn_arguments(mask) is None:
    return "pallas"
  return impl


def attend(q_BLNH, k_BSKH, v_BSKH, mask, impl: str):
  """Grouped-query attention with scale 1.0 (QK-norm fixes the logit scale) under `mask` (a MaskSpec or a dense
  [B, L, S] bool array), computed by `resolve(impl, mask)`."""
  chosen = resolve(impl, mask)
  if chosen == "xla":
    return attention_reference(q_BLNH, k_BSKH, v_BSKH, mask)
  if chosen == "chunked":
    return chunked_attention(q_BLNH, k_BSKH, v_BSKH, mask, chunk=CHUNK)
  if chosen == "pallas":
    return flash_attention(q_BLNH, k_BSKH, v_BSKH, mask)
  if chosen == "pallas_mosaic":
    return mosaic_attention(q_BLNH, k_BSKH, v_BSKH, mask)
  if jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention_impl='cudnn' runs on NVIDIA GPUs only (backend here: "
                      f"{jax.default_backend()}); use 'auto', 'xla' or 'pallas'")
  return cudnn_attention(q_BLNH, k_BSKH, v_BSKH, mask)


def mosaic_attention(q_BLNH, k_BSKH, v_BSKH, spec: MaskSpec):
  """The Mosaic GPU kernel, after the checks that make a bad combination one ConfigError line: a GPU that is not a
  Hopper (sm_90), activations that are not bfloat16 / float16. Without a GPU it runs the Mosaic GPU interpreter."""
  if jax.default_backend() == "gpu":
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    if not capability.startswith("9."):
      raise ConfigError(f"model.attention_impl='pallas_mosaic' compiles for Hopper GPUs (sm_90a) only; this GPU is "
                        f"{jax.devices()[0].device_kind} (compute capability {capability or 'unknown'}): use 'pallas'")
  dtypes = sorted({str(x.dtype) for x in (q_BLNH, k_BSKH, v_BSKH)})
  if len(dtypes) != 1 or jnp.dtype(dtypes[0]) not in map(jnp.dtype, MOSAIC_DTYPES):
    raise ConfigError(f"model.attention_impl='pallas_mosaic' takes bfloat16 or float16 queries, keys and values "
                      f"(model.compute_dtype), got {dtypes}; use 'pallas'")
  return flash_attention_mosaic(q_BLNH, k_BSKH, v_BSKH, spec)


def cudnn_arguments(spec: MaskSpec) -> dict | None:
  """`jax.nn.dot_product_attention` keyword arguments that express `spec`, or None where cuDNN cannot: it knows
  causal and padding masks and a window to the left of causal queries, not segments, blocks or canvases."""
  if not spec.single_document or spec.q.has_canvas or spec.kind == "block_causal":
    return None
  if spec.window and spec.kind != "causal":
    return None
  kwargs = {"is_causal": spec.kind == "causal",
            "query_seq_lengths": jnp.sum(spec.q.segment_ids > 0, axis=1, dtype=jnp.int32),
            "key_value_seq_lengths": jnp.sum(spec.kv.segment_ids > 0, axis=1, dtype=jnp.int32)}
  if spec.window:
    kwargs["local_window_size"] = (spec.window - 1, 0)  # |pos_q - pos_k| < window, keys at or before the query
  return kwargs


def cudnn_attention(q_BLNH, k_BSKH, v_BSKH, spec: MaskSpec, *, implementation: str = "cudnn"):
  """`jax.nn.dot_product_attention` under a mask `cudnn_arguments` accepts. Padding queries (segment 0) may
  differ from the other paths: cuDNN masks them out, where the mask descriptions let padding see padding.
  `implementation='xla'` runs the same call without cuDNN (how the argument mapping is tested on a CPU)."""
  kwargs = cudnn_arguments(spec)
  if kwargs is None:
    raise ValueError("cudnn_attention: the mask is not one cuDNN expresses (see cudnn_arguments)")
  return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH.astype(k_BSKH.dtype), scale=1.0,
                                      implementation=implementation, **kwargs)

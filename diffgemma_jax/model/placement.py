"""Where the denoiser's work runs: the one object through which a device layout reaches the model.

The model never looks for a mesh. It is built with a `Placement` (`build_model(cfg, seed, placement)`; default
`LOCAL`) and every block asks it three times: to pin the residual stream between sublayers (`constrain`), to compute
attention (`attend`) and to run the routed experts (`routed_experts`); the denoiser asks it once more for the
order its layers run a row's tokens in (`reorder_row`, and `restore_row` before the logits: the load-balanced
context parallelism of `parallel/balance.py`). `LOCAL` leaves all three to the arrays' own
placement (one device, or GSPMD deciding); `parallel.placement.MeshPlacement` is a device mesh's: rows over the
batch axes (the sequence over `context`), the fused kernels per shard, and with an `expert` mesh axis > 1
expert-parallel dispatch. The placement is a static attribute of the model (part of its graphdef), so a jitted step
built from one graphdef always runs with the same placement.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from diffgemma_jax.model import attention_impl, dispatch


class Placement:
  """Everything where the arrays already are: activations unconstrained, experts dispatched on each device."""

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:  # pylint: disable=unused-argument
    """`x`, pinned to the sharding of its logical `axes` (here: left as it is)."""
    return x

  def reorder_row(self, inputs, mask):
    """(`inputs`, `mask`) in the order the layers run a row's tokens in: here the row's own. `inputs`: a pytree of
    [B, L, ...] arrays (None leaves allowed); `mask`: the self-attention's mask."""
    return inputs, mask

  def restore_row(self, x_BLD, mask):  # pylint: disable=unused-argument
    """The residual stream `x_BLD` back in row order (`reorder_row`'s inverse; `mask` as given to it)."""
    return x_BLD

  def lookup(self, table_VD: jax.Array, tokens_BL: jax.Array, dtype) -> jax.Array:
    """The token embeddings `table_VD[tokens_BL]` [B, L, D], cast to `dtype`."""
    return jnp.take(table_VD, tokens_BL, axis=0).astype(dtype)

  def logits(self, x_BLD: jax.Array, table_VD: jax.Array) -> jax.Array:
    """The tied logits `x_BLD @ table_VD.T` [B, L, V] in float32, the table cast to `x_BLD`'s dtype."""
    return jnp.einsum("BLD,VD->BLV", x_BLD, table_VD.astype(x_BLD.dtype), preferred_element_type=jnp.float32)

  def mix(self, weights_BLV: jax.Array, table_VD: jax.Array) -> jax.Array:
    """`weights_BLV @ table_VD` [B, L, D] in float32 (self-conditioning's expected embedding)."""
    return jnp.einsum("BLV,VD->BLD", weights_BLV, table_VD.astype(jnp.float32))

  def attend(self, q_BLNH, k_BSKH, v_BSKH, mask, impl: str) -> jax.Array:
    """Attention under `mask` by `model.attention_impl` (`attention_impl.attend`)."""
    return attention_impl.attend(q_BLNH, k_BSKH, v_BSKH, mask, impl)

  def routed_experts(self, x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *, backend: str,
                     compute_dtype, capacity_factor: float, dropless: bool,
                     collective: str) -> tuple[jax.Array, jax.Array | int]:
    """(y_TD, dropped (token, k) assignments): `dispatch.routed_experts`, which drops nothing."""
    del capacity_factor, dropless, collective  # expert-parallel settings
    return dispatch.routed_experts(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD,
                                   backend=backend, compute_dtype=compute_dtype), 0


LOCAL = Placement()

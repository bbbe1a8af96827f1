"""Routed-expert dispatch: permute tokens to their experts, run the experts' GeGLU grouped by expert, combine.

    routed_experts = permute -> grouped_geglu(backend) -> unpermute_combine

Backends (all dropless, all equal to `dense`):
  dense   every expert on every token, weighted by the routing (the reference; E/k times the work).
  ragged  `jax.lax.ragged_dot` on the expert-sorted rows.
  sorted  the fast CPU path: each expert's rows padded to whole row tiles so every tile belongs to one expert,
          then a loop over the used tiles, each a plain matmul against its expert's weights, with a hand-written
          VJP (XLA:CPU runs `ragged_dot` at a few percent of matmul speed).
  pallas  the `pallas_kernels.ops.gmm` grouped-matmul kernel, Pallas Triton backend (interpreted when not on a GPU).
  pallas_mosaic  the same grouped matmul on the Pallas Mosaic GPU backend (`pallas_kernels.ops_mosaic.gmm`: TMA,
          wgmma, Hopper sm_90a; Mosaic GPU interpret mode when not on a GPU). bf16/f16 compute only.
  auto    `pallas` on a GPU when the kernels are importable, `ragged` on a TPU (XLA lowers `ragged_dot` to the
          TPU's native grouped matmul there), else `sorted` (the CPU).

Row movement is written as gathers in both directions (`_take_rows`): each permutation is a bijection between
assignments and rows, so its transpose is the gather by the inverse index and no backward pass scatters rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffgemma_jax.errors import ConfigError

BACKENDS = ("dense", "ragged", "sorted", "pallas", "pallas_mosaic", "auto")
GROUPED_BACKENDS = ("ragged", "sorted", "pallas", "pallas_mosaic")
# wgmma multiplies 16-bit operands (float32 ones would run as TF32).
MOSAIC_COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _pallas_gmm():
  try:
    from pallas_kernels.ops import gmm  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("model.dispatch='pallas' needs the `pallas_kernels` package (pallas_kernels.ops.gmm); "
                      f"it could not be imported ({e}). Use 'sorted' or 'ragged' instead.") from e
  return gmm


def _mosaic_gmm():
  try:
    from pallas_kernels.gmm_mosaic import device_problem  # pylint: disable=import-outside-toplevel
    from pallas_kernels.ops_mosaic import gmm  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("model.dispatch='pallas_mosaic' needs `pallas_kernels.ops_mosaic` and jax's Pallas Mosaic GPU "
                      f"backend; it could not be imported ({e}). Use 'pallas', 'sorted' or 'ragged' instead.") from e
  if jax.default_backend() == "gpu":  # compiled (elsewhere the kernels run in Mosaic GPU interpret mode)
    problem = device_problem()
    if problem:
      raise ConfigError(f"model.dispatch='pallas_mosaic' {problem}; use 'pallas' (the Triton kernels) there")
  return gmm


def _pallas_available() -> bool:
  try:
    _pallas_gmm()
  except ImportError:
    return False
  return True


def resolve_backend(name: str) -> str:
  """Validates a backend name and resolves `auto` for the default device."""
  if name not in BACKENDS:
    raise ValueError(f"model.dispatch: unknown dispatch backend {name!r}; valid backends are {BACKENDS}")
  if name == "auto":
    platform = jax.default_backend()
    if platform == "gpu" and _pallas_available():
      return "pallas"
    return "ragged" if platform == "tpu" else "sorted"
  return name


# ---------------------------------------------------------------------------------------------------------------
# Row movement.


@jax.custom_vjp
def _take_rows(src_ND, index_M, inverse_N):
  """out[m] = src[index[m]], zero where index[m] == N (a padding row).

  `index` must be injective on its real entries and `inverse` its inverse (inverse[n] = m with index[m] = n, or
  M where n is never taken); the transpose is then the same gather with the two swapped.
  """
  return jnp.take(src_ND, index_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(src_ND, index_M, inverse_N):
  return _take_rows(src_ND, index_M, inverse_N), (index_M, inverse_N)


def _take_rows_bwd(residuals, g_MD):
  index_M, inverse_N = residuals
  return _take_rows(g_MD, inverse_N, index_M), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _inverse_permutation(index_M, num_sources: int):
  """inverse[n] = m where index[m] = n, else M; entries of `index` equal to num_sources are padding."""
  M = index_M.shape[0]
  return jnp.full((num_sources,), M, jnp.int32).at[index_M].set(jnp.arange(M, dtype=jnp.int32), mode="drop")


class Permutation(NamedTuple):
  """Where each (token, k) assignment went after sorting by expert; assignments are flat a = t * K + k."""
  assignment_of_row_M: jax.Array  # int32 [T*K]: sorted row m holds assignment assignment_of_row[m]
  row_of_assignment_A: jax.Array  # int32 [T*K]: the inverse
  group_sizes_E: jax.Array  # int32 [E]: rows per expert, in expert order


def sort_by_expert(expert_ids_TK, num_experts: int) -> Permutation:
  ids_A = expert_ids_TK.reshape(-1).astype(jnp.int32)
  order_M = jnp.argsort(ids_A, stable=True).astype(jnp.int32)
  group_sizes_E = jnp.bincount(ids_A, length=num_experts).astype(jnp.int32)
  return Permutation(order_M, _inverse_permutation(order_M, ids_A.shape[0]), group_sizes_E)


def _repeat_tokens(x_TD, top_k: int):
  """[T, D] -> [T*K, D] with row t*K+k = x[t]; its transpose sums the K copies (no scatter)."""
  T, D = x_TD.shape
  return jnp.broadcast_to(x_TD[:, None, :], (T, top_k, D)).reshape(T * top_k, D)


def permute(x_TD, expert_ids_TK, num_experts: int):
  """Rows of x, one per (token, k), sorted by expert: (x_sorted [T*K, D], group_sizes [E], permutation)."""
  perm = sort_by_expert(expert_ids_TK, num_experts)
  x_AD = _repeat_tokens(x_TD, expert_ids_TK.shape[1])
  return _take_rows(x_AD, perm.assignment_of_row_M, perm.row_of_assignment_A), perm.group_sizes_E, perm


def unpermute_combine(y_sorted_MD, perm: Permutation, combine_weights_TK):
  """y[t] = sum_k combine[t, k] * y_sorted[row of (t, k)], in float32."""
  T, K = combine_weights_TK.shape
  y_AD = _take_rows(y_sorted_MD.astype(jnp.float32), perm.row_of_assignment_A, perm.assignment_of_row_M)
  return jnp.einsum("TK,TKD->TD", combine_weights_TK.astype(jnp.float32), y_AD.reshape(T, K, -1))


# ---------------------------------------------------------------------------------------------------------------
# The expert function, dense reference.


def _geglu_hidden(gate_up, compute_dtype):
  """gelu(gate) * up in float32, cast to the compute dtype for the down projection."""
  F = gate_up.shape[-1] // 2
  gate, up = gate_up[..., :F], gate_up[..., F:]
  return (jax.nn.gelu(gate, approximate=True) * up).astype(compute_dtype)


def dense_experts(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *,
                  compute_dtype=jnp.float32):
  """Every expert on every token, weighted by the (mostly zero) [T, E] routing matrix. Reference only."""
  E = w_gate_up_EDF2.shape[0]
  x = x_TD.astype(compute_dtype)
  gate_up_ETF2 = jnp.einsum("TD,EDF->ETF", x, w_gate_up_EDF2.astype(compute_dtype),
                            preferred_element_type=jnp.float32)
  h_ETF = _geglu_hidden(gate_up_ETF2, compute_dtype)
  out_ETD = jnp.einsum("ETF,EFD->ETD", h_ETF, w_down_EFD.astype(compute_dtype),
                       preferred_element_type=jnp.float32)
  routing_TE = jnp.einsum("TK,TKE->TE", combine_weights_TK.astype(jnp.float32),
                          jax.nn.one_hot(expert_ids_TK, E, dtype=jnp.float32))
  return jnp.einsum("TE,ETD->TD", routing_TE, out_ETD)


# ---------------------------------------------------------------------------------------------------------------
# Grouped GeGLU on expert-sorted rows, one per backend.


def _ragged_geglu(x_MD, group_sizes_E, w_gate_up_EDF2, w_down_EFD, compute_dtype):
  gate_up = jax.lax.ragged_dot(x_MD.astype(compute_dtype), w_gate_up_EDF2.astype(compute_dtype), group_sizes_E,
                               preferred_element_type=jnp.float32)
  h = _geglu_hidden(gate_up, compute_dtype)
  return jax.lax.ragged_dot(h, w_down_EFD.astype(compute_dtype), group_sizes_E,
                            preferred_element_type=jnp.float32)


def _pallas_geglu(x_MD, group_sizes_E, w_gate_up_EDF2, w_down_EFD, compute_dtype):
  gmm = _pallas_gmm()  # interpret=None: Triton on a GPU backend, the Pallas interpreter elsewhere.
  gate_up = gmm(x_MD.astype(compute_dtype), w_gate_up_EDF2.astype(compute_dtype), group_sizes_E,
                preferred_element_type=jnp.float32)
  h = _geglu_hidden(gate_up, compute_dtype)
  return gmm(h, w_down_EFD.astype(compute_dtype), group_sizes_E, preferred_element_type=jnp.float32)


def _mosaic_geglu(x_MD, group_sizes_E, w_gate_up_EDF2, w_down_EFD, compute_dtype):
  if jnp.dtype(compute_dtype) not in MOSAIC_COMPUTE_DTYPES:
    raise ValueError(f"model.dispatch='pallas_mosaic' needs model.compute_dtype bfloat16 or float16 (wgmma's 16-bit "
                     f"operands), got {jnp.dtype(compute_dtype).name}; use dispatch 'pallas' for float32")
  gmm = _mosaic_gmm()  # interpret=None: compiled on a GPU backend, Mosaic GPU interpret mode elsewhere.
  gate_up = gmm(x_MD.astype(compute_dtype), w_gate_up_EDF2.astype(compute_dtype), group_sizes_E,
                preferred_element_type=jnp.float32)
  h = _geglu_hidden(gate_up, compute_dtype)
  return gmm(h, w_down_EFD.astype(compute_dtype), group_sizes_E, preferred_element_type=jnp.float32)


def choose_tile(num_rows: int, num_experts: int) -> int:
  """Row tile for `sorted`: about half an expert's mean share of rows, a power of two in [8, 128].

  Padding costs up to a tile per expert, so the tile shrinks when experts get few rows each.
  """
  mean_rows = max(num_rows // max(num_experts, 1), 1)
  tile = 8
  while tile < 128 and 2 * tile <= mean_rows // 2:
    tile *= 2
  return tile


class TileLayout(NamedTuple):
  """Rows padded so that each tile of `tile` slots holds rows of one expert."""
  row_of_slot_S: jax.Array  # int32 [S]: the sorted row in each slot, M for padding
  slot_of_row_M: jax.Array  # int32 [M]: the inverse (S for a row past sum(group_sizes))
  expert_of_tile_N: jax.Array  # int32 [N]: each tile's expert (tiles past the last used one repeat E-1)
  num_used_tiles: jax.Array  # int32 []: tiles holding rows; the rest are all padding


def tile_layout(group_sizes_E, num_rows: int, tile: int) -> TileLayout:
  """Static bound: N = (M + E * (tile - 1)) // tile tiles, enough for any split of M rows among E experts."""
  E = group_sizes_E.shape[0]
  num_tiles = (num_rows + E * (tile - 1)) // tile
  tiles_E = (group_sizes_E + tile - 1) // tile
  tile_end_E = jnp.cumsum(tiles_E)
  tile_start_E = tile_end_E - tiles_E
  row_end_E = jnp.cumsum(group_sizes_E)
  row_start_E = row_end_E - group_sizes_E
  rows_M = jnp.arange(num_rows, dtype=jnp.int32)
  expert_of_row_M = jnp.searchsorted(row_end_E, rows_M, side="right")
  valid_M = expert_of_row_M < E
  expert_of_row_M = jnp.minimum(expert_of_row_M, E - 1)
  slot_of_row_M = tile_start_E[expert_of_row_M] * tile + rows_M - row_start_E[expert_of_row_M]
  slot_of_row_M = jnp.where(valid_M, slot_of_row_M, num_tiles * tile).astype(jnp.int32)
  row_of_slot_S = _inverse_permutation(slot_of_row_M, num_tiles * tile)
  expert_of_tile_N = jnp.minimum(jnp.searchsorted(tile_end_E, jnp.arange(num_tiles), side="right"), E - 1)
  return TileLayout(row_of_slot_S, slot_of_row_M, expert_of_tile_N.astype(jnp.int32), tile_end_E[-1])


def _geglu_with_derivatives(gate_up_BF2, compute_dtype):
  """h = gelu(gate) * up, and the factors that turn dh into d(gate|up): [up * gelu'(gate), gelu(gate)]."""
  F = gate_up_BF2.shape[-1] // 2
  gate, up = gate_up_BF2[..., :F], gate_up_BF2[..., F:]
  gelu_gate, dgelu_gate = jax.jvp(lambda g: jax.nn.gelu(g, approximate=True), (gate,), (jnp.ones_like(gate),))
  h_BF = (gelu_gate * up).astype(compute_dtype)
  return h_BF, jnp.concatenate([up * dgelu_gate, gelu_gate], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tiled_geglu_loop(x_NBD, w_gate_up_EDF2, w_down_EFD, expert_of_tile_N, num_used_tiles, compute_dtype):
  return _tiled_geglu_loop_fwd(x_NBD, w_gate_up_EDF2, w_down_EFD, expert_of_tile_N, num_used_tiles,
                               compute_dtype)[0]


def _tiled_geglu_loop_fwd(x_NBD, w_gate_up_EDF2, w_down_EFD, expert_of_tile_N, num_used_tiles, compute_dtype):
  N, B, D = x_NBD.shape
  F = w_down_EFD.shape[1]

  def body(n, carry):
    y_NBD, h_NBF, dgate_up_factor_NBF2 = carry
    e = expert_of_tile_N[n]
    gate_up_BF2 = jnp.dot(x_NBD[n], w_gate_up_EDF2[e], preferred_element_type=jnp.float32)
    h_BF, factor_BF2 = _geglu_with_derivatives(gate_up_BF2, compute_dtype)
    y_BD = jnp.dot(h_BF, w_down_EFD[e], preferred_element_type=jnp.float32)
    return (jax.lax.dynamic_update_index_in_dim(y_NBD, y_BD, n, 0),
            jax.lax.dynamic_update_index_in_dim(h_NBF, h_BF, n, 0),
            jax.lax.dynamic_update_index_in_dim(dgate_up_factor_NBF2, factor_BF2, n, 0))

  init = (jnp.zeros((N, B, D), jnp.float32), jnp.zeros((N, B, F), compute_dtype),
          jnp.zeros((N, B, 2 * F), jnp.float32))
  y_NBD, h_NBF, factor_NBF2 = jax.lax.fori_loop(0, num_used_tiles, body, init)
  return y_NBD, (x_NBD, w_gate_up_EDF2, w_down_EFD, expert_of_tile_N, num_used_tiles, h_NBF, factor_NBF2)


def _tiled_geglu_loop_bwd(compute_dtype, residuals, g_NBD):
  x_NBD, w_gate_up_EDF2, w_down_EFD, expert_of_tile_N, num_used_tiles, h_NBF, factor_NBF2 = residuals
  E, F, D = w_down_EFD.shape
  g_NBD = g_NBD.astype(compute_dtype)
  # Weight gradients contract over a tile's rows. XLA:CPU runs dots whose left operand contracts its leading
  # axis far slower than plain [m, k] x [k, n] ones, so x and g are transposed once here, outside the loop.
  x_NDB = jnp.swapaxes(x_NBD, 1, 2)
  g_NDB = jnp.swapaxes(g_NBD, 1, 2)

  def body(n, carry):
    dx_NBD, dw_gate_up_EDF2, dw_down_EDF, acc_gate_up_DF2, acc_down_DF = carry
    e = expert_of_tile_N[n]
    dh_BF = jnp.dot(g_NBD[n], w_down_EFD[e].T, preferred_element_type=jnp.float32)
    dw_down_DF = jnp.dot(g_NDB[n], h_NBF[n], preferred_element_type=jnp.float32)
    dgate_up_BF2 = (jnp.concatenate([dh_BF, dh_BF], axis=-1) * factor_NBF2[n]).astype(compute_dtype)
    dx_BD = jnp.dot(dgate_up_BF2, w_gate_up_EDF2[e].T, preferred_element_type=jnp.float32)
    dw_gate_up_DF2 = jnp.dot(x_NDB[n], dgate_up_BF2, preferred_element_type=jnp.float32)
    # Tiles come sorted by expert: keep a running sum for the current expert and store it over dw[e] each
    # step (a plain write; the last write of an expert holds its full sum) rather than read-modify-write dw.
    same_expert = (n > 0) & (expert_of_tile_N[jnp.maximum(n - 1, 0)] == e)
    acc_gate_up_DF2 = jnp.where(same_expert, acc_gate_up_DF2, 0.0) + dw_gate_up_DF2
    acc_down_DF = jnp.where(same_expert, acc_down_DF, 0.0) + dw_down_DF
    return (jax.lax.dynamic_update_index_in_dim(dx_NBD, dx_BD.astype(dx_NBD.dtype), n, 0),
            jax.lax.dynamic_update_index_in_dim(dw_gate_up_EDF2, acc_gate_up_DF2, e, 0),
            jax.lax.dynamic_update_index_in_dim(dw_down_EDF, acc_down_DF, e, 0),
            acc_gate_up_DF2, acc_down_DF)

  init = (jnp.zeros_like(x_NBD), jnp.zeros(w_gate_up_EDF2.shape, jnp.float32), jnp.zeros((E, D, F), jnp.float32),
          jnp.zeros(w_gate_up_EDF2.shape[1:], jnp.float32), jnp.zeros((D, F), jnp.float32))
  dx_NBD, dw_gate_up, dw_down_EDF, _, _ = jax.lax.fori_loop(0, num_used_tiles, body, init)
  dw_down = jnp.swapaxes(dw_down_EDF, 1, 2)
  return (dx_NBD, dw_gate_up.astype(w_gate_up_EDF2.dtype), dw_down.astype(w_down_EFD.dtype), None, None)


_tiled_geglu_loop.defvjp(_tiled_geglu_loop_fwd, _tiled_geglu_loop_bwd)


def _tiled_geglu(x_SD, expert_of_tile_N, num_used_tiles, w_gate_up_EDF2, w_down_EFD, compute_dtype):
  """GeGLU on padded slots [N*tile, D]: a loop over the used row tiles, each against its expert's weights.

  A loop rather than one batched matmul: gathering a weight copy per tile costs as much as the matmuls on
  XLA:CPU, and its transpose is a scatter-add. The VJP is written out so the weight gradient accumulates in
  place per tile instead of through that scatter.
  """
  N = expert_of_tile_N.shape[0]
  S, D = x_SD.shape
  x_NBD = x_SD.astype(compute_dtype).reshape(N, S // N, D)
  y_NBD = _tiled_geglu_loop(x_NBD, w_gate_up_EDF2.astype(compute_dtype), w_down_EFD.astype(compute_dtype),
                            expert_of_tile_N, num_used_tiles, compute_dtype)
  return y_NBD.reshape(S, D)


def _sorted_geglu(x_MD, group_sizes_E, w_gate_up_EDF2, w_down_EFD, compute_dtype, tile=None):
  M = x_MD.shape[0]
  tile = tile or choose_tile(M, group_sizes_E.shape[0])
  layout = tile_layout(group_sizes_E, M, tile)
  x_SD = _take_rows(x_MD, layout.row_of_slot_S, layout.slot_of_row_M)
  y_SD = _tiled_geglu(x_SD, layout.expert_of_tile_N, layout.num_used_tiles, w_gate_up_EDF2, w_down_EFD,
                      compute_dtype)
  return _take_rows(y_SD, layout.slot_of_row_M, layout.row_of_slot_S)


_GROUPED = {"ragged": _ragged_geglu, "sorted": _sorted_geglu, "pallas": _pallas_geglu, "pallas_mosaic": _mosaic_geglu}


def grouped_geglu(x_sorted_MD, group_sizes_E, w_gate_up_EDF2, w_down_EFD, *, backend: str,
                  compute_dtype=jnp.float32):
  """GeGLU of expert-sorted rows: rows [start_e, start_e + group_sizes[e]) go through expert e.

  Returns float32 [M, D]; rows past sum(group_sizes) come back zero. This is the local compute that expert
  parallelism reuses on the rows its shard received.
  """
  backend = resolve_backend(backend)
  if backend not in _GROUPED:
    raise ValueError(f"model.dispatch: grouped_geglu needs one of {GROUPED_BACKENDS}, got {backend!r}")
  return _GROUPED[backend](x_sorted_MD, group_sizes_E.astype(jnp.int32), w_gate_up_EDF2, w_down_EFD,
                           compute_dtype)


def routed_experts(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *, backend: str,
                   compute_dtype=jnp.float32):
  """y[t] = sum_k combine[t, k] * GeGLU_{expert_ids[t, k]}(x[t]), combined in float32, returned in x's dtype."""
  backend = resolve_backend(backend)
  if backend == "dense":
    y_TD = dense_experts(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD,
                         compute_dtype=compute_dtype)
  elif backend == "sorted":
    y_TD = _sorted_routed(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, compute_dtype)
  else:
    x_sorted_MD, group_sizes_E, perm = permute(x_TD, expert_ids_TK, w_gate_up_EDF2.shape[0])
    y_sorted_MD = grouped_geglu(x_sorted_MD, group_sizes_E, w_gate_up_EDF2, w_down_EFD, backend=backend,
                                compute_dtype=compute_dtype)
    y_TD = unpermute_combine(y_sorted_MD, perm, combine_weights_TK)
  return y_TD.astype(x_TD.dtype)


def _sorted_routed(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, compute_dtype,
                   tile=None):
  """permute + sorted grouped GeGLU + unpermute with the sort and the tile padding fused into one gather."""
  T, K = expert_ids_TK.shape
  E = w_gate_up_EDF2.shape[0]
  tile = tile or choose_tile(T * K, E)
  perm = sort_by_expert(expert_ids_TK, E)
  layout = tile_layout(perm.group_sizes_E, T * K, tile)
  A = T * K
  row_of_slot_S = layout.row_of_slot_S
  assignment_of_slot_S = jnp.where(row_of_slot_S < A, jnp.take(perm.assignment_of_row_M, row_of_slot_S, mode="clip"),
                                   A)
  slot_of_assignment_A = layout.slot_of_row_M[perm.row_of_assignment_A]
  x_SD = _take_rows(_repeat_tokens(x_TD, K), assignment_of_slot_S, slot_of_assignment_A)
  y_SD = _tiled_geglu(x_SD, layout.expert_of_tile_N, layout.num_used_tiles, w_gate_up_EDF2, w_down_EFD,
                      compute_dtype)
  fused = Permutation(assignment_of_slot_S, slot_of_assignment_A, perm.group_sizes_E)
  return unpermute_combine(y_SD, fused, combine_weights_TK)


"""Expert-parallel MoE dispatch: routed tokens travel to the shard that owns their expert and back.

Outside the MoE, token rows are split over every batch axis (`data`, `fsdp`, `expert`); the expert weights are split
over `expert` (experts) and `fsdp` (the embed dimension). Inside one `shard_map`, each shard:

  1. sorts its local (token, k) assignments by destination shard (expert id // experts per shard), keeping token
     order within a destination, so the assignments dropped at a full destination are the latest tokens';
  2. packs the rows into a [shards, capacity, D] buffer with the local expert id of each row beside it
     (capacity = ceil(capacity_factor * T_local * K / shards); dropless: T_local * K, the worst case);
  3. exchanges buffers with `all_to_all` over `expert`, gathers the fsdp slices of its experts' weights;
  4. sorts the received rows by local expert and runs `dispatch.grouped_geglu`, the single-device backends;
  5. sends the results back with `all_to_all` and combines the k outputs of each token in float32.

`collective="ragged_all_to_all"` sends exactly the routed rows instead of fixed-capacity buffers (dropless). XLA:CPU
has no ragged all-to-all, so it is refused on CPU meshes.

Assignments past a destination's capacity contribute nothing to their token's output; their number, summed over all
shards, is returned so the trainer can log it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model import dispatch
from diffgemma_jax.model.config import EXPERT_COLLECTIVES as COLLECTIVES
from diffgemma_jax.parallel.rules import BATCH_AXES, CONTEXT_AXIS

EXPERT_AXIS = "expert"
FSDP_AXIS = "fsdp"
# Tokens are the rows (over the batch axes) times the sequence (over `context`), flattened row-major.
TOKEN_AXES = BATCH_AXES + (CONTEXT_AXIS,)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = True):
  """`jax.shard_map` where it exists (JAX >= 0.7), else the experimental one (`check_rep` was its name)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
  from jax.experimental.shard_map import shard_map as legacy_shard_map  # pylint: disable=g-import-not-at-top
  return legacy_shard_map(f, mesh, in_specs, out_specs, check_rep=check_vma)


def expert_shards(mesh: Mesh) -> int:
  return int(mesh.shape[EXPERT_AXIS]) if EXPERT_AXIS in mesh.axis_names else 1


def token_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes that split token rows outside (and inside) the MoE."""
  return tuple(a for a in TOKEN_AXES if a in mesh.axis_names)


def dispatches_expert_parallel(mesh: Mesh, num_tokens: int) -> bool:
  """Whether the MoE dispatches over `mesh`: an expert axis > 1 and tokens that split over the token axes.
  Otherwise each device dispatches its rows under GSPMD, which computes the same function (sampling one sequence on
  an 8-device mesh takes that path)."""
  if expert_shards(mesh) == 1:
    return False
  return num_tokens % math.prod(mesh.shape[a] for a in token_axes(mesh)) == 0


def expert_capacity(tokens_per_shard: int, top_k: int, num_expert_shards: int, capacity_factor: float,
                    dropless: bool) -> int:
  """Rows one shard may send to each destination shard. Dropless is the worst case: every assignment to one."""
  worst = tokens_per_shard * top_k
  if dropless:
    return worst
  if capacity_factor <= 0:
    raise ConfigError(f"model.capacity_factor={capacity_factor}: must be > 0 (or set model.dropless=True)")
  return max(1, min(worst, math.ceil(capacity_factor * worst / num_expert_shards)))


def check_expert_parallel(mesh: Mesh, num_experts: int, num_tokens: int | None = None,
                          collective: str = "all_to_all") -> None:
  """Errors a user can fix, raised before anything is traced or compiled."""
  shards = expert_shards(mesh)
  if num_experts % shards:
    raise ConfigError(f"model.num_experts={num_experts} is not divisible by the expert mesh axis ({shards} shards); "
                      f"choose mesh.shape with an expert size that divides {num_experts}")
  if collective not in COLLECTIVES:
    raise ConfigError(f"model.expert_collective={collective!r}: valid collectives are {COLLECTIVES}")
  if collective == "ragged_all_to_all":
    platforms = {d.platform for d in mesh.devices.flat}
    if "cpu" in platforms:
      raise ConfigError("model.expert_collective='ragged_all_to_all' needs a backend with a ragged all-to-all "
                        "(GPU or TPU); XLA:CPU has none. Use model.expert_collective='all_to_all' on CPU")
  if num_tokens is not None:
    rows = math.prod(mesh.shape[a] for a in token_axes(mesh))
    if num_tokens % rows:
      raise ConfigError(f"{num_tokens} tokens do not split over the {rows} token shards "
                        f"({' x '.join(token_axes(mesh))}); make the batch size divisible by {rows}")


class SendPlan(NamedTuple):
  """Where each of one shard's A = T*K assignments (token-major, k-minor) goes."""
  order_A: jax.Array  # assignments sorted by destination shard, token order kept within a destination
  dest_A: jax.Array  # destination shard of each assignment
  slot_A: jax.Array  # its row in the destination's buffer
  counts_S: jax.Array  # assignments per destination shard
  starts_S: jax.Array  # first sorted position of each destination


def plan_sends(expert_ids_TK, experts_per_shard: int, num_shards: int) -> SendPlan:
  ids_A = expert_ids_TK.reshape(-1).astype(jnp.int32)
  A = ids_A.shape[0]
  dest_A = ids_A // experts_per_shard
  order_A = jnp.argsort(dest_A, stable=True).astype(jnp.int32)
  counts_S = jnp.sum(dest_A[:, None] == jnp.arange(num_shards, dtype=jnp.int32)[None, :], axis=0, dtype=jnp.int32)
  starts_S = jnp.cumsum(counts_S) - counts_S
  rank_sorted_A = jnp.arange(A, dtype=jnp.int32) - starts_S[dest_A[order_A]]
  slot_A = jnp.zeros((A,), jnp.int32).at[order_A].set(rank_sorted_A)
  return SendPlan(order_A, dest_A, slot_A, counts_S, starts_S)


def _inverse_permutation(order):
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _local_experts(rows_RD, local_expert_R, w_gate_up_EDF2, w_down_EFD, *, backend, compute_dtype):
  """Received rows through this shard's experts; rows marked E_local (empty buffer slots) give zeros.

  `dense` (the reference) runs every local expert on every row; the grouped backends sort the rows by local expert
  first, exactly as single-device dispatch does.
  """
  num_local = w_gate_up_EDF2.shape[0]
  backend = dispatch.resolve_backend(backend)
  if backend == "dense":  # one_hot of the E_local marker is all zeros, so empty slots get no expert
    return dispatch.dense_experts(rows_RD, local_expert_R[:, None], jnp.ones(local_expert_R.shape + (1,)),
                                  w_gate_up_EDF2, w_down_EFD, compute_dtype=compute_dtype)
  order_R = jnp.argsort(local_expert_R, stable=True)
  sorted_expert_R = local_expert_R[order_R]
  group_sizes_E = jnp.sum(sorted_expert_R[:, None] == jnp.arange(num_local, dtype=jnp.int32)[None, :], axis=0,
                          dtype=jnp.int32)
  # Empty slots sort last, past sum(group_sizes), where the grouped backends return zeros.
  y_sorted_RD = dispatch.grouped_geglu(rows_RD[order_R], group_sizes_E, w_gate_up_EDF2, w_down_EFD, backend=backend,
                                       compute_dtype=compute_dtype)
  return y_sorted_RD[_inverse_permutation(order_R)]


def _combine(y_AD, kept_A, combine_weights_TK):
  T, K = combine_weights_TK.shape
  y_AD = jnp.where(kept_A[:, None], y_AD.astype(jnp.float32), 0.0)
  return jnp.einsum("TKD,TK->TD", y_AD.reshape(T, K, -1), combine_weights_TK.astype(jnp.float32))


def _all_to_all_dispatch(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up, w_down, *, capacity: int, backend,
                         compute_dtype):
  """Body of the shard_map for fixed-capacity all_to_all; local views of every array."""
  T, K = expert_ids_TK.shape
  num_shards = jax.lax.psum(1, EXPERT_AXIS)
  num_local = w_gate_up.shape[0]
  plan = plan_sends(expert_ids_TK, num_local, num_shards)
  A = T * K
  ids_A = expert_ids_TK.reshape(A).astype(jnp.int32)

  # Gather the buffer rows: slot (s, c) holds the c-th assignment sent to shard s, if there is one.
  slot_C = jnp.arange(capacity, dtype=jnp.int32)
  valid_SC = slot_C[None, :] < plan.counts_S[:, None]
  assign_SC = plan.order_A[jnp.clip(plan.starts_S[:, None] + slot_C[None, :], 0, A - 1)]
  x_send_SCD = jnp.where(valid_SC[..., None], x_TD.astype(compute_dtype)[assign_SC // K], 0)
  expert_send_SC = jnp.where(valid_SC, ids_A[assign_SC] % num_local, num_local)

  x_recv_SCD = jax.lax.all_to_all(x_send_SCD, EXPERT_AXIS, 0, 0, tiled=True)
  expert_recv_SC = jax.lax.all_to_all(expert_send_SC, EXPERT_AXIS, 0, 0, tiled=True)
  S, C, D = x_recv_SCD.shape
  y_recv_RD = _local_experts(x_recv_SCD.reshape(S * C, D), expert_recv_SC.reshape(S * C), w_gate_up, w_down,
                             backend=backend, compute_dtype=compute_dtype)
  y_back_RD = jax.lax.all_to_all(y_recv_RD.reshape(S, C, D), EXPERT_AXIS, 0, 0, tiled=True).reshape(S * C, D)

  kept_A = plan.slot_A < capacity
  y_AD = y_back_RD[plan.dest_A * capacity + jnp.minimum(plan.slot_A, capacity - 1)]
  return _combine(y_AD, kept_A, combine_weights_TK), jnp.sum(~kept_A, dtype=jnp.int32)


def _ragged_dispatch(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up, w_down, *, backend, compute_dtype):
  """Body of the shard_map for ragged_all_to_all: exactly the routed rows travel; never drops."""
  T, K = expert_ids_TK.shape
  A = T * K
  num_shards = jax.lax.psum(1, EXPERT_AXIS)
  num_local = w_gate_up.shape[0]
  plan = plan_sends(expert_ids_TK, num_local, num_shards)
  ids_A = expert_ids_TK.reshape(A).astype(jnp.int32)
  x_sorted_AD = x_TD.astype(compute_dtype)[plan.order_A // K]
  expert_sorted_A = ids_A[plan.order_A] % num_local

  counts_SS = jax.lax.all_gather(plan.counts_S, EXPERT_AXIS)  # [source, destination]
  me = jax.lax.axis_index(EXPERT_AXIS)
  before_SS = jnp.cumsum(counts_SS, axis=0) - counts_SS  # rows of lower sources ahead in each destination
  recv_sizes_S = counts_SS[:, me]
  recv_starts_S = jnp.cumsum(recv_sizes_S) - recv_sizes_S
  R = num_shards * A  # the worst case: every source sends all its rows here
  D = x_TD.shape[-1]
  args = (plan.starts_S, plan.counts_S, before_SS[me], recv_sizes_S)
  x_recv_RD = jax.lax.ragged_all_to_all(x_sorted_AD, jnp.zeros((R, D), compute_dtype), *args, axis_name=EXPERT_AXIS)
  expert_recv_R = jax.lax.ragged_all_to_all(expert_sorted_A, jnp.full((R,), num_local, jnp.int32), *args,
                                            axis_name=EXPERT_AXIS)
  y_recv_RD = _local_experts(x_recv_RD, expert_recv_R, w_gate_up, w_down, backend=backend,
                             compute_dtype=compute_dtype)
  # Back: what came from source s returns to where s keeps its rows for this shard.
  source_starts_S = (jnp.cumsum(counts_SS, axis=1) - counts_SS)[:, me]
  y_sorted_AD = jax.lax.ragged_all_to_all(y_recv_RD, jnp.zeros((A, D), y_recv_RD.dtype), recv_starts_S,
                                          recv_sizes_S, source_starts_S, plan.counts_S, axis_name=EXPERT_AXIS)
  y_AD = y_sorted_AD[_inverse_permutation(plan.order_A)]
  return _combine(y_AD, jnp.ones((A,), bool), combine_weights_TK), jnp.zeros((), jnp.int32)


def _weight_spec(mesh: Mesh, num_dims: int, embed_dim_index: int, embed_size: int) -> P:
  """Experts over `expert`; the embed dimension over `fsdp` when the fsdp size divides it."""
  spec: list = [EXPERT_AXIS if EXPERT_AXIS in mesh.axis_names else None] + [None] * (num_dims - 1)
  if FSDP_AXIS in mesh.axis_names and mesh.shape[FSDP_AXIS] > 1 and embed_size % mesh.shape[FSDP_AXIS] == 0:
    spec[embed_dim_index] = FSDP_AXIS
  return P(*spec)


def expert_weight_specs(mesh: Mesh, embed_size: int) -> tuple[P, P]:
  """The shard_map specs of the experts' weights [E, D, 2F] and [E, F, D] (`_weight_spec`)."""
  return _weight_spec(mesh, 3, 1, embed_size), _weight_spec(mesh, 3, 2, embed_size)


def gather_fsdp_slices(w_gate_up, w_down, gate_up_spec: P, compute_dtype):
  """Inside a shard_map: the experts' weights with the embed slices their specs split over `fsdp` gathered (their
  gradient is reduce-scattered back); as they are where the specs do not split it.

  Each slice is cast to `compute_dtype` (the dtype every dispatch backend casts the weights to before its
  matmuls) before it is gathered: a bfloat16 run gathers half the bytes of its float32 parameters, in the forward
  and again where the backward rematerializes the forward. The gradient is reduce-scattered in the parameters'
  dtype, as a gather before the cast did, so both give the same numbers (`_gather_cast`)."""
  if gate_up_spec[1] != FSDP_AXIS:
    return w_gate_up, w_down
  dtype = jnp.dtype(compute_dtype)
  return _gather_cast(w_gate_up, 1, dtype), _gather_cast(w_down, 2, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_cast(w, axis: int, dtype):
  """`all_gather(w.astype(dtype))` over fsdp along `axis`, whose gradient is the cotangent cast to w's dtype and
  reduce-scattered: what the gather of w followed by the cast gives (the cast's transpose casts back before the
  gather's transpose sums), without gathering w at its own width."""
  return jax.lax.all_gather(w.astype(dtype), FSDP_AXIS, axis=axis, tiled=True)


def _gather_cast_fwd(w, axis, dtype):
  return _gather_cast(w, axis, dtype), jnp.zeros((0,), w.dtype)  # an empty residual carries w's dtype


def _gather_cast_bwd(axis, dtype, residual, cotangent):
  del dtype
  return (jax.lax.psum_scatter(cotangent.astype(residual.dtype), FSDP_AXIS, scatter_dimension=axis, tiled=True),)


_gather_cast.defvjp(_gather_cast_fwd, _gather_cast_bwd)


def expert_parallel_routed_experts(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *,
                                   mesh: Mesh, backend: str, compute_dtype, capacity_factor: float = 1.0,
                                   dropless: bool = False, collective: str = "all_to_all",
                                   check_vma: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """`dispatch.routed_experts` with experts split over the mesh's `expert` axis.

  Takes and returns global arrays (call it under `jit`); tokens are split over the token axes inside. Returns
  (y_TD in x's dtype, number of dropped (token, k) assignments over the whole batch, int32). `check_vma=None`
  checks replication types for `dense` and `ragged` only: the pallas kernel's outputs and the `sorted` tile loop's
  carry are built without varying-axes types, which the check would reject (the computation is correct either way;
  the tests run every backend on meshes with replicated weights).
  """
  T, K = expert_ids_TK.shape
  E, D, _ = w_gate_up_EDF2.shape
  check_expert_parallel(mesh, E, T, collective)
  rows = token_axes(mesh)
  tokens_per_shard = T // math.prod(mesh.shape[a] for a in rows)
  num_shards = expert_shards(mesh)
  gate_up_spec, down_spec = expert_weight_specs(mesh, D)
  row_spec = P(rows or None, None)
  if check_vma is None:
    check_vma = dispatch.resolve_backend(backend) in ("dense", "ragged")

  def body(x, ids, weights, w_gate_up, w_down):
    w_gate_up, w_down = gather_fsdp_slices(w_gate_up, w_down, gate_up_spec, compute_dtype)
    if collective == "ragged_all_to_all":
      y, dropped = _ragged_dispatch(x, ids, weights, w_gate_up, w_down, backend=backend, compute_dtype=compute_dtype)
    else:
      capacity = expert_capacity(tokens_per_shard, K, num_shards, capacity_factor, dropless)
      y, dropped = _all_to_all_dispatch(x, ids, weights, w_gate_up, w_down, capacity=capacity, backend=backend,
                                        compute_dtype=compute_dtype)
    return y.astype(x.dtype), jax.lax.psum(dropped, rows) if rows else dropped

  fn = shard_map(body, mesh=mesh, in_specs=(row_spec, row_spec, row_spec, gate_up_spec, down_spec),
                 out_specs=(row_spec, P()), check_vma=check_vma)
  return fn(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD)


def replicated_token_routed_experts(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *,
                                    mesh: Mesh, backend: str, compute_dtype) -> jax.Array:
  """`dispatch.routed_experts` with the experts split over the mesh's `expert` axis, for tokens that do not split
  over the token axes (sampling fewer rows than devices): every expert shard sees every token, runs the (token, k)
  assignments routed to its own experts, and a psum over `expert` adds the shards' parts. Never drops.

  The experts' weights stay where they are. Under GSPMD instead, a dispatch it cannot split by expert (the grouped
  kernels, the sorted tile loop) gathers every expert's weights on every device at every model call: at
  DiffusionGemma's sizes 22.8B parameters a call. The `fsdp` slices of the local experts are gathered as in
  training (`gather_fsdp_slices`)."""
  T, K = expert_ids_TK.shape
  E, D, _ = w_gate_up_EDF2.shape
  check_expert_parallel(mesh, E)
  gate_up_spec, down_spec = expert_weight_specs(mesh, D)

  def body(x, ids, weights, w_gate_up, w_down):
    w_gate_up, w_down = gather_fsdp_slices(w_gate_up, w_down, gate_up_spec, compute_dtype)
    num_local = w_gate_up.shape[0]
    local_A = ids.reshape(T * K).astype(jnp.int32) - jax.lax.axis_index(EXPERT_AXIS) * num_local
    mine_A = (local_A >= 0) & (local_A < num_local)
    y_AD = _local_experts(jnp.repeat(x.astype(compute_dtype), K, axis=0), jnp.where(mine_A, local_A, num_local),
                          w_gate_up, w_down, backend=backend, compute_dtype=compute_dtype)
    return jax.lax.psum(_combine(y_AD, mine_A, weights), EXPERT_AXIS).astype(x.dtype)

  # unchecked replication: the fsdp gather's custom VJP leaves its output typed as varying over fsdp, though every
  # fsdp shard holds the same weights and so computes the same sum (the tests compare with one device)
  fn = shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), gate_up_spec, down_spec), out_specs=P(), check_vma=False)
  return fn(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD)


__all__: Sequence[str] = ("COLLECTIVES", "SendPlan", "check_expert_parallel", "expert_capacity",
                          "dispatches_expert_parallel", "expert_parallel_routed_experts", "expert_shards", "plan_sends",
                          "expert_weight_specs", "gather_fsdp_slices", "replicated_token_routed_experts", "shard_map",
                          "token_axes")

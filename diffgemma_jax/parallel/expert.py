"""Expert-parallel MoE dispatch: routed tokens travel to the shards that own their experts and back.

Outside the MoE, token rows are split over every batch axis (`data`, `fsdp`, `expert`); the expert weights are split
over `expert` (experts) and `fsdp` (the embed dimension). Inside one `shard_map`, each shard:

  1. pairs each local token with the destination shards that own any of its top-k experts (`plan_pairs`): a token
     travels once to each such shard, not once per expert, with the local ids and combine weights of the experts
     it has there. At DiffusionGemma's top-8 of 128 experts over 8 shards a token reaches 5.3 shards on average,
     so a third fewer rows travel than (token, k) assignments;
  2. packs the pairs into a [shards, capacity.send, D] buffer, by destination, in token order (so the pairs a full
     buffer drops are the latest tokens'), and exchanges it with `all_to_all` over `expert`; gathers the fsdp
     slices of its experts' weights;
  3. expands what it received into (row, local expert) assignments, at most `capacity.receive` of them (taken slot
     by slot across sources, so a full shard drops every source's latest tokens alike), runs them grouped by
     expert through `dispatch.grouped_geglu` (the single-device backends), and weights and sums each row's outputs
     in float32;
  4. sends one row per pair back with `all_to_all`; each token adds the rows of its pairs in float32.

`expert_capacity` sizes both buffers from `model.capacity_factor` and an even routing; `dropless` takes the worst
case (every token to every shard), which is T_local rows per destination: what fixed capacity 1.0 already sends at
top-8 over 8 shards.

`collective="ragged_all_to_all"` sends exactly the pairs instead of fixed-capacity buffers (dropless). XLA:CPU has
no ragged all-to-all, so it is refused on CPU meshes.

Assignments past either capacity contribute nothing to their token's output; their number, summed over all shards,
is returned so the trainer can log it.
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


class Capacity(NamedTuple):
  """Static buffer sizes of fixed-capacity expert-parallel dispatch on one shard."""
  send: int  # token rows it may send each destination shard (a token travels once per shard it routes to)
  receive: int  # (token, expert) assignments it may run through its own experts, from all sources together


def routed_share(num_experts: int, top_k: int, num_expert_shards: int) -> float:
  """The chance that a token routes to a given expert shard when its top_k distinct experts are spread evenly:
  1 - C(E - E/S, k) / C(E, k). Times the tokens per shard, the rows one shard sends each destination shard under
  an even routing (at DiffusionGemma's 128 experts, top-8 over 8 shards: 0.667, against top_k/S = 1.0 rows a
  token if every (token, k) assignment travelled)."""
  local = num_experts // num_expert_shards
  return 1.0 - math.comb(num_experts - local, top_k) / math.comb(num_experts, top_k)


def expert_capacity(tokens_per_shard: int, top_k: int, num_experts: int, num_expert_shards: int,
                    capacity_factor: float, dropless: bool) -> Capacity:
  """`capacity_factor` times what an even routing needs: ceil(cf * T_local * routed_share) rows to each
  destination, ceil(cf * T_local * top_k) assignments received; never above the worst case (every local token to
  every destination, each naming min(top_k, E/S) of its experts), which is what `dropless` takes."""
  local_experts = num_experts // num_expert_shards
  send_worst = tokens_per_shard
  if dropless:
    return Capacity(send_worst, num_expert_shards * send_worst * min(top_k, local_experts))
  if capacity_factor <= 0:
    raise ConfigError(f"model.capacity_factor={capacity_factor}: must be > 0 (or set model.dropless=True)")
  share = routed_share(num_experts, top_k, num_expert_shards)
  send = max(1, min(send_worst, math.ceil(capacity_factor * tokens_per_shard * share)))
  receive_worst = num_expert_shards * send * min(top_k, local_experts)
  return Capacity(send, max(1, min(receive_worst, math.ceil(capacity_factor * tokens_per_shard * top_k))))


def check_expert_parallel(mesh: Mesh, num_experts: int, num_tokens: int | None = None,
                          collective: str = "all_to_all") -> None:
  """Errors a user can fix, raised before anything is traced or compiled."""
  shards = expert_shards(mesh)
  if num_experts % shards:
    raise ConfigError(f"model.num_experts={num_experts} is not divisible by the expert mesh axis ({shards} shards); "
                      f"choose mesh.shape with an expert size that divides {num_experts}")
  if collective not in COLLECTIVES:
    raise ConfigError(f"model.expert_collective={collective!r}: valid collectives are {COLLECTIVES}")
  check_collective_backend(mesh, collective)
  if num_tokens is not None:
    rows = math.prod(mesh.shape[a] for a in token_axes(mesh))
    if num_tokens % rows:
      raise ConfigError(f"{num_tokens} tokens do not split over the {rows} token shards "
                        f"({' x '.join(token_axes(mesh))}); make the batch size divisible by {rows}")


def check_collective_backend(mesh: Mesh, collective: str) -> None:
  """`ragged_all_to_all` is refused on a mesh with CPU devices: XLA:CPU has no ragged all-to-all (unless the tests
  put their emulation in `_ragged_all_to_all`)."""
  if collective != "ragged_all_to_all" or _ragged_all_to_all is not jax.lax.ragged_all_to_all:
    return
  if any(d.platform == "cpu" for d in mesh.devices.flat):
    raise ConfigError("model.expert_collective='ragged_all_to_all' needs a backend with a ragged all-to-all "
                      "(GPU or TPU); XLA:CPU has none. Use model.expert_collective='all_to_all' on CPU")


# The collective the ragged path calls; tests put an emulation built from all_to_all here to run that path on CPU.
_ragged_all_to_all = jax.lax.ragged_all_to_all


class PairPlan(NamedTuple):
  """One shard's (token, destination shard) pairs. A token travels once to each shard that owns any of its top-k
  experts, carrying the ids and combine weights of the experts it has there; the destination weights and sums its
  experts' outputs, so one row comes back per pair."""
  dest_TK: jax.Array  # destination shard of each (token, k) assignment
  first_TK: jax.Array  # whether k is the token's first choice on that shard (the one that stands for the pair)
  rank_TK: jax.Array  # the pair's rank among this shard's pairs to that destination, in token order
  counts_S: jax.Array  # pairs per destination shard


def plan_pairs(expert_ids_TK, experts_per_shard: int, num_shards: int) -> PairPlan:
  ids_TK = expert_ids_TK.astype(jnp.int32)
  T, K = ids_TK.shape
  dest_TK = ids_TK // experts_per_shard
  hits_TS = jnp.any(dest_TK[:, :, None] == jnp.arange(num_shards, dtype=jnp.int32), axis=1)
  rank_TS = jnp.cumsum(hits_TS, axis=0, dtype=jnp.int32) - 1
  same_TKK = dest_TK[:, :, None] == dest_TK[:, None, :]
  earlier_KK = jnp.arange(K)[None, :] < jnp.arange(K)[:, None]  # [k, k']: k' comes before k
  first_TK = ~jnp.any(same_TKK & earlier_KK[None], axis=2)
  return PairPlan(dest_TK, first_TK, jnp.take_along_axis(rank_TS, dest_TK, axis=1),
                  jnp.sum(hits_TS, axis=0, dtype=jnp.int32))


def _pair_slots(plan: PairPlan, starts_S, size: int, room: int | None = None):
  """Where each pair goes in a send buffer of `size` slots, by destination: the pair of token t and shard s at
  slot starts_S[s] + its rank. Returns (token_P, dest_P), T and the shard count in empty slots; pairs ranked at or
  past `room` (a fixed capacity per destination) are not written."""
  T, K = plan.dest_TK.shape
  num_shards = plan.counts_S.shape[0]
  written_TK = plan.first_TK if room is None else plan.first_TK & (plan.rank_TK < room)
  slot = jnp.where(written_TK, starts_S[plan.dest_TK] + plan.rank_TK, size).reshape(-1)
  token_TK = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, K))
  return (jnp.full((size,), T, jnp.int32).at[slot].set(token_TK.reshape(-1), mode="drop"),
          jnp.full((size,), num_shards, jnp.int32).at[slot].set(plan.dest_TK.reshape(-1), mode="drop"))


def _regroup(a, outer: int, inner: int):
  """[outer * inner, ...] -> [inner * outer, ...]: the two leading groupings swapped."""
  return a.reshape((outer, inner) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def _inverse_permutation(order):
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _pair_rows(x_TD, expert_ids_TK, combine_weights_TK, token_P, dest_P, num_local: int, compute_dtype):
  """What travels for each pair slot (token `token_P`, T for an empty slot, to shard `dest_P`): the token's row,
  and for each k the local id of its expert on that shard (`num_local` where the expert is elsewhere, or the slot
  is empty) with its combine weight (0 there)."""
  T = x_TD.shape[0]
  valid_P = token_P < T
  token_P = jnp.minimum(token_P, T - 1)
  ids_PK = expert_ids_TK.astype(jnp.int32)[token_P]
  mine_PK = valid_P[:, None] & (ids_PK // num_local == dest_P[:, None])
  x_PD = jnp.where(valid_P[:, None], x_TD.astype(compute_dtype)[token_P], 0)
  return (x_PD, jnp.where(mine_PK, ids_PK % num_local, num_local),
          jnp.where(mine_PK, combine_weights_TK.astype(jnp.float32)[token_P], 0.0))


def _expert_outputs(x_RD, row_N, expert_N, w_gate_up_EDF2, w_down_EFD, *, backend, compute_dtype):
  """Rows x[row_N] through this shard's experts expert_N (E_local, an empty slot, gives zeros), in the order the
  backend runs them: returns (y [N, D] float32, order [N]), y[n] being the output of assignment order[n].

  `dense` (the reference) runs every local expert on every row, in the given order; the grouped backends sort the
  assignments by local expert first, exactly as single-device dispatch does, and gather each row once, straight
  into that order.
  """
  num_local = w_gate_up_EDF2.shape[0]
  backend = dispatch.resolve_backend(backend)
  if backend == "dense":  # one_hot of the E_local marker is all zeros, so empty slots get no expert
    y = dispatch.dense_experts(x_RD[row_N], expert_N[:, None], jnp.ones(expert_N.shape + (1,)), w_gate_up_EDF2,
                               w_down_EFD, compute_dtype=compute_dtype)
    return y, jnp.arange(expert_N.shape[0], dtype=jnp.int32)
  order_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
  group_sizes_E = jnp.sum(expert_N[:, None] == jnp.arange(num_local, dtype=jnp.int32)[None, :], axis=0,
                          dtype=jnp.int32)
  # Empty slots sort last, past sum(group_sizes), where the grouped backends return zeros.
  return dispatch.grouped_geglu(x_RD[row_N[order_N]], group_sizes_E, w_gate_up_EDF2, w_down_EFD, backend=backend,
                                compute_dtype=compute_dtype), order_N


def _combine(y_AD, kept_A, combine_weights_TK):
  T, K = combine_weights_TK.shape
  y_AD = jnp.where(kept_A[:, None], y_AD.astype(jnp.float32), 0.0)
  return jnp.einsum("TKD,TK->TD", y_AD.reshape(T, K, -1), combine_weights_TK.astype(jnp.float32))


def _received_pairs(x_RD, local_RK, weights_RK, capacity: int, w_gate_up, w_down, *, backend, compute_dtype):
  """The pair rows a shard received, through its experts: each row once per local expert it names, the first
  `capacity` (row, k) assignments in row order kept and the rest dropped; the outputs weighted and summed per row
  in float32. Returns ([R, D] in compute_dtype, the number of assignments dropped here)."""
  R, K = local_RK.shape
  num_local = w_gate_up.shape[0]
  named_J = (local_RK < num_local).reshape(R * K)
  position_J = jnp.cumsum(named_J, dtype=jnp.int32) - 1
  kept_J = named_J & (position_J < capacity)
  target_J = jnp.where(kept_J, position_J, capacity)  # out of range: not written
  row_X = jnp.full((capacity,), R, jnp.int32).at[target_J].set(jnp.arange(R * K, dtype=jnp.int32) // K, mode="drop")
  expert_X = jnp.full((capacity,), num_local, jnp.int32).at[target_J].set(local_RK.reshape(R * K), mode="drop")
  weight_X = jnp.zeros((capacity,), jnp.float32).at[target_J].set(weights_RK.reshape(R * K), mode="drop")
  y_XD, order_X = _expert_outputs(x_RD, jnp.minimum(row_X, R - 1), expert_X, w_gate_up, w_down, backend=backend,
                                  compute_dtype=compute_dtype)
  # Summed per row straight from the backend's order (the empty tail carries row R, which segment_sum drops).
  y_RD = jax.ops.segment_sum(y_XD.astype(jnp.float32) * weight_X[order_X][:, None], row_X[order_X], num_segments=R)
  return y_RD.astype(compute_dtype), jnp.sum(named_J & ~kept_J, dtype=jnp.int32)


def _combine_pairs(y_PD, token_P, num_tokens: int):
  """y[t] = the sum of the rows that came back for t's pairs, in float32 (empty slots carry token T: dropped)."""
  return jax.ops.segment_sum(y_PD.astype(jnp.float32), token_P, num_segments=num_tokens)


def _all_to_all_dispatch(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up, w_down, *, capacity: Capacity, backend,
                         compute_dtype):
  """Body of the shard_map for fixed-capacity all_to_all; local views of every array."""
  T = expert_ids_TK.shape[0]
  num_shards = jax.lax.psum(1, EXPERT_AXIS)
  num_local = w_gate_up.shape[0]
  plan = plan_pairs(expert_ids_TK, num_local, num_shards)
  C = capacity.send
  # Slot (s, c) of the send buffer holds the c-th token (in token order) that routes to shard s; a pair past the
  # capacity is not written, and all of its assignments are dropped.
  token_P, dest_P = _pair_slots(plan, jnp.arange(num_shards, dtype=jnp.int32) * C, num_shards * C, room=C)
  sends = _pair_rows(x_TD, expert_ids_TK, combine_weights_TK, token_P, dest_P, num_local, compute_dtype)

  def exchange(a):  # [S * C, ...] by destination -> [S * C, ...] by source
    a = a.reshape((num_shards, C) + a.shape[1:])
    return jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True).reshape((num_shards * C,) + a.shape[2:])

  x_RD, local_RK, weights_RK = map(exchange, sends)
  # Slot-major order (c, then source), so a full receive buffer drops the latest tokens of every source alike.
  by_slot = functools.partial(_regroup, outer=num_shards, inner=C)
  y_RD, dropped_here = _received_pairs(by_slot(x_RD), by_slot(local_RK), by_slot(weights_RK), capacity.receive,
                                       w_gate_up, w_down, backend=backend, compute_dtype=compute_dtype)
  y_PD = exchange(_regroup(y_RD, C, num_shards))
  dropped_on_the_way = jnp.sum(plan.rank_TK >= C, dtype=jnp.int32)
  return _combine_pairs(y_PD, token_P, T), dropped_on_the_way + dropped_here


def _ragged_dispatch(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up, w_down, *, backend, compute_dtype):
  """Body of the shard_map for ragged_all_to_all: exactly the pairs travel; never drops."""
  T, K = expert_ids_TK.shape
  num_shards = jax.lax.psum(1, EXPERT_AXIS)
  num_local = w_gate_up.shape[0]
  plan = plan_pairs(expert_ids_TK, num_local, num_shards)
  P_max = T * min(K, num_shards)  # every token to min(k, shards) destinations
  starts_S = jnp.cumsum(plan.counts_S) - plan.counts_S
  token_P, dest_P = _pair_slots(plan, starts_S, P_max)
  sends = _pair_rows(x_TD, expert_ids_TK, combine_weights_TK, token_P, dest_P, num_local, compute_dtype)

  counts_SS = jax.lax.all_gather(plan.counts_S, EXPERT_AXIS)  # [source, destination]
  me = jax.lax.axis_index(EXPERT_AXIS)
  before_SS = jnp.cumsum(counts_SS, axis=0) - counts_SS  # rows of lower sources ahead in each destination
  recv_sizes_S = counts_SS[:, me]
  recv_starts_S = jnp.cumsum(recv_sizes_S) - recv_sizes_S
  R = num_shards * T  # the worst case: every source sends each of its tokens here
  args = (starts_S, plan.counts_S, before_SS[me], recv_sizes_S)
  x_RD, local_RK, weights_RK = (
      _ragged_all_to_all(a, jnp.full((R,) + a.shape[1:], fill, a.dtype), *args, axis_name=EXPERT_AXIS)
      for a, fill in zip(sends, (0, num_local, 0)))
  y_RD, _ = _received_pairs(x_RD, local_RK, weights_RK, R * min(K, num_local), w_gate_up, w_down, backend=backend,
                            compute_dtype=compute_dtype)
  # Back: what came from source s returns to where s keeps its rows for this shard.
  source_starts_S = (jnp.cumsum(counts_SS, axis=1) - counts_SS)[:, me]
  y_PD = _ragged_all_to_all(y_RD, jnp.zeros((P_max,) + y_RD.shape[1:], y_RD.dtype), recv_starts_S, recv_sizes_S,
                            source_starts_S, plan.counts_S, axis_name=EXPERT_AXIS)
  return _combine_pairs(y_PD, token_P, T), jnp.zeros((), jnp.int32)


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
      capacity = expert_capacity(tokens_per_shard, K, E, num_shards, capacity_factor, dropless)
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
    y_ND, order_N = _expert_outputs(x.astype(compute_dtype), jnp.arange(T * K, dtype=jnp.int32) // K,
                                    jnp.where(mine_A, local_A, num_local), w_gate_up, w_down, backend=backend,
                                    compute_dtype=compute_dtype)
    y_AD = y_ND[_inverse_permutation(order_N)]
    return jax.lax.psum(_combine(y_AD, mine_A, weights), EXPERT_AXIS).astype(x.dtype)

  # unchecked replication: the fsdp gather's custom VJP leaves its output typed as varying over fsdp, though every
  # fsdp shard holds the same weights and so computes the same sum (the tests compare with one device)
  fn = shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), gate_up_spec, down_spec), out_specs=P(), check_vma=False)
  return fn(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD)


__all__: Sequence[str] = ("COLLECTIVES", "Capacity", "PairPlan", "check_collective_backend", "check_expert_parallel",
                          "expert_capacity", "dispatches_expert_parallel", "expert_parallel_routed_experts",
                          "expert_shards", "plan_pairs", "routed_share", "expert_weight_specs", "gather_fsdp_slices",
                          "replicated_token_routed_experts", "shard_map", "token_axes")

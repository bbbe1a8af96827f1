"""Kernels on a mesh: the fused attention and the grouped-matmul dispatch run once per shard, on the shard's rows.

XLA partitions what it can see through: einsums, gathers, elementwise work. A Pallas kernel is a custom call it
cannot partition, so under plain GSPMD it gathers the kernel's operands onto every device and runs the whole batch
there (each of 8 data-parallel GPUs would compute all 8 shards' attention). A sort over the token axis is the same
story for the MoE: `ragged` and `sorted` dispatch sort the routed rows of the whole batch. Measured on 8 CPU
devices, `ragged` dispatch under GSPMD did 8x the FLOPs per device of the same dispatch per shard.

So on a mesh these run inside `shard_map`, the way the expert-parallel dispatch (`expert.py`) already does:

- attention (`sharded_attend`): rows over the batch axes (`data`, `fsdp`, `expert`), heads over `tensor` where it
  divides the query heads and divides or is a multiple of the key/value heads (fewer KV heads than shards: each is
  repeated to one per shard), and with a `context` axis the queries' sequence over `context`
  with every key and value gathered (context parallelism: see docs/attention.md). The kernel sees a shard's own
  rows and heads; the mask description's per-token arrays are split like the tokens they describe.
- routed experts without expert parallelism (`token_parallel_routed_experts`): the tokens over every token axis,
  each shard sorting and dispatching its own; the experts' FSDP slices gathered inside, their gradient
  reduce-scattered by the transpose.

Dense masks (the samplers' KV-cache windows) and the `dense` dispatch stay with GSPMD, which partitions them well.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffgemma_jax.model import attention_impl, dispatch
from diffgemma_jax.parallel import expert
from diffgemma_jax.parallel.rules import BATCH_AXES, CONTEXT_AXIS
from pallas_kernels.attention_mask import MaskSpec

TENSOR_AXIS = "tensor"


def axis_size(mesh: Mesh, name: str) -> int:
  return int(mesh.shape[name]) if name in mesh.axis_names else 1


def split_axes(mesh: Mesh, axes, size: int) -> tuple[str, ...]:
  """The axes of `axes` (size > 1) in the mesh, if together they divide `size`; else none (nothing split)."""
  present = tuple(a for a in axes if axis_size(mesh, a) > 1)
  return present if size % math.prod(axis_size(mesh, a) for a in present) == 0 else ()


def _spec(*entries) -> P:
  return P(*(None if not e else e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in entries))


def _mask_specs(mask: MaskSpec, rows, context) -> MaskSpec:
  """`mask` with a PartitionSpec at each leaf: the queries' arrays split like the queries, the keys' by rows."""
  side = lambda tokens, spec: jax.tree.map(lambda _: spec, tokens)  # noqa: E731
  return dataclasses.replace(mask, q=side(mask.q, _spec(rows, context)), kv=side(mask.kv, _spec(rows, None)),
                             starts=side(mask.starts, _spec(rows, context)))


def sharded_attend(q_BLNH, k_BSKH, v_BSKH, mask, impl: str, mesh: Mesh):
  """`attention_impl.attend` on `mesh`: the Pallas kernel (and with a `context` axis every implementation) per
  shard inside a shard_map; elsewhere (dense masks, the XLA paths without context parallelism) under GSPMD."""
  chosen = attention_impl.resolve(impl, mask)
  B, L, N, _ = q_BLNH.shape
  num_kv = k_BSKH.shape[2]
  context = (CONTEXT_AXIS,) if isinstance(mask, MaskSpec) and split_axes(mesh, (CONTEXT_AXIS,), L) else ()
  if chosen not in ("pallas", "pallas_mosaic") and not context:
    return attention_impl.attend(q_BLNH, k_BSKH, v_BSKH, mask, chosen)
  rows = split_axes(mesh, BATCH_AXES, B)
  tensor = axis_size(mesh, TENSOR_AXIS)
  heads = (TENSOR_AXIS,) if tensor > 1 and N % tensor == 0 and (num_kv % tensor == 0 or tensor % num_kv == 0) else ()
  if heads and num_kv % tensor:
    # Fewer KV heads than tensor shards (DiffusionGemma's global layers: 2): each KV head repeated so that every
    # shard holds the one its query heads read (query head n reads KV head n // (N / num_kv) either way); the
    # repeat's gradient sums the copies back.
    k_BSKH, v_BSKH = (jnp.repeat(x, tensor // num_kv, axis=2) for x in (k_BSKH, v_BSKH))
  if not (rows or context or heads):
    return attention_impl.attend(q_BLNH, k_BSKH, v_BSKH, mask, chosen)
  if context and mask.q.has_canvas and mask.window and mask.starts is None:
    # A shard's queries are a part of the row: their canvases' starts are found over the whole row.
    mask = dataclasses.replace(mask, starts=mask.window_starts())
  q_spec, kv_spec = _spec(rows, context, heads, None), _spec(rows, None, heads, None)
  fn = expert.shard_map(lambda q, k, v, m: attention_impl.attend(q, k, v, m, chosen), mesh=mesh,
                        in_specs=(q_spec, kv_spec, kv_spec, _mask_specs(mask, rows, context)), out_specs=q_spec,
                        check_vma=False)
  return fn(q_BLNH, k_BSKH, v_BSKH, mask)


def token_shards(mesh: Mesh, num_tokens: int) -> tuple[str, ...]:
  """The token axes (size > 1) that split `num_tokens` tokens evenly; none where they do not."""
  return split_axes(mesh, expert.token_axes(mesh), num_tokens)


def dispatches_token_parallel(mesh: Mesh, num_tokens: int, backend: str) -> bool:
  """Whether the MoE runs a grouped backend per token shard (no expert parallelism, tokens split evenly)."""
  return (dispatch.resolve_backend(backend) in dispatch.GROUPED_BACKENDS and expert.expert_shards(mesh) == 1
          and bool(token_shards(mesh, num_tokens)))


def token_parallel_routed_experts(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD, *,
                                  mesh: Mesh, backend: str, compute_dtype):
  """`dispatch.routed_experts` with each token shard dispatching its own tokens to every expert (global arrays in
  and out; call it under jit). Drops nothing."""
  D = x_TD.shape[1]
  rows = token_shards(mesh, x_TD.shape[0])
  row_spec = _spec(rows, None)
  gate_up_spec, down_spec = expert.expert_weight_specs(mesh, D)

  def body(x, ids, weights, w_gate_up, w_down):
    w_gate_up, w_down = expert.gather_fsdp_slices(w_gate_up, w_down, gate_up_spec, compute_dtype)
    return dispatch.routed_experts(x, ids, weights, w_gate_up, w_down, backend=backend,
                                   compute_dtype=compute_dtype).astype(x.dtype)

  fn = expert.shard_map(body, mesh=mesh, in_specs=(row_spec, row_spec, row_spec, gate_up_spec, down_spec),
                        out_specs=row_spec, check_vma=False)
  return fn(x_TD, expert_ids_TK, combine_weights_TK, w_gate_up_EDF2, w_down_EFD)

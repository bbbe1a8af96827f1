"""The `chunked` attention path: `attention_reference`'s arithmetic a chunk of queries at a time, each chunk against
only the keys it can see.

Memory is O(chunk x S) per head instead of O(L x S): a chunk's logits are made, used and remade in the backward
pass. A query's softmax runs over all its keys inside one chunk, so nothing is rescaled between chunks and the
result is the reference's.

Which keys a chunk multiplies against. The keys are cut into blocks of `key_block`; `plan_chunks` finds, for each
chunk, the key blocks holding a key that some query of the chunk may see (`tile_visits` with one-query tiles: each
query's own attributes against each key block's (min, max) summaries, conservative: a block holding a visible key
is never dropped). A chunk then runs on the narrowest span of a static ladder (`span_ladder`: widths in key
blocks) that holds all of its blocks, gathered in their order; the span's other slots hold blocks the chunk does
not see (the rule masks them, as it does in the reference) and keys past the row's end are masked. A chunk whose
blocks fit no narrow span (a causal row's last chunks, a bidirectional document, an unusual layout) runs on every
key, as before. Masked keys add exactly 0 to a softmax, so every span gives the reference's values; a query that
sees no key outputs zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.attention_mask import MaskSpec, tile_visits, visit_lists
from pallas_kernels.attention_reference import attention_reference

KEY_BLOCK = 128  # keys per block of the spans a chunk is narrowed to


def span_ladder(spec: MaskSpec, chunk: int, key_block: int, num_key_blocks: int) -> tuple[int, ...]:
  """The narrow spans (in key blocks, ascending, each fewer than `num_key_blocks`) a chunk may run on.

  The first holds what a chunk of self-attention with a window sees (its queries and the window before them, and
  after them unless the rule is causal with no canvas; one block more for blocks that do not align with the
  chunk) or, without a window, two chunks' worth; each next one doubles, so a causal row's chunks, whose keys grow
  with their index, find a span at most twice what they need. Only run-time efficiency rests on these widths:
  `plan_chunks` checks which one each chunk fits."""
  one_sided = spec.kind == "causal" and not spec.q.has_canvas
  reach = chunk + (1 if one_sided else 2) * (spec.window - 1) if spec.window else 2 * chunk
  spans = []
  width = -(-reach // key_block) + 1
  while width < num_key_blocks:
    spans.append(width)
    width *= 2
  return tuple(spans)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """Which keys each chunk of queries runs on.

  `blocks[c, b, :counts[c, b]]`: the key blocks chunk c of row b may see, ascending (the rest of the row: the
  blocks it does not see); `rung[c]`: the index into `spans` of the narrowest span holding every row's blocks,
  `len(spans)` (every key) where none does."""
  rung: jax.Array  # [num_chunks] int32
  blocks: jax.Array  # [num_chunks, B, max(spans)] int32
  counts: jax.Array  # [num_chunks, B] int32
  spans: tuple[int, ...] = dataclasses.field(metadata={"static": True})


def plan_chunks(spec: MaskSpec, chunk: int, key_block: int, spans: tuple[int, ...]) -> ChunkPlan:
  """The ChunkPlan of `spec`'s queries in chunks of `chunk` over keys in blocks of `key_block`."""
  B, L = spec.q.segment_ids.shape
  num_chunks = -(-L // chunk)
  visits_BLJ = tile_visits(spec, 1, key_block)
  visits_BLJ = jnp.pad(visits_BLJ, ((0, 0), (0, num_chunks * chunk - L), (0, 0)))  # padded queries see nothing
  visits_BCJ = jnp.any(visits_BLJ.reshape(B, num_chunks, chunk, -1), axis=2)
  lists_BCJ, counts_BC = visit_lists(visits_BCJ)
  rung = jnp.searchsorted(jnp.asarray(spans, jnp.int32), jnp.max(counts_BC, axis=0), side="left")
  widest = max(spans, default=0)
  return ChunkPlan(rung.astype(jnp.int32), jnp.moveaxis(lists_BCJ[:, :, :widest], 1, 0), counts_BC.T, spans)


def chunked_attention(q_BLNH, k_BSKH, v_BSKH, spec: MaskSpec, *, chunk: int = 512, key_block: int = KEY_BLOCK,
                      spans: tuple[int, ...] | None = None, plan: ChunkPlan | None = None, precision=None):
  """`attention_reference(q, k, v, spec)` a chunk of `chunk` queries at a time, each chunk on the keys it can see
  (module docstring). `spans`: the narrow spans in key blocks (default `span_ladder`; `()` runs every chunk on
  every key); `plan`: a ChunkPlan to follow instead of `plan_chunks`' (tests force a span with it)."""
  B, L, N, H = q_BLNH.shape
  S = k_BSKH.shape[1]
  if L <= chunk:
    return attention_reference(q_BLNH, k_BSKH, v_BSKH, spec, precision=precision)
  num_key_blocks = -(-S // key_block)
  if plan is None:
    spans = span_ladder(spec, chunk, key_block, num_key_blocks) if spans is None else tuple(spans)
    plan = plan_chunks(spec, chunk, key_block, spans) if spans else None
  q = spec.q
  starts = spec.window_starts() if q.has_canvas and spec.window else None
  num_chunks = -(-L // chunk)

  def chunks(x):  # [B, L, ...] -> [num_chunks, B, chunk, ...]; padded queries are cut from the output
    if x is None:
      return None
    x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - L)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((B, num_chunks, chunk) + x.shape[2:]), 1, 0)

  q_tokens = jax.tree.map(chunks, q)
  if plan is None:
    attend = jax.checkpoint(lambda xs: attention_reference(
        xs[0], k_BSKH, v_BSKH, spec.dense_rows(xs[1], xs[2]), precision=precision))
    out = jax.lax.map(attend, (chunks(q_BLNH), q_tokens, chunks(starts)))
  else:
    attend = _chunk_attention(spec, S, key_block, plan.spans, precision)
    # Keys padded to whole blocks (the padding is masked by position, never by its attributes).
    pad = lambda x: jnp.pad(x, [(0, 0), (0, num_key_blocks * key_block - S)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    k, v, kv_tokens = (pad(k_BSKH), pad(v_BSKH), jax.tree.map(pad, spec.kv)) if S % key_block else (
        k_BSKH, v_BSKH, spec.kv)
    out = jax.lax.map(lambda xs: attend(xs[0], k, v, kv_tokens, *xs[1:]),
                      (chunks(q_BLNH), q_tokens, chunks(starts), plan.blocks, plan.rung))
  return jnp.moveaxis(out, 0, 1).reshape(B, num_chunks * chunk, N, v_BSKH.shape[-1])[:, :L]


def _chunk_attention(spec: MaskSpec, num_keys: int, key_block: int, spans: tuple[int, ...], precision):
  """attend(q_chunk, k, v, kv_tokens, q_tokens, starts, blocks, rung): one chunk's attention on span
  `spans[rung]` (every key for rung == len(spans)); k, v and kv_tokens padded to whole key blocks. A custom VJP
  that saves only its inputs and recomputes the chunk on the same span in the backward pass (one `lax.switch`
  each way: differentiating through the switch would zero-fill every other span's residuals)."""

  def on_span(width):
    def attend(q_chunk, k, v, kv_tokens, q_tokens, starts, blocks):
      B, padded = kv_tokens.segment_ids.shape
      index = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (B, padded))
      if width is not None:  # the chunk's first `width` blocks (a permutation of all: no block twice)
        # Per row (vmapped: a gather whose row axis is a batching axis). Indexing the batch flattened to
        # [B * blocks] made GSPMD build every row's gathered keys on every device and all-reduce them: most of the
        # 576 GiB a step per device `bench/collectives.py` counted for the 26B config on 8 devices.
        def take(x):
          def row(x_S, blocks_W):
            x_JK = x_S.reshape((padded // key_block, key_block) + x_S.shape[1:])
            return x_JK[blocks_W].reshape((width * key_block,) + x_S.shape[1:])
          return jax.vmap(row)(x, blocks[:, :width])
        k, v, kv_tokens, index = take(k), take(v), jax.tree.map(take, kv_tokens), take(index)
      mask_BCS = dataclasses.replace(spec, kv=kv_tokens).dense_rows(q_tokens, starts) & (index < num_keys)[:, None]
      return attention_reference(q_chunk, k, v, mask_BCS, precision=precision)
    return attend

  branches = [on_span(width) for width in spans] + [on_span(None)]

  @jax.custom_vjp
  def attend(q_chunk, k, v, kv_tokens, q_tokens, starts, blocks, rung):
    return jax.lax.switch(rung, branches, q_chunk, k, v, kv_tokens, q_tokens, starts, blocks)

  def forward(*args):
    return attend(*args), args

  def backward(args, d_out):
    q_chunk, k, v, kv_tokens, q_tokens, starts, blocks, rung = args

    def gradients(branch):
      return lambda q_chunk, k, v: jax.vjp(
          lambda q_chunk, k, v: branch(q_chunk, k, v, kv_tokens, q_tokens, starts, blocks), q_chunk, k, v)[1](d_out)

    return *jax.lax.switch(rung, [gradients(b) for b in branches], q_chunk, k, v), None, None, None, None, None

  attend.defvjp(forward, backward)
  return attend

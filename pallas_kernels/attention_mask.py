"""Attention masks as descriptions: per-token attributes plus a few static flags, evaluated where needed.

A `MaskSpec` says who may attend to whom without an [L, S] array: each query and each key carries its segment id
(0 = padding, which attends to padding only), its position within its document and, for the block-diffusion
layouts, whether it is a canvas (decoder) token and its block index. Static flags name the rule between clean
tokens (`kind`), the block size of `block_causal`, and the sliding window. The rule (`visible`) is one function of
those attributes; it runs on whole rows for the dense reference (`MaskSpec.dense`), on [tile_q, tile_k] pieces
inside the flash-attention kernels, and on per-tile summaries to find the tiles that are entirely masked
(`tile_visits`), which the kernels never visit.

The rule, for a query q and a key k of the same segment:
- both clean: `kind` decides: `bidirectional` (always), `causal` (pos_k <= pos_q), `block_causal`
  (pos_k // block_size <= pos_q // block_size);
- canvas query, canvas key: same block (a canvas block is bidirectional within itself);
- canvas query, clean key: the key's block is strictly before the query's (clean blocks j < i);
- clean query, canvas key: never;
and with a sliding window W also |pos_q - pos_k| < W, except that a canvas query measures its window over clean
keys from the first position of its canvas (`window_starts`): the released DiffusionGemma reads the clean prefix
from a sliding-window cache holding the W - 1 tokens before the canvas, whatever the query's own position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CLEAN_RULES = ("bidirectional", "causal", "block_causal")
# "No token of this kind here" in per-tile summaries: beyond any position, block or segment id.
_FAR = 1 << 29


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tokens:
  """One side of an attention (its queries or its keys): [B, T] int32 per-token attributes.

  `canvas` (bool) and `blocks` (int32; -1 for clean-only context such as an SFT prompt) come together, for the
  block-diffusion layouts, or are both None."""
  segment_ids: jax.Array
  positions: jax.Array
  canvas: jax.Array | None = None
  blocks: jax.Array | None = None

  def __post_init__(self):
    if (self.canvas is None) != (self.blocks is None):
      raise ValueError("Tokens: canvas and blocks are given together (a block-diffusion layout) or not at all")

  @property
  def length(self) -> int:
    return self.segment_ids.shape[-1]

  @property
  def has_canvas(self) -> bool:
    return self.canvas is not None


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Who may attend to whom: queries `q`, keys `kv` and the static rule (module docstring).

  `kind` is the rule between clean tokens, `block_size` its block for `block_causal`, `window` the sliding window
  (0: none). `starts`: the queries' `window_starts`, computed over the whole row, for queries that are a part of
  it or out of order (a context shard's, a load-balanced row's), where runs of canvas tokens no longer show them. `single_document` promises that every row is one document from position 0 followed by padding
  (what library kernels such as cuDNN's can express). `MaskSpec.packed` and `MaskSpec.canvas_clean` build the
  objectives' layouts. A pytree: the token arrays are its leaves, the flags its static structure, so it passes
  through jit, scan and custom_vjp."""
  q: Tokens
  kv: Tokens
  kind: str = "bidirectional"
  block_size: int = 0
  window: int = 0
  single_document: bool = False
  starts: jax.Array | None = None

  def __post_init__(self):
    if self.kind not in CLEAN_RULES:
      raise ValueError(f"MaskSpec.kind={self.kind!r}: valid kinds are {CLEAN_RULES}")
    if self.kind == "block_causal" and (not isinstance(self.block_size, int) or self.block_size <= 0):
      raise ValueError(f"block_causal masks need a positive block_size, got {self.block_size!r}")
    if not isinstance(self.window, int) or self.window < 0:
      raise ValueError(f"MaskSpec.window={self.window!r}: a non-negative integer (0: no sliding window)")
    if self.q.has_canvas != self.kv.has_canvas:
      raise ValueError("MaskSpec: queries and keys both carry canvas/blocks attributes or neither does")

  # ---- constructors --------------------------------------------------------------------------------------------
  @classmethod
  def packed(cls, kind: str, segment_ids_BL, positions_BL, *, block_size: int = 0) -> "MaskSpec":
    """Self-attention over packed rows (the `make_mask` kinds)."""
    tokens = Tokens(jnp.asarray(segment_ids_BL, jnp.int32), jnp.asarray(positions_BL, jnp.int32))
    return cls(tokens, tokens, kind=kind, block_size=block_size or 0)

  @classmethod
  def single_documents(cls, kind: str, lengths_B, length: int) -> "MaskSpec":
    """Self-attention over rows that each hold one document of `lengths_B[b]` tokens from position 0, padded to
    `length`."""
    index_L = jnp.arange(length, dtype=jnp.int32)
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    segments = (index_L[None, :] < lengths_B[:, None]).astype(jnp.int32)
    tokens = Tokens(segments, jnp.broadcast_to(index_L, segments.shape))
    return cls(tokens, tokens, kind=kind, single_document=True)

  @classmethod
  def canvas_clean(cls, canvas_segments_BC, canvas_positions_BC, canvas_blocks_BC, clean_segments_BL,
                   clean_positions_BL, clean_blocks_BL) -> "MaskSpec":
    """Self-attention over the block objectives' row [canvas (C tokens) ; clean (L tokens)]: clean tokens causal,
    canvas block i sees itself and the clean blocks before it."""
    cat = lambda a, b: jnp.concatenate([jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)], axis=1)  # noqa: E731
    canvas = jnp.concatenate([jnp.ones(jnp.shape(canvas_segments_BC), bool),
                              jnp.zeros(jnp.shape(clean_segments_BL), bool)], axis=1)
    tokens = Tokens(cat(canvas_segments_BC, clean_segments_BL), cat(canvas_positions_BC, clean_positions_BL),
                    canvas, cat(canvas_blocks_BC, clean_blocks_BL))
    return cls(tokens, tokens, kind="causal")

  def with_window(self, window: int | None) -> "MaskSpec":
    return dataclasses.replace(self, window=int(window or 0))

  # ---- evaluation ----------------------------------------------------------------------------------------------
  def window_starts(self) -> jax.Array:
    """[B, L] where each query's window over clean keys is measured from: a canvas query's canvas start (the
    smallest position among the canvas tokens of its segment and block), any other query's own position.

    A canvas group (canvas tokens of one segment and block) must be one contiguous run of queries, as in every
    layout the objectives and samplers build; the minimum is taken per run, in O(L)."""
    q = self.q
    if self.starts is not None:
      return self.starts
    if not q.has_canvas:
      return q.positions
    key = (q.segment_ids, q.blocks, q.canvas.astype(jnp.int32))
    L = q.positions.shape[1]
    changed = jnp.zeros(q.positions.shape, bool).at[:, 1:].set(
        jnp.any(jnp.stack([k[:, 1:] != k[:, :-1] for k in key]), axis=0))
    run_BL = jnp.cumsum(changed, axis=1)
    # per row (vmapped: rows split over devices stay split; one segment_min over the flattened batch made every
    # device scatter into, and all-reduce, a [B * L] array of the whole batch at every layer)
    run_min_BL = jax.vmap(lambda p, r: jax.ops.segment_min(p, r, num_segments=L))(q.positions, run_BL)
    starts = jnp.take_along_axis(run_min_BL, run_BL, axis=1)
    return jnp.where(q.canvas, starts, q.positions).astype(q.positions.dtype)

  def dense(self) -> jax.Array:
    """[B, L, S] bool, True where query l may attend to key s: the reference the fused kernels are tested against,
    and what the `xla` attention path masks its logits with."""
    return self.dense_rows(self.q, self.window_starts() if self.q.has_canvas and self.window else None)

  def dense_rows(self, q: Tokens, starts=None) -> jax.Array:
    """[B, l, S] bool of the queries `q` (this spec's, or some of them: a chunk) against every key; `starts`: those
    queries' `window_starts`, taken over the whole row (a canvas may begin before the chunk)."""
    kv = self.kv
    col = lambda x: None if x is None else x[:, :, None]  # noqa: E731
    row = lambda x: None if x is None else x[:, None, :]  # noqa: E731
    return visible(self, col(q.segment_ids), col(q.positions), row(kv.segment_ids), row(kv.positions),
                   col(q.canvas), row(kv.canvas), col(q.blocks), row(kv.blocks), col(starts))


jax.tree_util.register_dataclass(MaskSpec, data_fields=["q", "kv", "starts"],
                                 meta_fields=["kind", "block_size", "window", "single_document"])


def visible(spec: MaskSpec, seg_q, pos_q, seg_k, pos_k, canvas_q=None, canvas_k=None, block_q=None, block_k=None,
            start_q=None):
  """The rule of the module docstring on broadcastable attribute arrays (queries along one axis, keys along the
  other); only `spec`'s static flags are read. `start_q` is `window_starts` (needed for a canvas with a window).
  Written with comparisons and selects only, so the same code lowers inside a Triton kernel."""
  ok = seg_q == seg_k
  if spec.kind == "causal":
    clean = pos_k <= pos_q
  elif spec.kind == "block_causal":
    clean = jax.lax.div(pos_k, spec.block_size) <= jax.lax.div(pos_q, spec.block_size)  # positions are >= 0
  else:
    clean = None
  near = None
  if spec.window:
    near = (pos_q - pos_k < spec.window) & (pos_k - pos_q < spec.window)
  if canvas_q is None:
    for term in (clean, near):
      if term is not None:
        ok = ok & term
    return ok
  # `canvas_k == False`, not logical_not: jax 0.12's Mosaic GPU lowering of `not` on a bool register array fails
  # ("Register bitwidth in target type must be divisible by 8, got 2"); a comparison lowers everywhere.
  clean_k = jnp.equal(canvas_k, False)
  canvas_pair = jnp.where(canvas_k, block_q == block_k, block_k < block_q)
  clean_pair = clean_k if clean is None else clean_k & clean
  ok = ok & jnp.where(canvas_q, canvas_pair, clean_pair)
  if near is not None:
    from_start = (start_q - pos_k < spec.window) & (pos_k - start_q < spec.window)
    ok = ok & jnp.where(canvas_q & clean_k, from_start, near)
  return ok


# ---- per-tile summaries: which (query tile, key tile) pairs hold any visible pair --------------------------------

def _tile_min_max(values_BT, present_BT, tile: int):
  """Per tile of `tile` consecutive tokens: (min, max) of `values` over the present tokens; (_FAR, -_FAR) for a
  tile with none."""
  B, T = values_BT.shape
  num_tiles = -(-T // tile)
  pad = num_tiles * tile - T
  values = jnp.pad(values_BT, ((0, 0), (0, pad))).reshape(B, num_tiles, tile)
  present = jnp.pad(present_BT, ((0, 0), (0, pad))).reshape(B, num_tiles, tile)
  return (jnp.min(jnp.where(present, values, _FAR), axis=-1), jnp.max(jnp.where(present, values, -_FAR), axis=-1))


def _overlap(a, b):
  """Intervals (min, max) of the query tiles [B, nq, 1] and key tiles [B, 1, nk] intersect."""
  return (a[0] <= b[1]) & (b[0] <= a[1])


def _within(a, b, window: int):
  """Some value of interval a lies within distance < window of some value of interval b."""
  return (b[0] - a[1] < window) & (a[0] - b[1] < window)


def tile_visits(spec: MaskSpec, tile_q: int, tile_k: int, *, rows_per_query: int = 1) -> jax.Array:
  """[B, nq, nk] bool: False only where every (query, key) pair of the two tiles is masked, so a kernel may skip
  the tile. Conservative (it may keep a tile that holds no visible pair, never drop one that does), computed from
  per-tile (min, max) summaries of each attribute, separately for canvas and clean tokens.

  `rows_per_query`: the kernels stack the G query heads that share a key head as G consecutive rows per query
  (GQA), so query tiles are tiles of L * G rows."""
  q, kv = spec.q, spec.kv
  expand = lambda x: None if x is None else jnp.repeat(x, rows_per_query, axis=1)  # noqa: E731
  q_seg, q_pos, q_canvas, q_blocks = map(expand, (q.segment_ids, q.positions, q.canvas, q.blocks))
  q_start = expand(spec.window_starts()) if q.has_canvas and spec.window else None

  def pair(present_q, present_k, rule, window_from_start=False):
    """Tiles holding a visible pair among the present queries and keys (one of the rule's cases)."""
    sq = lambda x: tuple(v[:, :, None] for v in _tile_min_max(x, present_q, tile_q))  # noqa: E731
    sk = lambda x: tuple(v[:, None, :] for v in _tile_min_max(x, present_k, tile_k))  # noqa: E731
    ok = (_tile_any(present_q, tile_q)[:, :, None] & _tile_any(present_k, tile_k)[:, None, :]
          & _overlap(sq(q_seg), sk(kv.segment_ids)))
    if rule is not None:
      ok = ok & rule(sq, sk)
    if spec.window:
      ok = ok & _within(sq(q_start if window_from_start else q_pos), sk(kv.positions), spec.window)
    return ok

  def clean_rule(sq, sk):
    if spec.kind == "causal":
      return sk(kv.positions)[0] <= sq(q_pos)[1]
    return jax.lax.div(sk(kv.positions)[0], spec.block_size) <= jax.lax.div(sq(q_pos)[1], spec.block_size)

  clean = None if spec.kind == "bidirectional" else clean_rule
  if not q.has_canvas:
    return pair(jnp.ones(q_seg.shape, bool), jnp.ones(kv.segment_ids.shape, bool), clean)
  k_canvas = kv.canvas
  clean_clean = pair(~q_canvas, ~k_canvas, clean)
  canvas_canvas = pair(q_canvas, k_canvas, lambda sq, sk: _overlap(sq(q_blocks), sk(kv.blocks)))
  canvas_clean = pair(q_canvas, ~k_canvas, lambda sq, sk: sk(kv.blocks)[0] < sq(q_blocks)[1],
                      window_from_start=True)
  return clean_clean | canvas_canvas | canvas_clean


def _tile_any(present_BT, tile: int):
  B, T = present_BT.shape
  num_tiles = -(-T // tile)
  return jnp.any(jnp.pad(present_BT, ((0, 0), (0, num_tiles * tile - T))).reshape(B, num_tiles, tile), axis=-1)


def visit_lists(visits_BIJ):
  """(lists [B, I, J] int32, counts [B, I] int32): for each i the j with visits[b, i, j] first, ascending, so a
  kernel loops `for n < counts[b, i]: j = lists[b, i, n]`."""
  order = jnp.argsort(jnp.logical_not(visits_BIJ), axis=-1, stable=True).astype(jnp.int32)
  return order, jnp.sum(visits_BIJ, axis=-1, dtype=jnp.int32)


def count_visible(spec: MaskSpec, chunk: int = 512) -> jax.Array:
  """[B] number of visible (query, key) pairs, computed a chunk of queries at a time (never the whole [L, S]
  mask): the useful work of an attention under this mask."""
  B, L = spec.q.segment_ids.shape
  chunk = min(chunk, L)
  num_chunks = -(-L // chunk)
  pad = num_chunks * chunk - L
  # Padded queries get a segment no key has.
  fill = lambda x, value: None if x is None else jnp.pad(x, ((0, 0), (0, pad)), constant_values=value)  # noqa: E731
  starts = spec.window_starts()
  q = spec.q
  columns = (fill(q.segment_ids, -1), fill(q.positions, 0), fill(q.canvas, False), fill(q.blocks, 0),
             fill(starts, 0))
  chunked = [None if x is None else jnp.moveaxis(x.reshape(B, num_chunks, chunk), 1, 0) for x in columns]
  kv = spec.kv
  row = lambda x: None if x is None else x[:, None, :]  # noqa: E731

  def one(parts):
    col = lambda x: None if x is None else x[:, :, None]  # noqa: E731
    seg, pos, canvas, blocks, start = parts
    mask = visible(spec, col(seg), col(pos), row(kv.segment_ids), row(kv.positions), col(canvas),
                   row(kv.canvas), col(blocks), row(kv.blocks), col(start))
    return jnp.sum(mask, axis=(1, 2), dtype=jnp.int32)

  return jnp.sum(jax.lax.map(one, chunked), axis=0)

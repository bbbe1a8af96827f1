"""Mask descriptions (MaskSpec) against the dense masks they replace, and the per-tile visit tables the kernels
skip fully masked tiles with. No kernel runs here: these are cheap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.model.masks import (MaskSpec, Tokens, canvas_clean_mask, canvas_window_starts, make_mask,
                                       sliding_window)
from diffgemma_jax.objectives.block import block_ids
from pallas_kernels.attention_mask import count_visible, visit_lists
from pallas_kernels.attention_mask import tile_visits as tile_visits_eager

# Jitted: op by op, these small array programs spend their time compiling each primitive.
dense = jax.jit(lambda spec: spec.dense())
window_starts = jax.jit(lambda spec: spec.window_starts())
tile_visits = jax.jit(tile_visits_eager, static_argnums=(1, 2), static_argnames=("rows_per_query",))
count_visible = jax.jit(count_visible, static_argnames=("chunk",))


def packed_rows(lengths_per_row, length):
  """(segment ids, positions) [B, length] of rows packed with documents of the given lengths, then padding."""
  segments = np.zeros((len(lengths_per_row), length), np.int32)
  positions = np.zeros((len(lengths_per_row), length), np.int32)
  for row, lengths in enumerate(lengths_per_row):
    start = 0
    for segment, n in enumerate(lengths, 1):
      segments[row, start:start + n] = segment
      positions[row, start:start + n] = np.arange(n)
      start += n
    positions[row, start:] = np.arange(length - start)  # padding: segment 0
  return jnp.asarray(segments), jnp.asarray(positions)


SEGMENTS, POSITIONS = packed_rows([[5, 11], [20], [3, 3, 9]], 20)


def sft_blocks(block_size: int):
  """block_ids of SFT rows whose responses start at different places (prompt: block -1)."""
  loss_mask = np.zeros(SEGMENTS.shape, np.int32)
  loss_mask[0, 6:16] = 1
  loss_mask[1, 3:] = 1
  loss_mask[2, 0:15] = 1
  return block_ids({"tokens": SEGMENTS, "segment_ids": SEGMENTS, "loss_mask": jnp.asarray(loss_mask)}, block_size)


def canvas_layouts():
  """(name, spec, dense mask without window) of the [canvas ; clean] layouts the block objectives build."""
  out = []
  for name, blocks in (("pretraining", block_ids({"tokens": SEGMENTS}, 4)), ("sft", sft_blocks(4))):
    spec = MaskSpec.canvas_clean(SEGMENTS, POSITIONS, blocks, SEGMENTS, POSITIONS, blocks)
    out.append((name, spec, canvas_clean_mask(SEGMENTS, blocks, SEGMENTS, POSITIONS, blocks)))
  # The uniform objective's one-canvas layout: a canvas of one block per row, cut (segment 0) at the row's end.
  blocks = block_ids({"tokens": SEGMENTS}, 8)
  start = jnp.array([8, 0, 16])
  index = jnp.minimum(start[:, None] + jnp.arange(8), 19)
  take = lambda x: jnp.take_along_axis(x, index, axis=1)  # noqa: E731
  canvas_segments = jnp.where(start[:, None] + jnp.arange(8) < 20, take(SEGMENTS), 0)
  canvas_blocks = jnp.broadcast_to((start // 8)[:, None], (3, 8)).astype(jnp.int32)
  spec = MaskSpec.canvas_clean(canvas_segments, take(POSITIONS), canvas_blocks, SEGMENTS, POSITIONS, blocks)
  out.append(("uniform", spec, canvas_clean_mask(canvas_segments, canvas_blocks, SEGMENTS, POSITIONS, blocks)))
  return out


@pytest.mark.parametrize("window", [0, 3, 40])
@pytest.mark.parametrize("kind", ["bidirectional", "causal", "block_causal"])
def test_packed_descriptions_equal_dense_masks(kind, window):
  spec = MaskSpec.packed(kind, SEGMENTS, POSITIONS, block_size=4).with_window(window)
  expected = make_mask(kind, SEGMENTS, POSITIONS, block_size=4)
  if window:
    expected = expected & sliding_window(POSITIONS, POSITIONS, window)
  np.testing.assert_array_equal(dense(spec), expected)
  np.testing.assert_array_equal(count_visible(spec, chunk=7), np.asarray(expected).sum(axis=(1, 2)))


@pytest.mark.parametrize("window", [0, 2, 5, 40])
def test_canvas_layouts_equal_dense_masks_with_the_canvas_window_rule(window):
  for name, spec, reference in canvas_layouts():
    positions, canvas = spec.q.positions, spec.q.canvas
    starts = canvas_window_starts(reference, positions, positions, canvas, canvas)
    np.testing.assert_array_equal(window_starts(spec), starts, err_msg=name)
    expected = reference & sliding_window(positions, positions, window, canvas_window=(starts, canvas)) \
        if window else reference
    np.testing.assert_array_equal(dense(spec.with_window(window)), expected, err_msg=name)
    np.testing.assert_array_equal(count_visible(spec.with_window(window), chunk=16),
                                  np.asarray(expected).sum(axis=(1, 2)), err_msg=name)


def test_kv_cache_decode_masks_as_descriptions():
  """The masks the samplers build for a KV cache of S slots: the causal prefill, and a block step whose window
  holds the just-finished block (clean, causal) and the canvas (sees every slot before the canvas's end)."""
  B, S, P, b = 2, 24, 8, 4
  slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  ones = lambda n: jnp.ones((B, n), jnp.int32)  # noqa: E731
  prefill = MaskSpec(Tokens(ones(P), slots[:, :P]), Tokens(ones(S), slots), kind="causal")
  np.testing.assert_array_equal(dense(prefill), slots[:, None, :] <= jnp.arange(P)[None, :, None])
  canvas_start, window_start = 12, 8
  positions = slots[:, window_start:canvas_start + b]
  canvas_q = positions >= canvas_start
  canvas_k = (slots >= canvas_start) & (slots < canvas_start + b)
  step = MaskSpec(Tokens(ones(positions.shape[1]), positions, canvas_q, canvas_q.astype(jnp.int32)),
                  Tokens(ones(S), slots, canvas_k, (slots >= canvas_start).astype(jnp.int32)), kind="causal")
  query = positions[0][:, None]
  expected = jnp.where(query < canvas_start, slots[0][None, :] <= query, slots[0][None, :] < canvas_start + b)
  np.testing.assert_array_equal(dense(step), jnp.broadcast_to(expected, (B,) + expected.shape))
  # The canvas measures its window over clean slots from its first position.
  np.testing.assert_array_equal(window_starts(step)[0], jnp.where(canvas_q[0], canvas_start, positions[0]))


def _visited_tiles_of_dense(dense, tile_q, tile_k, rows_per_query):
  mask = np.repeat(np.asarray(dense), rows_per_query, axis=1)
  B, R, S = mask.shape
  nq, nk = -(-R // tile_q), -(-S // tile_k)
  padded = np.zeros((B, nq * tile_q, nk * tile_k), bool)
  padded[:, :R, :S] = mask
  return padded.reshape(B, nq, tile_q, nk, tile_k).any(axis=(2, 4))


def _layouts():
  out = [(f"packed {kind} window {w}", MaskSpec.packed(kind, SEGMENTS, POSITIONS, block_size=4).with_window(w))
         for kind in ("bidirectional", "causal", "block_causal") for w in (0, 3)]
  out += [(f"{name} window {w}", spec.with_window(w)) for name, spec, _ in canvas_layouts() for w in (0, 5)]
  return out


def test_tile_visits_never_skip_a_visible_pair():
  for name, spec in _layouts():
    mask = dense(spec)
    for tile_q, tile_k, rows_per_query in ((4, 4, 1), (8, 4, 2)):
      visits = np.asarray(tile_visits(spec, tile_q, tile_k, rows_per_query=rows_per_query))
      needed = _visited_tiles_of_dense(mask, tile_q, tile_k, rows_per_query)
      assert visits.shape == needed.shape
      assert not (needed & ~visits).any(), f"{name}: a tile with visible pairs is skipped"


def test_tile_visits_skip_what_a_layout_masks():
  """Long packed rows and the block-diffusion layout: the table visits exactly the tiles holding a visible pair
  when tiles align with documents and blocks, so the kernels' work follows the useful pairs."""
  segments, positions = packed_rows([[64, 64, 128]], 256)
  spec = MaskSpec.packed("causal", segments, positions)
  visits = np.asarray(tile_visits(spec, 16, 16))
  np.testing.assert_array_equal(visits, _visited_tiles_of_dense(dense(spec), 16, 16, 1))
  assert visits.mean() < 0.3  # causal within 3 documents: 8*9/2 * 2 + 16*17/2 of 256 tiles
  blocks = block_ids({"tokens": segments}, 32)
  layout = MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks).with_window(48)
  visits = np.asarray(tile_visits(layout, 16, 16))
  np.testing.assert_array_equal(visits, _visited_tiles_of_dense(dense(layout), 16, 16, 1))
  assert visits.mean() < 0.15


def test_visit_lists_put_visited_tiles_first_in_order():
  visits = jnp.array([[[False, True, False, True], [False, False, False, False], [True, True, True, True]]])
  lists, counts = visit_lists(visits)
  np.testing.assert_array_equal(counts, [[2, 0, 4]])
  np.testing.assert_array_equal(lists[0, 0, :2], [1, 3])
  np.testing.assert_array_equal(lists[0, 2], [0, 1, 2, 3])


def test_descriptions_refuse_bad_flags():
  with pytest.raises(ValueError, match="valid kinds"):
    MaskSpec.packed("sideways", SEGMENTS, POSITIONS)
  with pytest.raises(ValueError, match="block_size"):
    MaskSpec.packed("block_causal", SEGMENTS, POSITIONS)
  with pytest.raises(ValueError, match="together"):
    Tokens(SEGMENTS, POSITIONS, canvas=SEGMENTS > 0)

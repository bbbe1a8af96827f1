"""The `chunked` attention path (`pallas_kernels/attention_chunked.py`) against the dense reference: values and
q/k/v gradients at float32 tolerance for every kind of mask a description holds, each chunk on the narrow key span
its plan chose or on every key; the plan never leaves out a key block a chunk sees; a chunk whose keys do not fit
a narrow span runs on every key, and on a narrow span would be wrong."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.model.attention_impl import resolve
from diffgemma_jax.objectives.block import block_ids
from diffgemma_jax.sampling.batching import slot_mask
from pallas_kernels import ChunkPlan, MaskSpec, Tokens, attention_reference, chunked_attention, plan_chunks
from pallas_kernels import span_ladder

sys.path.insert(0, os.path.dirname(__file__))
from test_attention_masks import packed_rows  # noqa: E402  pylint: disable=wrong-import-position
from test_flash_attention import (  # noqa: E402  pylint: disable=wrong-import-position
    _assert_close, _inputs, _value_and_grads)

CHUNK, KEY_BLOCK = 8, 4  # 8 queries per chunk, keys in blocks of 4: rows of 40-64 tokens make 5-8 chunks
HIGHEST = jax.lax.Precision.HIGHEST


def _packed_with_a_query_that_sees_nothing():
  """Bidirectional packed rows of 62 tokens (a padded last chunk, keys padded to whole blocks), padding included
  (it sees all the padding, in the last key block too); the last document of row 1 queries a segment no key has."""
  segments, positions = packed_rows([[10, 30, 4, 18], [8] * 7 + [6], [5, 20, 30]], 62)
  blind = segments.at[1, 56:].set(9)
  return MaskSpec(Tokens(blind, positions), Tokens(segments, positions))


def _canvas_with_window():
  """The block objectives' [canvas ; clean] row (96 tokens), blocks of 6 (canvases and their window starts
  straddle the chunks of 8) under a window of 7 measured from each canvas's start."""
  segments, positions = packed_rows([[20, 28], [48]], 48)
  blocks = block_ids({"tokens": segments}, 6)
  return MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks).with_window(7)


def _shuffled_window():
  """A window over positions in no order along the row: each chunk's keys lie all over it."""
  positions = np.random.default_rng(0).permutation(64).astype(np.int32)[None]
  return MaskSpec.packed("bidirectional", jnp.ones((1, 64), jnp.int32), positions).with_window(4)


# name -> (spec, rung per chunk: the spans the plan must choose, or None: only that some chunk is narrowed)
MASKS = {
    # Two single documents (one padded) under a two-sided window: every window crosses a chunk boundary.
    "sliding_window": (lambda: MaskSpec.single_documents("bidirectional", [64, 50], 64).with_window(6),
                       [0] * 8),
    # Chunk c sees 2 (c + 1) key blocks: spans (5, 10) for chunks 0-4, every key for 5-7.
    "causal": (lambda: MaskSpec.single_documents("causal", [64], 64), [0, 0, 1, 1, 1, 2, 2, 2]),
    "packed": (_packed_with_a_query_that_sees_nothing, None),
    "canvas_clean": (_canvas_with_window, None),
    # A sampler's prompt pass: 40 queries at slots 16-55 of a 62-slot cache (not whole key blocks); row 1 starts
    # at slot 20, its queries at slots 16-19 are padding (they see the padding and the unwritten slots).
    "sampler_slots": (lambda: slot_mask(2, 62, 16, 40, jnp.array([0, 20])), None),
    # The fallback: no chunk's keys fit a narrow span.
    "shuffled_window": (_shuffled_window, [2] * 8),
}


def _plan(spec):
  num_key_blocks = -(-spec.kv.segment_ids.shape[1] // KEY_BLOCK)
  return plan_chunks(spec, CHUNK, KEY_BLOCK, span_ladder(spec, CHUNK, KEY_BLOCK, num_key_blocks))


@pytest.mark.parametrize("name", sorted(MASKS))
def test_chunked_attention_equals_the_dense_reference(name):
  """Values and q/k/v gradients within 1e-5 of each one's largest value (the flash-attention tests' float32
  tolerance: where a softmax is nearly one-hot, dq is a difference of nearly equal terms, and the reference itself
  lands ~1e-5 from the float64 value); and the spans the plan chose."""
  make, expected_rungs = MASKS[name]
  spec = make()
  q, k, v, cotangent = _inputs(spec, 4, 2, 8, jnp.float32)
  ours = lambda q, k, v, s: chunked_attention(q, k, v, s, chunk=CHUNK, key_block=KEY_BLOCK,  # noqa: E731
                                              precision=HIGHEST)
  got = _value_and_grads(ours, spec, q, k, v, cotangent)
  want = _value_and_grads(lambda q, k, v, s: attention_reference(q, k, v, s, precision=HIGHEST), spec, q, k, v,
                          cotangent)
  for what, a, b in zip(("values", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(a, b, jnp.float32, f"{name}: {what}")
  plan = _plan(spec)
  rungs = np.asarray(plan.rung)
  if expected_rungs is None:
    assert (rungs < len(plan.spans)).any(), f"{name}: no chunk ran on a narrow span ({plan.spans}, {rungs})"
  else:
    np.testing.assert_array_equal(rungs, expected_rungs)
  if name == "packed":
    np.testing.assert_array_equal(np.asarray(got[0])[1, 56:], 0.0)  # queries that see no key output zeros


@pytest.mark.parametrize("name", sorted(MASKS))
def test_plans_hold_every_key_block_a_chunk_sees(name):
  """Against the dense mask: every key block holding a key that some query of a chunk sees is among the chunk's
  planned blocks (what makes a narrow span exact)."""
  spec = MASKS[name][0]()
  plan = _plan(spec)
  mask = np.asarray(spec.dense())
  B, L, S = mask.shape
  num_chunks, num_key_blocks = -(-L // CHUNK), -(-S // KEY_BLOCK)
  mask = np.pad(mask, ((0, 0), (0, num_chunks * CHUNK - L), (0, num_key_blocks * KEY_BLOCK - S)))
  seen = mask.reshape(B, num_chunks, CHUNK, num_key_blocks, KEY_BLOCK).any(axis=(2, 4))
  blocks, counts = np.asarray(plan.blocks), np.asarray(plan.counts)
  for c in range(num_chunks):
    for b in range(B):
      listed = counts[c, b] <= blocks.shape[-1]  # else the chunk runs on every key
      planned = set(blocks[c, b, :counts[c, b]]) if listed else set(range(num_key_blocks))
      assert set(np.flatnonzero(seen[b, c])) <= planned, (name, c, b)


def test_a_chunk_on_too_narrow_a_span_would_be_wrong():
  """The shuffled window's chunks run on every key; forced onto the narrowest span (its first key blocks), the
  same chunks lose keys they see and the values change."""
  spec = _shuffled_window()
  q, k, v, _ = _inputs(spec, 4, 2, 8, jnp.float32)
  plan = _plan(spec)
  assert (np.asarray(plan.rung) == len(plan.spans)).all()
  forced = ChunkPlan(jnp.zeros_like(plan.rung), plan.blocks, plan.counts, plan.spans)
  run = jax.jit(lambda q, k, v, plan: chunked_attention(q, k, v, spec, chunk=CHUNK, key_block=KEY_BLOCK, plan=plan,
                                                         precision=HIGHEST))
  want = attention_reference(q, k, v, spec, precision=HIGHEST)
  _assert_close(run(q, k, v, plan), want, jnp.float32, "the plan's spans")
  assert float(jnp.max(jnp.abs(run(q, k, v, forced) - want))) > 0.1


def test_auto_takes_chunks_for_long_rows_off_the_gpu():
  spec = MASKS["causal"][0]()
  assert resolve("chunked", spec) == "chunked"
  if jax.default_backend() != "gpu":  # auto: dense logits for short rows, chunks for long ones
    long = MaskSpec.packed("causal", jnp.ones((1, 1025), jnp.int32), jnp.arange(1025)[None])
    assert resolve("auto", spec) == "xla" and resolve("auto", long) == "chunked"

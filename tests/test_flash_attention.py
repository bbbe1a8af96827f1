"""The Pallas flash-attention kernels against the dense reference: values and gradients for every mask kind, and
their Triton lowering.

On CPU the kernels run in Pallas interpret mode, where out-of-bounds reads come back as NaN, so a missing edge
mask fails here as it would corrupt results on a GPU. Set DIFFGEMMA_PALLAS_GPU=1 to run the same tests on the
compiled Triton kernels (bench/gpu_check.sh does).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.model.masks import MaskSpec, Tokens
from pallas_kernels import AttentionTiling, attention_reference, choose_attention_tiling, flash_attention
from pallas_kernels.attention_tiling import shared_memory_bytes

sys.path.insert(0, os.path.dirname(__file__))
from test_attention_masks import POSITIONS, SEGMENTS, canvas_layouts  # noqa: E402  pylint: disable=wrong-import-position
from test_pallas_gmm import _lowered_for_gpu  # noqa: E402  pylint: disable=wrong-import-position

ON_GPU = os.environ.get("DIFFGEMMA_PALLAS_GPU", "0") == "1"
INTERPRET = not ON_GPU
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
HIGHEST = jax.lax.Precision.HIGHEST


def _inputs(spec, num_heads, num_kv_heads, head_dim, dtype, seed=0):
  B, L = spec.q.segment_ids.shape
  S = spec.kv.segment_ids.shape[1]
  keys = jax.random.split(jax.random.key(seed), 4)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)  # noqa: E731
  return (normal(keys[0], (B, L, num_heads, head_dim)), normal(keys[1], (B, S, num_kv_heads, head_dim)),
          normal(keys[2], (B, S, num_kv_heads, head_dim)),
          jax.random.normal(keys[3], (B, L, num_heads, head_dim), jnp.float32))


def _value_and_grads(fn, spec, q, k, v, cotangent):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, spec).astype(jnp.float32) * cotangent)  # noqa: E731
  out_and_grads = jax.jit(lambda q, k, v: (fn(q, k, v, spec), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
  return out_and_grads(q, k, v)


def _assert_close(actual, expected, dtype, what):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert actual.shape == expected.shape, what
  assert np.isfinite(actual).all(), f"{what}: non-finite values (an unmasked edge or an unwritten output)"
  scale = max(1.0, float(np.abs(expected).max()))
  error = float(np.abs(actual - expected).max())
  assert error <= TOLERANCE[dtype] * scale, f"{what}: max abs error {error} (scale {scale})"


def check_against_reference(spec, *, num_heads, num_kv_heads, head_dim, dtype=jnp.float32, tiling=(16, 16)):
  q, k, v, cotangent = _inputs(spec, num_heads, num_kv_heads, head_dim, dtype)
  ours = lambda q, k, v, s: flash_attention(q, k, v, s, tiling=tiling, interpret=INTERPRET)  # noqa: E731
  reference = lambda q, k, v, s: attention_reference(q, k, v, s, precision=HIGHEST)  # noqa: E731
  out, grads = _value_and_grads(ours, spec, q, k, v, cotangent)
  ref_out, ref_grads = _value_and_grads(reference, spec, q, k, v, cotangent)
  assert out.dtype == q.dtype and [g.dtype for g in grads] == [q.dtype, k.dtype, v.dtype]
  _assert_close(out, ref_out, dtype, "output")
  for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
    _assert_close(got, want, dtype, name)
  return out, grads


def _canvas_layout(name):
  return next(spec for layout, spec, _ in canvas_layouts() if layout == name)


# Rows of 20 tokens (tiles of 16: the last tile runs past the end) packed with 1-3 documents and padding.
CASES = {
    "bidirectional packed, GQA 2, head dim 24 (padded to 32), forward and backward tiles differ":
        (lambda: MaskSpec.packed("bidirectional", SEGMENTS, POSITIONS),
         dict(num_heads=4, num_kv_heads=2, head_dim=24, tiling=((32, 16), (16, 32)))),
    "causal packed, window 3 (shorter than a tile), head dim 512 (DiffusionGemma's global layers)":
        (lambda: MaskSpec.packed("causal", SEGMENTS, POSITIONS).with_window(3),
         dict(num_heads=2, num_kv_heads=1, head_dim=512)),
    "block_causal, window 40 (longer than the rows)":
        (lambda: MaskSpec.packed("block_causal", SEGMENTS, POSITIONS, block_size=4).with_window(40),
         dict(num_heads=2, num_kv_heads=2, head_dim=16)),
    "[canvas ; clean] of SFT rows (prompt block -1), window 5 (the canvas-window rule)":
        (lambda: _canvas_layout("sft").with_window(5), dict(num_heads=4, num_kv_heads=2, head_dim=16)),
    "bfloat16, the uniform objective's one-canvas layout, GQA 4, window 5":
        (lambda: _canvas_layout("uniform").with_window(5),
         dict(num_heads=4, num_kv_heads=1, head_dim=32, dtype=jnp.bfloat16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(case):
  make_spec, kwargs = CASES[case]
  check_against_reference(make_spec(), **kwargs)


def test_queries_that_see_no_key_get_zeros():
  """Queries of a segment no key has (and padding queries past a cache's written slots) output zeros, with zero
  gradients, as the xla path does; their neighbours are unaffected."""
  B, L, S = 2, 12, 20
  q_segments = jnp.array([[1] * 6 + [3] * 6, [2] * 12])
  q_positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32) + 8, (B, L))
  kv_segments = jnp.array([[1] * 20, [1] * 20])
  spec = MaskSpec(Tokens(q_segments, q_positions), Tokens(kv_segments, jnp.broadcast_to(jnp.arange(S), (B, S))),
                  kind="causal")
  out, (dq, _, _) = check_against_reference(spec, num_heads=2, num_kv_heads=1, head_dim=16)
  blind = np.asarray(q_segments != 1)
  assert blind.any() and not np.asarray(out)[blind].any() and not np.asarray(dq)[blind].any()
  assert np.asarray(out)[~blind].any()


def test_tiling_table():
  for direction in ("forward", "backward"):
    for head_dim in (128, 256, 512):
      tiling = choose_attention_tiling(direction, head_dim, jnp.bfloat16, 8192 * 8, 8192)
      assert shared_memory_bytes(tiling, head_dim, 2, direction) <= 232448  # a Hopper block's shared memory
  assert choose_attention_tiling("forward", 64, jnp.float32, 20, 20).block_k == 32
  assert choose_attention_tiling("forward", 64, jnp.float32, 20, 20, override=(16, 64)).block_k == 64
  with pytest.raises(ValueError, match="power of two"):
    AttentionTiling(48, 16)


def test_shape_errors_name_the_inputs():
  spec = MaskSpec.packed("causal", SEGMENTS, POSITIONS)
  q = jnp.zeros((3, 20, 4, 16))
  with pytest.raises(ValueError, match="K dividing N"):
    flash_attention(q, jnp.zeros((3, 20, 3, 16)), jnp.zeros((3, 20, 3, 16)), spec, interpret=True)
  with pytest.raises(ValueError, match="describes"):
    flash_attention(q[:, :10], jnp.zeros((3, 10, 2, 16)), jnp.zeros((3, 10, 2, 16)), spec, interpret=True)


@pytest.mark.parametrize("head_dim,dtype", [(128, jnp.bfloat16), (512, jnp.bfloat16), (256, jnp.float32)])
def test_kernels_lower_to_triton(head_dim, dtype):
  """What interpret mode cannot catch: tile shapes or primitives the Triton lowering rejects, and Triton modules the
  GPU would refuse to parse (every module is run through MLIR's verifier). DiffusionGemma's layer shapes (16 query
  heads; 8 key heads of 256 or 2 of 512) on the hardest mask, the [canvas ; clean] layout with a window, at 2 x 1000
  tokens (not a multiple of any tile): forward 1 kernel, forward + gradients 3 (forward, dQ, dK/dV)."""
  B, L, N = 1, 1000, 16
  K = 8 if head_dim == 256 else 2
  sds = jax.ShapeDtypeStruct

  def spec_of(segments, positions, blocks):
    return MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks).with_window(1024)

  def forward(q, k, v, segments, positions, blocks):
    return flash_attention(q, k, v, spec_of(segments, positions, blocks), interpret=False)

  def grads(q, k, v, segments, positions, blocks):
    loss = lambda q, k, v: forward(q, k, v, segments, positions, blocks).astype(jnp.float32).sum()  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  args = (sds((B, 2 * L, N, head_dim), dtype), sds((B, 2 * L, K, head_dim), dtype),
          sds((B, 2 * L, K, head_dim), dtype)) + (sds((B, L), jnp.int32),) * 3
  forward_text = _lowered_for_gpu(forward, *args)
  assert forward_text.count("__gpu$xla.gpu.triton") == 1 and 'name = "flash_attention_forward"' in forward_text
  grads_text = _lowered_for_gpu(grads, *args)
  assert grads_text.count("__gpu$xla.gpu.triton") == 3
  assert 'name = "flash_attention_dq"' in grads_text and 'name = "flash_attention_dkv"' in grads_text

"""The Mosaic GPU (Hopper) flash-attention kernels against the dense reference: values and q/k/v gradients under
causal, block-causal, packed-segment, [canvas ; clean] and sliding-window masks, with tiles skipped by the visit
lists.

On CPU the kernels run in the Mosaic GPU interpret mode (simulated SMEM, TMA copies, barriers and wgmma; reads of
unwritten memory come back NaN and out-of-bounds copies raise). Inputs are bfloat16 (one case float16); the
reference is computed in float32 from the same values. Set DIFFGEMMA_PALLAS_GPU=1 on a Hopper GPU to run the same
tests compiled (bench/gpu_check.sh does); interpret mode cannot check what only the compiler sees (docs/attention.md),
nor, running copies and wgmma synchronously, a missing wait or fence: those are checked on the lowered kernels.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.model.masks import MaskSpec, Tokens
from diffgemma_jax.objectives.block import block_ids
from pallas_kernels import _mosaic_compat, attention_reference
from pallas_kernels.attention_mask import tile_visits
from pallas_kernels.attention_mosaic import (KERNELS, MAX_SHARED_BYTES, MosaicTiling, choose_tiling, column_groups,
                                             shared_memory_bytes)
from pallas_kernels.attention_mosaic_ops import flash_attention_mosaic

sys.path.insert(0, os.path.dirname(__file__))
from test_attention_masks import packed_rows  # noqa: E402  pylint: disable=wrong-import-position
import cuda_lowering  # noqa: E402  pylint: disable=wrong-import-position
import mosaic_sync  # noqa: E402  pylint: disable=wrong-import-position
from test_flash_attention import _inputs  # noqa: E402  pylint: disable=wrong-import-position

ON_GPU = os.environ.get("DIFFGEMMA_PALLAS_GPU", "0") == "1"
INTERPRET = not ON_GPU
TOLERANCE = 2e-2  # bfloat16 operands and probabilities, relative to the largest reference value
HIGHEST = jax.lax.Precision.HIGHEST

if ON_GPU and not any("H100" in d.device_kind or "H200" in d.device_kind or "H800" in d.device_kind
                      for d in jax.devices()):
  pytest.skip("the Mosaic GPU kernels compile for Hopper (sm_90a) only", allow_module_level=True)

@pytest.fixture(autouse=True)
def _fresh_interpreter():
  """The Mosaic GPU interpreter keeps global state that an exception inside a kernel leaves dirty."""
  yield
  _mosaic_compat.reset_interpret_state()


# Rows of 80 tokens: with two query heads per key head 160 stacked rows (three 64-row tiles, the last one partly
# padding) against two 64-key tiles, so the visit lists skip tiles and the padding is exercised.
SEGMENTS, POSITIONS = packed_rows([[30, 50], [10, 10, 45]], 80)


def _canvas_spec(length=64, block=8):
  """[canvas (64) ; clean (64)]: the clean row tile never sees the canvas key tile, so that tile is skipped."""
  segments, positions = packed_rows([[20, 44], [5, 30]], length)
  blocks = block_ids({"tokens": segments}, block)
  return MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks)


def _value_and_grads(fn, q, k, v, cotangent):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)  # noqa: E731
  return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def _assert_close(actual, expected, what, tolerance=TOLERANCE):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, what
  assert np.isfinite(actual).all(), f"{what}: non-finite values (an unwritten tile or a read of padding)"
  scale = max(1.0, float(np.abs(expected).max()))
  error = float(np.abs(actual - expected).max())
  assert error <= tolerance * scale, f"{what}: max abs error {error} (scale {scale})"


def check_against_reference(spec, *, num_heads, num_kv_heads, head_dim, tiling=None, scale=1.0, dtype=jnp.bfloat16):
  q, k, v, cotangent = _inputs(spec, num_heads, num_kv_heads, head_dim, dtype)
  ours = lambda q, k, v: flash_attention_mosaic(q, k, v, spec, scale=scale, tiling=tiling,  # noqa: E731
                                                interpret=INTERPRET)
  reference = lambda q, k, v: attention_reference(q, k, v, spec, scale=scale, precision=HIGHEST)  # noqa: E731
  out, grads = _value_and_grads(ours, q, k, v, cotangent)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref_out, ref_grads = _value_and_grads(reference, f32(q), f32(k), f32(v), cotangent)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  _assert_close(out, ref_out, "output")
  for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
    _assert_close(got, want, name)
  return out, grads


CASES = {
    "causal packed, GQA 2, head dim 16 (padded to 64)":
        (lambda: MaskSpec.packed("causal", SEGMENTS, POSITIONS), dict(num_heads=4, num_kv_heads=2, head_dim=16)),
    "float16, bidirectional packed segments (tiles of different documents skipped), scale 0.5":
        (lambda: MaskSpec.packed("bidirectional", *packed_rows([[64, 16], [40, 24, 16]], 80)),
         dict(num_heads=1, num_kv_heads=1, head_dim=32, scale=0.5, dtype=jnp.float16)),
    "causal packed, window 12, head dim 128 in two column groups":
        (lambda: MaskSpec.packed("causal", SEGMENTS, POSITIONS).with_window(12),
         dict(num_heads=2, num_kv_heads=1, head_dim=128, tiling=MosaicTiling(64, 64, max_columns=64))),
    # Head dim 512's tilings on a small head: one SMEM stage, 32-key dQ and 32-row dK-dV tiles (a 64-byte swizzle).
    "block_causal packed, one SMEM stage, 32-wide streamed tiles, 64-column groups":
        (lambda: MaskSpec.packed("block_causal", SEGMENTS, POSITIONS, block_size=8),
         dict(num_heads=2, num_kv_heads=1, head_dim=128,
              tiling=(MosaicTiling(64, 64, max_columns=64, stages=1), MosaicTiling(64, 32, max_columns=64, stages=1),
                      MosaicTiling(32, 64, max_columns=64, stages=1)))),
    "[canvas ; clean] pretraining layout, window 10 (the canvas-window rule)":
        (lambda: _canvas_spec().with_window(10), dict(num_heads=1, num_kv_heads=1, head_dim=16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_kernels_match_reference(case):
  make_spec, kwargs = CASES[case]
  spec = make_spec()
  G = kwargs["num_heads"] // kwargs["num_kv_heads"]
  visits = np.asarray(tile_visits(spec, 64, 64, rows_per_query=G))
  assert not visits.all() and visits.any(), "the case must skip some tiles and visit others"
  check_against_reference(spec, **kwargs)


def test_queries_that_see_no_key_get_zeros():
  """Queries of a segment no key has output zeros with zero gradients; their neighbours are unaffected."""
  B, L, S = 2, 70, 70
  q_segments = jnp.array([[1] * 35 + [3] * 35, [2] * 70])
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  kv_segments = jnp.ones((B, S), jnp.int32)
  spec = MaskSpec(Tokens(q_segments, positions), Tokens(kv_segments, positions), kind="causal")
  out, (dq, _, _) = check_against_reference(spec, num_heads=1, num_kv_heads=1, head_dim=16)
  blind = np.asarray(q_segments != 1)
  out, dq = np.asarray(out, np.float32), np.asarray(dq, np.float32)
  assert not out[blind].any() and not dq[blind].any() and out[~blind].any()


def test_column_groups_and_tiling_table():
  assert column_groups(512, 256) == (2, 256) and column_groups(192, 128) == (3, 64)
  assert column_groups(64, 256) == (1, 64)
  for kernel in KERNELS:
    for head_dim in (64, 128, 256, 512):
      # Mosaic aligns each SMEM buffer: leave it 4 KiB (the lowering test below checks Mosaic's own count).
      assert shared_memory_bytes(kernel, choose_tiling(kernel, head_dim), head_dim) <= MAX_SHARED_BYTES - 4096
  with pytest.raises(ValueError, match="multiple of 32"):
    MosaicTiling(48, 64)
  q = jnp.zeros((1, 80, 1, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="block_q=32: the forward kernel's rows are a wgmma M-tile"):
    flash_attention_mosaic(q, q, q, MaskSpec.packed("causal", SEGMENTS[:1], POSITIONS[:1]), tiling=(32, 64),
                           interpret=True)


@pytest.mark.parametrize("head_dim", [128, 256, 512])
def test_kernels_lower_for_hopper(head_dim):
  """What the interpreter cannot check, from this CPU: the Mosaic GPU lowering for sm_90a (wgmma operand shapes,
  swizzles and layouts, TMA slices, SMEM within the 227 KiB of a Hopper block). DiffusionGemma's layer shapes (16
  query heads; 8 key heads of 256 or 2 of 512) on the [canvas ; clean] layout with a window at 2 x 1000 tokens: the
  forward, dQ and dK/dV kernels all lower. PTX generation and register allocation happen only on a GPU."""
  B, L, N = 1, 1000, 16
  K = 2 if head_dim == 512 else 8
  sds = jax.ShapeDtypeStruct

  def grads(q, k, v, segments, positions, blocks):
    spec = MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks).with_window(1024)
    def loss(q, k, v):
      return flash_attention_mosaic(q, k, v, spec, interpret=False).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  args = (sds((B, 2 * L, N, head_dim), jnp.bfloat16), sds((B, 2 * L, K, head_dim), jnp.bfloat16),
          sds((B, 2 * L, K, head_dim), jnp.bfloat16)) + (sds((B, L), jnp.int32),) * 3
  text = cuda_lowering.lowered_for_cuda(grads, *args).as_text()
  for kernel in KERNELS:
    assert f"mosaic_flash_attention_{kernel}_mosaic_gpu" in text, kernel
  # What interpret mode's synchronous wgmma and TMA cannot show (tests/mosaic_sync.py): every wgmma awaited before
  # a TMA load may refill its operands' slot, P / dS / outputs fenced (commit_smem) between their register -> SMEM
  # stores and the wgmma or TMA store reading them, and each TMA store waited for before its SMEM is rewritten or
  # the kernel ends. Head dim 128 runs two SMEM stages (prefetch) in all three kernels, 256 in the forward only.
  # On a GPU (jax 0.11) the compiled tests exercise the real ordering; the decoding is checked on jax 0.10.2 here.
  if not ON_GPU:
    modules = mosaic_sync.kernel_modules(text)
    assert len(modules) == len(KERNELS)
    for module in modules:
      assert mosaic_sync.hazards(module) == []


def test_input_errors_name_the_problem():
  spec = MaskSpec.packed("causal", SEGMENTS, POSITIONS)
  q = jnp.zeros((2, 80, 2, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="bfloat16, float16"):
    flash_attention_mosaic(q.astype(jnp.float32), q[:, :, :1], q[:, :, :1], spec, interpret=True)
  with pytest.raises(ValueError, match="K dividing N"):
    flash_attention_mosaic(q, jnp.zeros((2, 80, 3, 16), jnp.bfloat16), jnp.zeros((2, 80, 3, 16), jnp.bfloat16),
                           spec, interpret=True)


def test_model_selection_and_bad_combinations():
  """model.attention_impl='pallas_mosaic' runs this kernel through `attend` (and `auto` never picks it); float32
  activations fail in one ConfigError line naming the key, at config time and at call time."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from diffgemma_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.attention_impl import attend, resolve  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel

  spec = MaskSpec.packed("causal", SEGMENTS, POSITIONS)
  assert resolve("pallas_mosaic", spec) == "pallas_mosaic" and resolve("auto", spec) != "pallas_mosaic"
  config = ModelConfig(compute_dtype="bfloat16", attention_impl="pallas_mosaic")
  with pytest.raises(ConfigError, match=r"^model\.attention_impl='pallas_mosaic' needs model\.compute_dtype"):
    dataclasses.replace(config, compute_dtype="float32")
  q = jnp.zeros((2, 80, 2, 16), jnp.float32)
  with pytest.raises(ConfigError, match=r"^model\.attention_impl='pallas_mosaic' takes bfloat16"):
    attend(q, q[:, :, :1], q[:, :, :1], spec, "pallas_mosaic")


def test_model_with_pallas_mosaic_matches_xla():
  """A two-layer bf16 model (a sliding layer with its window, a global layer with head dim 16) on the block
  objectives' [canvas ; clean] rows: model.attention_impl='pallas_mosaic' gives xla's logits, so the selection
  reaches the kernel with the model's mask and layout. Every expert is used (top_k = num_experts): with top 2 of 4,
  bf16 rounding differences flip a few tokens' routing (Triton's kernel differs from xla as much there). Two bf16
  layers differ by up to 2% of the largest logit; a mask error moves logits by 40%."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from flax import nnx  # pylint: disable=import-outside-toplevel

  from diffgemma_jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.transformer import build_model  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.objectives.block import canvas_clean_forward  # pylint: disable=import-outside-toplevel

  config = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                       head_dim=8, num_kv_heads=2, sliding_window=6, global_head_dim=16, global_num_kv_heads=1,
                       mlp_dim=32, num_experts=4, top_k=4, expert_dim=16, dispatch="dense", attention_impl="xla",
                       compute_dtype="bfloat16", canvas_input_norm=True)
  segments, positions = packed_rows([[20, 44], [5, 30]], 64)
  blocks = block_ids({"tokens": segments}, 8)
  tokens = jax.random.randint(jax.random.key(0), segments.shape, 0, 64)
  noisy = jax.random.randint(jax.random.key(1), segments.shape, 0, 64)
  batch = {"tokens": tokens, "segment_ids": segments, "positions": positions}
  graphdef, state = nnx.split(build_model(config, 0))

  def logits(impl):
    model = nnx.merge(nnx.graphdef(build_model(dataclasses.replace(config, attention_impl=impl), 0)), state)
    canvas, clean, _ = jax.jit(lambda b, n: canvas_clean_forward(model, n, b["positions"], b["segment_ids"], blocks,
                                                                  b, blocks))(batch, noisy)
    return np.asarray(canvas, np.float32), np.asarray(clean, np.float32)

  del graphdef
  for got, want in zip(logits("pallas_mosaic"), logits("xla")):
    _assert_close(got, want, "logits", tolerance=5e-2)

"""`model.attention_impl` in the model: our kernel's logits equal the xla reference's on the block objectives'
layout, a KV-cache decode step under a description equals the dense mask it replaces, cuDNN's argument mapping,
and the whole train step lowering to Triton attention kernels for a GPU. (That every description equals the dense
mask the objectives used to build, canvas-window starts included, is tests/test_attention_masks.py.)"""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.model.attention_impl import attend, cudnn_arguments, cudnn_attention, resolve
from diffgemma_jax.model.masks import MaskSpec, Tokens, make_mask
from diffgemma_jax.objectives.block import block_ids, canvas_clean_forward
from pallas_kernels import attention_reference

sys.path.insert(0, os.path.dirname(__file__))
from test_attention_masks import POSITIONS, SEGMENTS  # noqa: E402  pylint: disable=wrong-import-position

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=4, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense", attention_impl="xla",
                   canvas_input_norm=True)


@functools.cache
def _parameters():
  """TINY's parameters from seed 0, initialised under one jit (eagerly every primitive would compile on its own);
  `attention_impl` changes no parameter, so every variant shares them."""
  return jax.jit(lambda: nnx.split(build_model(TINY, 0))[1])()


@functools.cache
def _jitted(cfg, fn):
  """fn(model, *args) for a model of `cfg` with `_parameters()`, jitted once per module."""
  graphdef = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0)))[0]
  call = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: call(_parameters(), *args)


def _tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, TINY.vocab_size)


@pytest.fixture(scope="module")
def canvas_batch():
  blocks = block_ids({"tokens": SEGMENTS}, 4)
  batch = {"tokens": _tokens(SEGMENTS.shape), "segment_ids": SEGMENTS, "positions": POSITIONS}
  return batch, _tokens(SEGMENTS.shape, seed=1), blocks


def _canvas_clean_logits(model, batch, noisy, blocks):
  canvas, clean, _ = canvas_clean_forward(model, noisy, batch["positions"], batch["segment_ids"], blocks, batch,
                                          blocks)
  return canvas, clean


def test_pallas_logits_equal_xla(canvas_batch):
  """The model with our kernel (interpret mode) on the block objectives' layout, whose canvas half is bidirectional
  within blocks and whose clean half is the autoregressive mask (the kernel tests cover every mask kind alone)."""
  batch, noisy, blocks = canvas_batch
  pallas = dataclasses.replace(TINY, attention_impl="pallas")
  for got, want in zip(_jitted(pallas, _canvas_clean_logits)(batch, noisy, blocks),
                       _jitted(TINY, _canvas_clean_logits)(batch, noisy, blocks)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_with_a_description_equals_the_dense_mask():
  """A block sampler's step through the KV cache: the just-finished block (clean, causal) and the canvas (sees
  every slot before its end, its sliding window measured from its start) in one call, described or dense; logits
  and the updated cache agree, with the xla and the pallas implementations."""
  B, S, b = 2, 24, 4
  canvas_start, window_start = 12, 8
  slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  tokens = _tokens((B, S))
  positions = slots[:, window_start:canvas_start + b]
  canvas = positions >= canvas_start

  def step(model, mask):
    # An empty cache: the slots before the window hold zeros in both runs (the masks still decide what is seen).
    cache = model.init_kv_cache(B, S, jnp.float32)
    return model.decode(tokens[:, window_start:canvas_start + b], positions, mask, cache, slots, window_start,
                        canvas_BL=canvas)

  query = positions[0][:, None]
  dense = jnp.broadcast_to(jnp.where(query < canvas_start, slots[0][None, :] <= query,
                                     slots[0][None, :] < canvas_start + b), (B,) + query.shape[:1] + (S,))
  canvas_k = (slots >= canvas_start) & (slots < canvas_start + b)
  ones = lambda n: jnp.ones((B, n), jnp.int32)  # noqa: E731
  spec = MaskSpec(Tokens(ones(positions.shape[1]), positions, canvas, canvas.astype(jnp.int32)),
                  Tokens(ones(S), slots, canvas_k, (slots >= canvas_start).astype(jnp.int32)), kind="causal")
  want_logits, want_cache = _jitted(TINY, step)(dense)
  logits, cache = _jitted(dataclasses.replace(TINY, attention_impl="pallas"), step)(spec)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cudnn_argument_mapping():
  """cuDNN takes single-document rows (causal, bidirectional, causal with a left window); the same
  jax.nn.dot_product_attention call without cuDNN equals the reference on every real query. Other masks go to
  our kernel."""
  B, L, N, K, H = 2, 12, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, L, N, H))
  k, v = (jax.random.normal(key, (B, L, K, H)) for key in keys[1:])
  lengths = jnp.array([12, 7])
  real = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
  for kind, window in (("causal", 0), ("causal", 3), ("bidirectional", 0)):
    spec = MaskSpec.single_documents(kind, lengths, L).with_window(window)
    assert resolve("cudnn", spec) == "cudnn"
    got, want = jax.jit(lambda spec: (cudnn_attention(q, k, v, spec, implementation="xla"),
                                      attention_reference(q, k, v, spec)))(spec)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
  packed = MaskSpec.packed("causal", SEGMENTS, POSITIONS)
  single = MaskSpec.single_documents("causal", lengths, L)
  for spec in (packed, dataclasses.replace(single, kind="bidirectional", window=3),
               dataclasses.replace(single, kind="block_causal", block_size=4),
               MaskSpec.canvas_clean(SEGMENTS, POSITIONS, SEGMENTS, SEGMENTS, POSITIONS, SEGMENTS)):
    assert cudnn_arguments(spec) is None and resolve("cudnn", spec) == "pallas"
  assert resolve("auto", packed) == ("pallas" if jax.default_backend() == "gpu" else "xla")
  assert resolve("pallas", make_mask("causal", SEGMENTS, POSITIONS)) == "xla"  # dense masks: always xla


def test_attention_impl_errors_name_the_key():
  with pytest.raises(ConfigError, match="model.attention_impl.*valid are"):
    dataclasses.replace(TINY, attention_impl="flash")
  if jax.default_backend() != "gpu":
    spec = MaskSpec.single_documents("causal", jnp.array([6, 6]), 6)
    q = jnp.zeros((2, 6, 2, 16))
    with pytest.raises(ConfigError, match="model.attention_impl='cudnn' runs on NVIDIA GPUs only"):
      attend(q, q, q, spec, "cudnn")


def test_train_step_with_pallas_attention_lowers_to_triton(monkeypatch):
  """The block objective's whole jitted train step with model.attention_impl='pallas', lowered for a GPU from
  this CPU: its attention becomes Triton kernels (forward, dQ, dK/dV) under the [canvas ; clean] mask, every
  Triton module passes MLIR's verifier, and no interpreter is left in the program."""
  from test_pallas_gmm import _lowered_for_gpu  # pylint: disable=import-outside-toplevel

  from diffgemma_jax.config import base_config
  from diffgemma_jax.train import compile_train_step, synthetic_batch
  from pallas_kernels import _compat

  monkeypatch.setattr(_compat, "resolve_interpret", lambda interpret: False if interpret is None else interpret)
  jax.clear_caches()
  try:
    config = base_config()
    config.model.update(attention_impl="pallas", dispatch="sorted")
    config.objective.update(name="block", block_size=16)
    config.train.update(batch_size=2, seq_len=48)
    compiled = compile_train_step(config, mask_id=4)
    text = _lowered_for_gpu(compiled.step, compiled.abstract_state,
                            synthetic_batch(2, 48, compiled.model_config.vocab_size), jax.random.key(0))
  finally:
    jax.clear_caches()
  for name in ("flash_attention_forward", "flash_attention_dq", "flash_attention_dkv"):
    assert f'name = "{name}"' in text
  assert "interpret" not in text.lower()


def test_a_run_may_resume_with_another_attention_impl():
  """attention_impl changes how the layers compute, not their parameters: a checkpoint written with one resumes
  with another (a GPU run evaluated on a CPU, say)."""
  from diffgemma_jax.train.checkpoint import model_differences  # pylint: disable=import-outside-toplevel
  assert model_differences({**TINY.to_dict(), "attention_impl": "pallas"}, TINY.to_dict()) == []
  assert model_differences({**TINY.to_dict(), "head_dim": 16}, TINY.to_dict())

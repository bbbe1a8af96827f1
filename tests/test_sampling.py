"""The masked-diffusion block loop (`sampling/masked.py`) on known (oracle) denoisers: no model, no cache. The
parts it is made of are tested in test_parts.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.sampling import SamplerConfig, generate, truncate_at_eos

V, MASK, EOS = 32, 1, 3


def _oracle(target_BL, confidence):
  """A denoiser that proposes target[l] at every position with probability `confidence[l]`."""

  def logits_fn(canvas):
    conf = jnp.broadcast_to(jnp.asarray(confidence), canvas.shape)
    rest = (1.0 - conf) / (V - 2)  # spread over the other non-mask tokens
    probs = jnp.broadcast_to(rest[..., None], canvas.shape + (V,))
    probs = jnp.where(jax.nn.one_hot(target_BL, V, dtype=bool), conf[..., None], probs)
    return jnp.log(probs)

  return logits_fn


def _counting_oracle(confidence):
  """Proposes 4 + (number of tokens committed so far) everywhere, so the canvas records the commit order."""

  def logits_fn(canvas):
    committed = jnp.sum(canvas != MASK, axis=-1, keepdims=True)
    return _oracle(jnp.broadcast_to(4 + committed, canvas.shape), confidence)(canvas)

  return logits_fn


@pytest.mark.parametrize("acceptance,expected_calls", [("low_confidence", 4 * 4), ("threshold", 4)])
def test_generate_fills_the_canvas_and_keeps_the_prompt(acceptance, expected_calls):
  P, G, B = 5, 32, 2
  prompt = jax.random.randint(jax.random.key(0), (B, P), 4, V)
  target = jax.random.randint(jax.random.key(1), (B, P + G), 4, V)
  cfg = SamplerConfig(gen_length=G, block_length=8, steps_per_block=4, acceptance=acceptance)
  canvas, calls = jax.jit(lambda r: generate(_oracle(target, 0.97), prompt, r, cfg, mask_id=MASK))(
      jax.random.key(2))
  np.testing.assert_array_equal(canvas[:, :P], prompt)
  np.testing.assert_array_equal(canvas[:, P:], target[:, P:])
  assert not np.any(np.asarray(canvas) == MASK)
  np.testing.assert_array_equal(calls, [expected_calls] * B)


def test_low_confidence_commits_the_most_confident_first():
  P, G = 2, 8
  prompt = jnp.full((1, P), 3, jnp.int32)
  confidence = jnp.concatenate([jnp.ones(P), jnp.linspace(0.3, 0.9, G)])  # later positions more confident
  cfg = SamplerConfig(gen_length=G, block_length=G, steps_per_block=G)
  out, calls = generate(_counting_oracle(confidence), prompt, jax.random.key(0), cfg, mask_id=MASK)
  expected = [4 + P + (G - 1 - j) for j in range(G)]
  np.testing.assert_array_equal(out[0, P:], expected)
  assert int(calls[0]) == G


@pytest.mark.parametrize("acceptance", ["low_confidence", "threshold"])
def test_semi_autoregressive_blocks_fill_in_block_order(acceptance):
  P, G, b = 3, 12, 4
  prompt = jnp.full((1, P), 5, jnp.int32)
  confidence = jnp.concatenate([jnp.ones(P), jnp.linspace(0.2, 0.9, G)])  # later blocks would win without blocks
  cfg = SamplerConfig(gen_length=G, block_length=b, steps_per_block=2, acceptance=acceptance, threshold=0.5)
  out, _ = generate(_counting_oracle(confidence), prompt, jax.random.key(0), cfg, mask_id=MASK)
  order = np.asarray(out[0, P:]).reshape(G // b, b)
  for k in range(G // b - 1):
    assert order[k].max() < order[k + 1].min(), order


def test_threshold_one_is_one_token_per_step():
  P, G = 2, 16
  prompt = jnp.full((1, P), 5, jnp.int32)
  confidence = jnp.concatenate([jnp.ones(P), jax.random.uniform(jax.random.key(3), (G,), minval=0.2, maxval=0.99)])
  outs = {}
  for acceptance in ("threshold", "low_confidence"):
    cfg = SamplerConfig(gen_length=G, block_length=8, steps_per_block=8, acceptance=acceptance, threshold=1.0)
    outs[acceptance] = generate(_counting_oracle(confidence), prompt, jax.random.key(0), cfg, mask_id=MASK)
  np.testing.assert_array_equal(outs["threshold"][0], outs["low_confidence"][0])
  assert int(outs["threshold"][1][0]) == G


def test_stop_at_eos_ends_after_the_block_and_fills_eos():
  P, G, b = 2, 16, 4
  prompt = jnp.full((2, P), 5, jnp.int32)
  target = jnp.full((2, P + G), 7, jnp.int32).at[:, P + 2].set(EOS)
  cfg = SamplerConfig(gen_length=G, block_length=b, steps_per_block=b)
  out, calls = generate(_oracle(target, 0.9), prompt, jax.random.key(0), cfg, mask_id=MASK, eos_id=EOS)
  np.testing.assert_array_equal(calls, [b, b])  # the first block only
  np.testing.assert_array_equal(out[:, P + b:], EOS)
  assert truncate_at_eos(out[0, P:], EOS) == [7, 7]


def test_temperature_sampling_is_reproducible_with_a_seed():
  P, G = 2, 8
  prompt = jnp.full((1, P), 5, jnp.int32)
  logits = jax.random.normal(jax.random.key(0), (1, P + G, V))
  cfg = SamplerConfig(gen_length=G, block_length=4, steps_per_block=4, temperature=1.0)
  run = jax.jit(lambda r: generate(lambda c: logits, prompt, r, cfg, mask_id=MASK)[0])
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert not np.array_equal(run(jax.random.key(1)), run(jax.random.key(2)))


def test_bad_sampler_config():
  with pytest.raises(ValueError, match="acceptance"):
    SamplerConfig(acceptance="greedy")
  with pytest.raises(ValueError, match="block_length"):
    SamplerConfig(gen_length=30, block_length=8)
  with pytest.raises(ValueError, match="threshold"):
    SamplerConfig(threshold=0.0)
  with pytest.raises(ValueError, match="cache"):
    SamplerConfig(cache="prefix_only")

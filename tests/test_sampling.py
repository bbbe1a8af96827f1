"""Sampler parts and the masked-diffusion block loop on known (oracle) denoisers: no model, no cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.sampling import (SamplerConfig, accept_low_confidence, accept_threshold, even_schedule, generate,
                                   sample_next, top_p_filter, truncate_at_eos)

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


def test_even_schedule_finishes_the_block_in_time():
  masked, steps = 10, 4
  done, per_step = 0, []
  for s in range(steps):
    per_step.append(int(even_schedule(jnp.int32(masked - done), jnp.int32(steps - s))))
    done += per_step[-1]
  assert per_step == [3, 3, 2, 2]  # LLaDA's get_num_transfer_tokens


def test_acceptance_rules():
  conf = jnp.array([[0.2, 0.95, 0.5, 0.91, 0.3]])
  cand = jnp.array([[True, True, True, False, True]])
  low = accept_low_confidence(conf, cand, jnp.array([2]))
  np.testing.assert_array_equal(low, [[False, True, True, False, False]])
  thr = accept_threshold(conf, cand, 0.9)
  np.testing.assert_array_equal(thr, [[False, True, False, False, False]])
  # nothing above the threshold: still the single best
  thr = accept_threshold(conf * 0.5, cand, 0.9)
  np.testing.assert_array_equal(thr, [[False, True, False, False, False]])
  # a schedule's minimum on top of the threshold
  thr = accept_threshold(conf, cand, 0.9, jnp.array([3]))
  np.testing.assert_array_equal(thr, [[False, True, True, False, True]])


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


def test_top_p_and_sample_next():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  assert np.isfinite(np.asarray(top_p_filter(logits, 1.0))).all()
  assert int(sample_next(logits, jax.random.key(0), temperature=0.0)[0]) == 0
  draws = jax.vmap(lambda k: sample_next(logits, k, temperature=1.0, top_p=0.7))(
      jax.random.split(jax.random.key(0), 200))
  assert set(np.unique(np.asarray(draws))) == {0, 1}


def test_sample_categorical_draws_from_the_softmax():
  """The inversion sampler against the exact probabilities: frequencies of 200k draws within 5 standard errors
  for every token, zero-probability tokens (-inf, anywhere, including last) never drawn, one draw per row."""
  from diffgemma_jax.sampling.parts import sample_categorical
  probs = np.array([[0.5, 0.0, 0.3, 0.15, 0.05, 0.0],
                    [0.0, 0.001, 0.0, 0.009, 0.99, 0.0],
                    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  n = 200_000
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_categorical(k, logits)))(jax.random.split(jax.random.key(3), n)))
  assert draws.shape == (n, 3)
  for row in range(3):
    freq = np.bincount(draws[:, row], minlength=6) / n
    assert (freq[probs[row] == 0] == 0).all()
    stderr = np.sqrt(probs[row] * (1 - probs[row]) / n) + 1e-12
    assert (np.abs(freq - probs[row]) <= 5 * stderr + 1e-9).all(), (row, freq)
  # A large vocabulary (the release's 262144) with the mass on a few tokens far apart.
  big = jnp.full((262144,), -jnp.inf).at[jnp.array([7, 131072, 262143])].set(jnp.log(jnp.array([0.2, 0.3, 0.5])))
  draws = np.asarray(jax.vmap(lambda k: sample_categorical(k, big))(jax.random.split(jax.random.key(4), 4000)))
  assert set(np.unique(draws)) == {7, 131072, 262143}
  assert abs((draws == 262143).mean() - 0.5) < 5 * np.sqrt(0.25 / 4000)


def test_sample_categorical_never_draws_a_top_p_removed_token_in_the_rounding_gaps(monkeypatch):
  """XLA's running sum over a 262144-entry row is not monotone to the last bit. Uniforms placed in the gaps where
  it rises at a zero-mass (top-p removed) token must still draw a token of positive mass."""
  from diffgemma_jax.sampling import parts
  V, N = 262144, 64
  logits = parts.top_p_filter(jnp.asarray(np.random.default_rng(0).normal(size=(1, V)) * 4, jnp.float32), 0.9)
  zero = ~np.isfinite(np.asarray(logits))[0]
  rows = jnp.broadcast_to(logits, (N, V))
  c = np.asarray(jax.jit(lambda x: jnp.cumsum(jax.nn.softmax(x, axis=-1), axis=-1))(rows))[0]
  gaps = [k for k in range(1, V) if zero[k] and c[k] > c[k - 1]][:N]
  if len(gaps) < N:
    pytest.skip(f"this backend's running sum rises at only {len(gaps)} zero-mass entries")
  uniforms = jnp.asarray([[(c[k - 1] + (c[k] - c[k - 1]) / 2) / c[-1]] for k in gaps], jnp.float32)
  monkeypatch.setattr(parts.jax.random, "uniform", lambda key, shape, *a, **k: uniforms)
  drawn = np.asarray(jax.jit(parts.sample_categorical)(jax.random.key(0), rows))
  assert not zero[drawn].any(), f"{zero[drawn].sum()} of {N} draws have zero probability"


def test_bad_sampler_config():
  with pytest.raises(ValueError, match="acceptance"):
    SamplerConfig(acceptance="greedy")
  with pytest.raises(ValueError, match="block_length"):
    SamplerConfig(gen_length=30, block_length=8)
  with pytest.raises(ValueError, match="threshold"):
    SamplerConfig(threshold=0.0)
  with pytest.raises(ValueError, match="cache"):
    SamplerConfig(cache="prefix_only")


def test_truncate_at_eos():
  assert truncate_at_eos([5, 6, 3, 7], eos_id=3) == [5, 6]
  assert truncate_at_eos([5, 6], eos_id=3) == [5, 6]

"""The sampler parts (`sampling/parts.py`): the even schedule, the acceptance rules, top-p and the categorical sampler
against exact probabilities, and EOS truncation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.sampling import parts
from diffgemma_jax.sampling.parts import (accept_low_confidence, accept_threshold, even_schedule, sample_categorical,
                                          sample_next, top_p_filter, truncate_at_eos)


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

def test_truncate_at_eos():
  assert truncate_at_eos([5, 6, 3, 7], eos_id=3) == [5, 6]
  assert truncate_at_eos([5, 6], eos_id=3) == [5, 6]

"""The estimator pieces every objective shares (`objectives/estimators.py`): the stratified noise grid against its
definition, the mean and standard error against numpy, the mask-token exclusion against a direct softmax."""

import jax
import jax.numpy as jnp
import numpy as np

from diffgemma_jax.objectives.estimators import (masked_token_nll, mean_and_stderr, states_excluding,
                                                 stratified_levels, stratified_t, without)

EPS = 1e-3


def test_stratified_t_covers_eps_to_one():
  for seed in range(5):
    B = 16
    t = np.sort(np.asarray(stratified_t(jax.random.key(seed), B, EPS)))
    edges = EPS + (1 - EPS) * np.arange(B + 1) / B
    # exactly one sample in each of the B strata of [eps, 1]
    assert np.all(t >= edges[:-1] - 1e-7) and np.all(t < edges[1:] + 1e-7)
    assert t.min() >= EPS and t.max() <= 1.0


def test_stratified_levels_are_the_grid_of_one_offset_per_entry():
  rng = jax.random.key(3)
  levels = np.asarray(stratified_levels(rng, (2, 3), 4, EPS), np.float64)
  u = np.asarray(jax.random.uniform(rng, (2, 3)), np.float64)
  expected = EPS + (1 - EPS) * np.mod(u[None] + np.arange(4)[:, None, None] / 4, 1.0)
  np.testing.assert_allclose(levels, expected, rtol=1e-6)
  # one row's K levels: exactly one in each of the K strata of [eps, 1]
  for column in levels.reshape(4, -1).T:
    strata = np.floor((np.sort(column) - EPS) / (1 - EPS) * 4)
    assert strata.tolist() == [0, 1, 2, 3]
  np.testing.assert_array_equal(stratified_t(rng, 5, EPS), stratified_levels(rng, (), 5, EPS))


def test_mean_and_stderr():
  estimates = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
  mean, stderr = mean_and_stderr(jnp.asarray(estimates))
  np.testing.assert_allclose(mean, estimates.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stderr, estimates.std(0, ddof=1) / np.sqrt(6), rtol=1e-5)
  mean, stderr = mean_and_stderr(jnp.asarray(estimates[:1]))
  np.testing.assert_array_equal(stderr, np.zeros(3))
  np.testing.assert_array_equal(mean, estimates[0])


def test_mask_token_gets_zero_probability():
  V, mask_id = 11, 4
  logits = jax.random.normal(jax.random.key(0), (2, 5, V))
  logits = logits.at[..., mask_id].set(50.0)  # the model wants to predict the mask token; it may not
  tokens = jnp.array([[0, 1, 2, 3, 5], [6, 7, 8, 9, 10]])
  nll = masked_token_nll(logits, tokens, mask_id=mask_id)
  keep = np.delete(np.asarray(logits), mask_id, axis=-1)
  log_z = np.log(np.sum(np.exp(keep), -1))
  expected = log_z - np.take_along_axis(np.asarray(logits), np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_no_mask_token_excludes_nothing():
  assert states_excluding(-1) == () and states_excluding(4) == (4,)
  logits = jax.random.normal(jax.random.key(1), (1, 2, 6))
  np.testing.assert_array_equal(without(logits, ()), logits)
  assert bool(jnp.all(jnp.isneginf(without(logits, (2, 5))[..., jnp.array([2, 5])])))

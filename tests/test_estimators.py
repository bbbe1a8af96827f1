"""The estimator pieces every objective shares (`objectives/estimators.py`): the stratified noise grid against its
definition, the mean and standard error against numpy, the mask-token exclusion against a direct softmax, and the
bound's per-row draws (a row's estimate the same alone or padded among other rows, for every estimator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.objectives.block import block_nelbo
from diffgemma_jax.objectives.estimators import (CORRUPT_STREAM, T_STREAM, masked_token_nll, mean_and_stderr,
                                                 row_draws, row_keys, row_levels, states_excluding, stratified_grid,
                                                 stratified_levels, stratified_t, without)
from diffgemma_jax.objectives.masked import masked_nelbo
from diffgemma_jax.objectives.uniform import uniform_nelbo

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


def test_row_draws_depend_on_the_row_key_and_index_only():
  """Entry (b, l) is the same draw whatever the length asked for and whichever rows share the batch; a single key
  gives row b the key fold_in(key, b)."""
  keys = row_keys(jax.random.key(7), 3)
  np.testing.assert_array_equal(jax.random.key_data(keys[1]), jax.random.key_data(jax.random.fold_in(
      jax.random.key(7), 1)))
  wide = np.asarray(row_draws(keys, CORRUPT_STREAM, 2, 12))
  np.testing.assert_array_equal(np.asarray(row_draws(keys[1:2], CORRUPT_STREAM, 2, 5)), wide[1:2, :5])
  assert not np.allclose(wide, np.asarray(row_draws(keys, CORRUPT_STREAM, 3, 12)))  # another sample
  assert not np.allclose(wide, np.asarray(row_draws(keys, T_STREAM, 2, 12)))  # another stream
  assert np.all((wide >= 0) & (wide < 1)) and 0.3 < wide.mean() < 0.7
  levels = np.asarray(row_levels(keys, 2, 4, EPS))
  assert levels.shape == (4, 3, 2)
  np.testing.assert_allclose(levels, np.asarray(stratified_grid(row_draws(keys, T_STREAM, 0, 2), 4, EPS)))
  with pytest.raises(ValueError, match="one key or one per row"):
    row_keys(jax.random.split(jax.random.key(0), 2), 3)


def test_every_estimator_scores_a_row_alike_alone_and_padded_among_others():
  """masked_nelbo, block_nelbo and uniform_nelbo of one row given its key, alone in a row of 8 and as the middle
  row of a batch of 3 rows padded to 12: the same estimate and standard error (the logits are a function of each
  position's noisy token, so equal draws give equal estimates; other draws would not)."""
  V, mask_id, K = 12, 0, 4
  table = jax.random.normal(jax.random.key(5), (V, V))
  logits_fn = lambda noisy, *_: table[noisy]  # noqa: E731
  row = jnp.array([[3, 5, 7, 2, 9, 4, 4, 11]])
  wide = jnp.concatenate([jax.random.randint(jax.random.key(1), (1, 12), 1, V),
                          jnp.pad(row, ((0, 0), (0, 4))), jax.random.randint(jax.random.key(2), (1, 12), 1, V)])
  real = jnp.arange(12)[None] < jnp.array([[12], [8], [10]])
  key = jax.random.key(9)
  wide_keys = jnp.stack([jax.random.key(3), key, jax.random.key(4)])
  block = lambda L: jnp.broadcast_to(jnp.arange(L) // 4, (1, L))  # noqa: E731
  estimators = {
      "masked": lambda tokens, keys, scored: masked_nelbo(logits_fn, tokens, keys, mask_id=mask_id,
                                                          num_t_samples=K, pad_mask=scored),
      "block": lambda tokens, keys, scored: block_nelbo(
          logits_fn, tokens, jnp.broadcast_to(block(tokens.shape[1]), tokens.shape), tokens.shape[1] // 4, keys,
          mask_id=mask_id, num_t_samples=K, scored_BL=scored),
      "uniform": lambda tokens, keys, scored: uniform_nelbo(
          logits_fn, tokens, jnp.broadcast_to(block(tokens.shape[1]), tokens.shape), tokens.shape[1] // 4, keys,
          excluded_ids=(mask_id,), vocab_size=V, num_t_samples=K, scored_BL=scored)}
  for name, estimate in estimators.items():
    alone = estimate(row, key[None], jnp.ones((1, 8), bool))
    among = estimate(wide, wide_keys, real)
    for a, b in zip(alone, among):
      np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[1], rtol=1e-6, err_msg=name)
    assert float(alone[1][0]) > 0, name  # the draws vary across the K samples

"""The masked-diffusion ELBO: corruption, analytic values, padding, token shift. The training loss recomputed from
what a spy model saw, pretraining and SFT, is in tests/test_objective_spies.py; the noise grid and the mask-token
exclusion in tests/test_estimators.py."""

import types

import jax
import jax.numpy as jnp
import numpy as np

from diffgemma_jax.objectives import MaskedDiffusion, corrupt, masked_nelbo

EPS = 1e-3


def test_corruption_rate_and_padding():
  tokens = jnp.full((4, 4096), 7, jnp.int32)
  t = jnp.array([0.1, 0.5, 0.9, 1.0])
  pad = jnp.arange(4096)[None, :] < 3000
  noisy, masked = corrupt(jax.random.key(0), tokens, t, mask_id=3, corruptible_BL=jnp.broadcast_to(pad, (4, 4096)))
  rate = np.asarray(jnp.sum(masked, -1) / 3000)
  np.testing.assert_allclose(rate, t, atol=0.03)
  assert not bool(jnp.any(masked[:, 3000:]))
  assert bool(jnp.all(jnp.where(masked, noisy == 3, noisy == 7)))


def _iid_source(V, mask_id, seed=0):
  rng = np.random.default_rng(seed)
  pi = rng.dirichlet(np.ones(V) * 0.7)
  pi[mask_id] = 0.0
  return pi / pi.sum()


def test_analytic_bound_for_an_iid_source_and_the_exact_denoiser():
  """Exact denoiser of an i.i.d. source predicts pi at every masked position; E[NELBO] = L * H(pi)."""
  V, mask_id, L, N = 16, 0, 64, 512
  pi = _iid_source(V, mask_id)
  entropy = -np.sum(pi[pi > 0] * np.log(pi[pi > 0]))
  tokens = jax.random.choice(jax.random.key(1), V, (N, L), p=jnp.asarray(pi))
  log_pi = jnp.log(jnp.asarray(pi) + 1e-30)

  def logits_fn(noisy):
    return jnp.broadcast_to(log_pi, noisy.shape + (V,))

  nelbo, stderr = jax.jit(lambda r: masked_nelbo(logits_fn, tokens, r, mask_id=mask_id, num_t_samples=8))(
      jax.random.key(2))
  # the estimate is unbiased for sum_l -log pi(x_l) of each sequence given the sequence
  exact_given_x = -np.sum(np.log(pi[np.asarray(tokens)]), -1)
  z = (np.asarray(nelbo) - exact_given_x) / np.maximum(np.asarray(stderr), 1e-9)
  assert np.mean(np.abs(z) < 3) > 0.97
  # and, over sequences, for L * H(pi)
  mean = float(np.mean(nelbo))
  se = float(np.std(nelbo, ddof=1) / np.sqrt(N))
  assert abs(mean - L * entropy) < 3 * se, (mean, L * entropy, se)


def test_padding_is_never_corrupted_or_scored():
  """Rows with 32, 16 and 0 real tokens then padding, and logits uniform over the V-1 non-mask tokens: each
  scored token costs log(V-1), so E[NELBO] = n_real * log(V-1), checked against each row's own Monte-Carlo error
  (64 copies of each row, 64 noise levels each; log V, the mask token not excluded, is 6-8 errors off)."""
  V, mask_id, L, copies = 10, 0, 32, 64
  real = np.repeat([32, 16, 0], copies)
  tokens = jnp.full((len(real), L), 5, jnp.int32)
  pad = jnp.arange(L)[None, :] < jnp.asarray(real)[:, None]
  logits_fn = lambda noisy: jnp.zeros(noisy.shape + (V,))
  nelbo, stderr = masked_nelbo(logits_fn, tokens, jax.random.key(0), mask_id=mask_id, num_t_samples=64,
                               pad_mask=pad)
  nelbo, stderr = np.asarray(nelbo).reshape(3, copies), np.asarray(stderr).reshape(3, copies)
  assert np.all(nelbo[2] == 0.0) and np.all(stderr[2] == 0.0)
  for row, n in ((0, 32), (1, 16)):
    mean, error = nelbo[row].mean(), np.sqrt(np.sum(stderr[row] ** 2)) / copies
    assert abs(mean - n * np.log(V - 1)) < 4 * error, (mean, n * np.log(V - 1), error)


class _UniformModel:
  """Logits all zero: predicts uniformly over the V-1 non-mask tokens, so every masked token costs log(V-1)."""

  def __init__(self, V):
    self.V = V
    self.cfg = types.SimpleNamespace(token_shift=False)

  def __call__(self, tokens, positions, mask, token_mask_BL=None, embeddings_BLD=None):
    aux = {"aux_loss": jnp.float32(0), "load_balance_loss": jnp.float32(1), "router_z_loss": jnp.float32(0),
           "expert_load": jnp.ones((1, 2)) / 2, "dropped_tokens": jnp.float32(0)}
    return jnp.zeros(tokens.shape + (self.V,)), aux


def test_expected_training_loss_is_the_per_token_entropy_bound():
  """Averaged over draws, the 1/t-weighted loss of the uniform denoiser is log(V-1) per token."""
  V, mask_id, B, L = 12, 4, 64, 64
  tokens = jax.random.randint(jax.random.key(0), (B, L), 5, V)
  batch = {"tokens": tokens, "segment_ids": jnp.ones((B, L), jnp.int32), "positions": jnp.tile(jnp.arange(L), (B, 1))}
  objective = MaskedDiffusion(mask_id=mask_id, eps=EPS)
  losses = jax.jit(jax.vmap(lambda r: objective.loss_fn(_UniformModel(V), batch, r)[0]))(
      jax.random.split(jax.random.key(1), 64))
  np.testing.assert_allclose(float(jnp.mean(losses)), np.log(V - 1), rtol=0.01)


class _NextTokenOracle(_UniformModel):
  """Its output at position l is sure (logit 30) of the clean token at l + 1: an exact predictor when read with
  token shift, a useless one when read at l itself."""

  def __init__(self, V, clean_BL, token_shift):
    super().__init__(V)
    self.clean_BL = clean_BL
    self.cfg = types.SimpleNamespace(token_shift=token_shift)

  def __call__(self, tokens, *args, **kw):
    _, aux = super().__call__(tokens, *args, **kw)
    return 30.0 * jax.nn.one_hot(jnp.roll(self.clean_BL, -1, axis=1), self.V), aux


def test_token_shift_reads_the_prediction_one_slot_back():
  """With model.token_shift the objective scores position l with the output at l - 1: the next-token oracle costs
  nothing (log(1 + (V-2) e^-30) per token), read unshifted it costs ~30 nats a token; and a document's first token
  is never scored (rows: one document of 5, 10, ... tokens, then padding)."""
  V, mask_id, B, L = 12, 4, 6, 32
  tokens = jax.random.randint(jax.random.key(0), (B, L), 5, V)
  lengths = np.arange(1, B + 1) * 5
  segment_ids = jnp.asarray(np.arange(L)[None] < lengths[:, None], jnp.int32)
  batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": jnp.tile(jnp.arange(L), (B, 1))}
  objective = MaskedDiffusion(mask_id=mask_id, eps=EPS)
  per_token = np.log1p((V - 2) * np.exp(-30.0))
  loss, metrics = objective.loss_fn(_NextTokenOracle(V, tokens, True), batch, jax.random.key(1))
  assert float(loss) < 2 * per_token / EPS and int(metrics["num_tokens"]) == int(np.sum(lengths - 1))
  nelbo, _, num = objective.sequence_bound(_NextTokenOracle(V, tokens, True), batch, jax.random.key(2),
                                           num_t_samples=4)
  np.testing.assert_array_equal(num, lengths - 1)
  assert float(jnp.max(nelbo)) < 2 * per_token * L / EPS
  unshifted, metrics = objective.loss_fn(_NextTokenOracle(V, tokens, False), batch, jax.random.key(1))
  assert float(unshifted) > 20.0 and int(metrics["num_tokens"]) == int(np.sum(lengths))

"""Uniform-state objective: noise, the continuous-time ELBO against analytic values, the training loss and
self-conditioning."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.model.self_conditioning import expected_embedding
from diffgemma_jax.objectives import UniformDiffusion
from diffgemma_jax.objectives.masked import masked_token_nll
from diffgemma_jax.objectives.uniform import (states_excluding, uniform_corrupt, uniform_elbo_integrand,
                                             uniform_nelbo)

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=6, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense")
MASK = 63

# An i.i.d. source over the 7 non-mask states of an 8-token vocabulary (mask id 7).
V_IID, MASK_IID, N_IID = 8, 7, 7
PI = np.random.default_rng(0).dirichlet(np.ones(N_IID))
ENTROPY = float(-(PI * np.log(PI)).sum())
LOG_PI = jnp.log(jnp.asarray(np.concatenate([PI, [1e-30]]), jnp.float32))


def exact_posterior_logits(noisy_BL, t_BL):
  """log p(x0 | z) + const for the i.i.d. source: pi(x0) q_t(z | x0), q_t(z | x0) = alpha [z = x0] + (1-alpha)/N."""
  alpha = (1.0 - t_BL)[..., None]
  likelihood = alpha * jax.nn.one_hot(noisy_BL, V_IID) + (1.0 - alpha) / N_IID
  return LOG_PI + jnp.log(likelihood)


def test_uniform_noise_never_draws_the_mask_token_and_replaces_at_rate_t():
  tokens = jnp.zeros((64, 256), jnp.int32)
  t = jnp.linspace(0.0, 1.0, 64)[:, None] * jnp.ones((1, 256))
  corruptible = jnp.ones(tokens.shape, bool).at[:, :16].set(False)
  noisy, replaced = uniform_corrupt(jax.random.key(0), tokens, t, vocab_size=V_IID, excluded_ids=(MASK_IID,),
                                    corruptible_BL=corruptible)
  assert not bool(jnp.any(noisy == MASK_IID)) and not bool(jnp.any(replaced[:, :16]))
  rate = np.asarray(jnp.mean(replaced[:, 16:], axis=1))
  np.testing.assert_allclose(rate, np.linspace(0, 1, 64), atol=0.1)
  # a replacement is uniform over the 7 states, the token itself included
  counts = np.bincount(np.asarray(noisy[replaced]), minlength=V_IID)[:N_IID]
  np.testing.assert_allclose(counts / counts.sum(), 1.0 / N_IID, atol=0.02)
  # excluded ids in the middle of the vocabulary are skipped too
  drawn = uniform_corrupt(jax.random.key(1), tokens, jnp.ones(tokens.shape), vocab_size=V_IID, excluded_ids=(0, 3),
                          corruptible_BL=jnp.ones(tokens.shape, bool))[0]
  assert set(np.unique(np.asarray(drawn))) == {1, 2, 4, 5, 6, 7}


def test_integrand_is_nonnegative_and_zero_for_a_perfect_prediction():
  B, L = 4, 32
  clean = jax.random.randint(jax.random.key(0), (B, L), 0, N_IID)
  t = jax.random.uniform(jax.random.key(1), (B, L), minval=1e-3, maxval=1.0)
  noisy, _ = uniform_corrupt(jax.random.key(2), clean, t, vocab_size=V_IID, excluded_ids=(MASK_IID,),
                             corruptible_BL=jnp.ones((B, L), bool))
  random_logits = 3.0 * jax.random.normal(jax.random.key(3), (B, L, V_IID))
  f = uniform_elbo_integrand(random_logits, noisy, clean, t, excluded_ids=(MASK_IID,))
  assert bool(jnp.all(f >= 0)) and bool(jnp.all(jnp.isfinite(f)))
  perfect = 30.0 * jax.nn.one_hot(clean, V_IID)
  np.testing.assert_allclose(uniform_elbo_integrand(perfect, noisy, clean, t, excluded_ids=(MASK_IID,)), 0.0,
                             atol=1e-4)


def test_the_integral_of_the_exact_integrand_is_the_entropy():
  """Deterministic: E_{x ~ pi, z ~ q_t(.|x)} f_t under the exact posterior, integrated over t in (0, 1) by
  Gauss-Legendre on a log-spaced grid, equals H(pi): with exact reverse rates the ELBO is tight."""
  x, z = np.meshgrid(np.arange(N_IID), np.arange(N_IID), indexing="ij")
  x, z = jnp.asarray(x.reshape(1, -1)), jnp.asarray(z.reshape(1, -1))
  nodes, weights = np.polynomial.legendre.leggauss(48)
  total = 0.0
  for lo, hi in zip(np.r_[0.0, np.logspace(-8, 0, 17)[:-1]], np.logspace(-8, 0, 17)):
    ts = (hi - lo) / 2 * nodes + (hi + lo) / 2
    t = jnp.asarray(ts, jnp.float32)[:, None] * jnp.ones(x.shape)
    f = uniform_elbo_integrand(exact_posterior_logits(jnp.broadcast_to(z, t.shape), t),
                               jnp.broadcast_to(z, t.shape), jnp.broadcast_to(x, t.shape), t,
                               excluded_ids=(MASK_IID,))
    alpha = 1.0 - t
    q_z_given_x = alpha * (x == z) + (1.0 - alpha) / N_IID
    expected_f = np.asarray(jnp.sum(f * q_z_given_x * jnp.asarray(PI)[x], axis=-1))
    total += (hi - lo) / 2 * float(np.sum(weights * expected_f))
  assert abs(total - ENTROPY) < 2e-3 * ENTROPY, (total, ENTROPY)


def test_uniform_elbo_of_the_exact_denoiser_is_the_entropy():
  """Monte Carlo: rows of i.i.d. tokens, the exact denoiser, 4 blocks of 8 with K stratified t each plus the
  reconstruction term. The mean NELBO per row is L * H(pi) within 3 standard errors, and (tight bound) each row's
  NELBO estimates its own -log p(x)."""
  B, L, K = 128, 32, 8
  tokens = jax.random.choice(jax.random.key(0), N_IID, (B, L), p=jnp.asarray(PI))
  blocks = jnp.broadcast_to(jnp.arange(L) // 8, (B, L))
  nelbo, stderr = jax.jit(lambda rng: uniform_nelbo(exact_posterior_logits, tokens, blocks, 4, rng,
                                                    excluded_ids=(MASK_IID,), vocab_size=V_IID, num_t_samples=K))(
                                                        jax.random.key(1))
  nelbo = np.asarray(nelbo)
  across_rows = nelbo.std(ddof=1) / math.sqrt(B)
  assert abs(nelbo.mean() - L * ENTROPY) < 3 * across_rows, (nelbo.mean(), L * ENTROPY, across_rows)
  nll = -np.asarray(jnp.sum(LOG_PI[tokens], axis=-1))
  gap = nelbo - nll
  assert abs(gap.mean()) < 3 * gap.std(ddof=1) / math.sqrt(B), (gap.mean(), gap.std())
  assert np.all(np.asarray(stderr) > 0)


def test_a_tokenizer_without_a_mask_token_makes_every_id_a_state():
  """The released tokenizer has no mask token (mask_id -1): the states are the whole vocabulary, id V-1 included
  (-1 must not be taken as an index), and the exact denoiser's bound is still -log p(x)."""
  V = 8
  assert states_excluding(-1) == () and UniformDiffusion(mask_id=-1).excluded_ids == ()
  assert float(masked_token_nll(jnp.zeros((1, 1, V)), jnp.array([[V - 1]]), mask_id=-1)[0, 0]) == pytest.approx(
      math.log(V))
  tokens = jnp.zeros((16, 512), jnp.int32)
  drawn = uniform_corrupt(jax.random.key(0), tokens, jnp.ones(tokens.shape), vocab_size=V, excluded_ids=(),
                          corruptible_BL=jnp.ones(tokens.shape, bool))[0]
  assert set(np.unique(np.asarray(drawn))) == set(range(V))
  pi = np.random.default_rng(1).dirichlet(np.ones(V))
  log_pi = jnp.log(jnp.asarray(pi, jnp.float32))

  def exact(noisy_BL, t_BL):
    alpha = (1.0 - t_BL)[..., None]
    return log_pi + jnp.log(alpha * jax.nn.one_hot(noisy_BL, V) + (1.0 - alpha) / V)

  B, L = 128, 16
  tokens = jax.random.choice(jax.random.key(2), V, (B, L), p=jnp.asarray(pi)).at[:, 0].set(V - 1)
  nelbo, _ = jax.jit(lambda rng: uniform_nelbo(exact, tokens, jnp.zeros((B, L), jnp.int32), 1, rng,
                                               excluded_ids=states_excluding(-1), vocab_size=V, num_t_samples=8))(
                                                   jax.random.key(3))
  gap = np.asarray(nelbo) + np.asarray(jnp.sum(log_pi[tokens], axis=-1))
  assert np.all(np.isfinite(gap)) and abs(gap.mean()) < 3 * gap.std(ddof=1) / math.sqrt(B), (gap.mean(), gap.std())


def test_a_wrong_denoiser_gives_a_larger_bound():
  B, L = 64, 32
  tokens = jax.random.choice(jax.random.key(0), N_IID, (B, L), p=jnp.asarray(PI))
  blocks = jnp.zeros((B, L), jnp.int32)
  uniform_logits = lambda noisy, t: jnp.zeros(noisy.shape + (V_IID,))
  bound = lambda fn: float(jnp.mean(uniform_nelbo(fn, tokens, blocks, 1, jax.random.key(1), excluded_ids=(MASK_IID,),
                                                  vocab_size=V_IID, num_t_samples=8)[0]))
  assert bound(uniform_logits) > bound(exact_posterior_logits) + 0.5 * L * (math.log(N_IID) - ENTROPY)


def _batch(B=2, L=16, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, MASK)
  segments = jnp.asarray([[1] * 10 + [2] * 6] + [[1] * L] * (B - 1), jnp.int32)
  positions = jnp.asarray([list(range(10)) + list(range(6))] + [list(range(L))] * (B - 1), jnp.int32)
  return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def test_self_conditioning_off_equals_the_model_without_the_mlp():
  batch = _batch()
  plain = build_model(TINY, 0)
  with_sc = build_model(dataclasses.replace(TINY, self_conditioning=True), 0)
  assert plain.self_conditioning is None and with_sc.self_conditioning is not None
  flat = lambda m: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(nnx.state(m))[0]}
  plain_params, sc_params = flat(plain), flat(with_sc)
  assert set(sc_params) - set(plain_params) and all("self_conditioning" in k for k in set(sc_params) - set(plain_params))
  for key, value in plain_params.items():
    np.testing.assert_array_equal(value, sc_params[key])  # the module only adds parameters
  rng = jax.random.key(3)
  # one compiled loss per model structure; the self-conditioning probability is traced
  loss = nnx.jit(lambda m, r, p: UniformDiffusion(mask_id=MASK, block_size=4, self_cond_prob=p).loss_fn(m, batch, r)[0])
  loss_plain = loss(plain, rng, 0.5)
  # on but untrained (zero output projection): the same loss and the same bound
  np.testing.assert_allclose(loss(with_sc, rng, 0.5), loss_plain, rtol=1e-6)
  objective = UniformDiffusion(mask_id=MASK, block_size=4)
  bound = lambda m: jax.jit(lambda r: objective.sequence_bound(m, batch, r, num_t_samples=2)[0])(rng)
  np.testing.assert_allclose(bound(with_sc), bound(plain), rtol=1e-5)
  # trained (non-zero output): the signal enters, but only for the rows that draw it
  with_sc.self_conditioning.w_down[...] = 0.1 * jax.random.normal(jax.random.key(4),
                                                                  with_sc.self_conditioning.w_down.shape)
  np.testing.assert_allclose(loss(with_sc, rng, 0.0), loss_plain, rtol=1e-6)
  assert abs(float(loss(with_sc, rng, 1.0)) - float(loss_plain)) > 1e-4


def test_the_self_conditioning_signal_carries_no_gradient():
  model = build_model(dataclasses.replace(TINY, self_conditioning=True), 0)
  logits = jax.random.normal(jax.random.key(0), (2, 4, TINY.vocab_size))
  embedding = model.embedder.embedding[...]
  grad = jax.grad(lambda l: jnp.sum(expected_embedding(embedding, l, excluded_ids=(MASK,)) ** 2))(logits)
  assert float(jnp.max(jnp.abs(grad))) == 0.0
  signal = expected_embedding(embedding, 50.0 * jax.nn.one_hot(jnp.full((2, 4), 5), TINY.vocab_size))
  np.testing.assert_allclose(signal, jnp.broadcast_to(embedding[5] * TINY.embed_dim ** 0.5, signal.shape), rtol=1e-5)


def test_training_loss_is_canvas_ce_plus_weighted_encoder_loss():
  batch = _batch()
  model = build_model(dataclasses.replace(TINY, self_conditioning=True), 0)
  rng = jax.random.key(5)
  loss_fn = jax.jit(lambda r, w: UniformDiffusion(mask_id=MASK, block_size=4, encoder_loss_weight=w).loss_fn(
      model, batch, r))
  out = {w: loss_fn(rng, w) for w in (0.0, 1.0, 2.5)}
  for w, (loss, metrics) in out.items():
    np.testing.assert_allclose(loss, metrics["canvas_ce_per_token"] + w * metrics["encoder_nll_per_token"],
                               rtol=1e-6)
  assert int(out[1.0][1]["num_tokens"]) == 2 * 4  # one canvas of 4 tokens per row
  # The canvas CE is the token-weighted mean of its replaced and kept parts.
  metrics = out[1.0][1]
  replaced = metrics["replaced_fraction"]
  assert 0 < replaced < 1
  np.testing.assert_allclose(replaced * metrics["canvas_ce_replaced"] + (1 - replaced) * metrics["canvas_ce_kept"],
                             metrics["canvas_ce_per_token"], rtol=1e-6)
  grads = nnx.jit(nnx.grad(lambda m: UniformDiffusion(mask_id=MASK, block_size=4).loss_fn(m, batch, rng)[0]))(model)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # only pass 2 is differentiated; the zero-initialised output projection is what learns first
  assert float(jnp.max(jnp.abs(grads.self_conditioning.w_down[...]))) > 0


def test_block_size_must_divide_the_row():
  from diffgemma_jax.model import ConfigError
  with pytest.raises(ConfigError, match=r"objective.block_size=5.*train.seq_len=16"):
    UniformDiffusion(mask_id=MASK, block_size=5).loss_fn(build_model(TINY, 0), _batch(), jax.random.key(0))


def test_diffusiongemma_tiny_config_trains_one_step():
  import os
  from diffgemma_jax.config import load_config
  from diffgemma_jax.model.config import ModelConfig as MC
  from diffgemma_jax.objectives import make_objective
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  config = load_config(os.path.join(root, "diffusiongemma_tiny.py"), {"model.dispatch": "dense"})
  cfg = MC.from_config_dict(config.model)
  assert cfg.layer_kinds[:6] == ("sliding",) * 5 + ("global",) and cfg.self_conditioning
  objective = make_objective(config.objective.name, mask_id=cfg.vocab_size - 1, section=config.objective)
  model = build_model(cfg, 0)
  L = int(config.train.seq_len)
  batch = {"tokens": jax.random.randint(jax.random.key(0), (2, L), 0, cfg.vocab_size - 1),
           "segment_ids": jnp.ones((2, L), jnp.int32), "positions": jnp.tile(jnp.arange(L), (2, 1))}
  loss, metrics = jax.jit(lambda r: objective.loss_fn(model, batch, r))(jax.random.key(1))
  assert np.isfinite(float(loss)) and int(metrics["num_tokens"]) == 2 * int(config.objective.block_size)

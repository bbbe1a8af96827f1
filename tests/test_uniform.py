"""Uniform-state objective: noise, the continuous-time ELBO against analytic values (an i.i.d. source, a Markov
chain, a prediction that ignores its input), the training loss and self-conditioning."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ConstantLogits
from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.model.self_conditioning import expected_embedding
from diffgemma_jax.objectives import UniformDiffusion
from diffgemma_jax.objectives.estimators import masked_token_nll, states_excluding
from diffgemma_jax.objectives.uniform import uniform_corrupt, uniform_elbo_integrand, uniform_nelbo

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
  from diffgemma_jax.errors import ConfigError
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
  objective = make_objective(config.objective, mask_id=cfg.vocab_size - 1)
  model = build_model(cfg, 0)
  L = int(config.train.seq_len)
  batch = {"tokens": jax.random.randint(jax.random.key(0), (2, L), 0, cfg.vocab_size - 1),
           "segment_ids": jnp.ones((2, L), jnp.int32), "positions": jnp.tile(jnp.arange(L), (2, 1))}
  loss, metrics = jax.jit(lambda r: objective.loss_fn(model, batch, r))(jax.random.key(1))
  assert np.isfinite(float(loss)) and int(metrics["num_tokens"]) == 2 * int(config.objective.block_size)


# ---- a source with context: a Markov chain whose posteriors are enumerated ---------------------------------------
# 4 states (mask id 4), a sticky transition matrix: the context carries most of the information, so a denoiser that
# ignores it is far from the chain's entropy rate.
V_MC, MASK_MC, N_MC, BLOCK_MC = 5, 4, 4, 3
TRANSITION = np.full((N_MC, N_MC), 0.1 / 3) + np.eye(N_MC) * (0.9 - 0.1 / 3)
START = np.full(N_MC, 1.0 / N_MC)  # also the stationary distribution of this chain
CONFIGS = np.array(np.meshgrid(*[np.arange(N_MC)] * BLOCK_MC, indexing="ij")).reshape(BLOCK_MC, -1).T  # [64, 3]


def _markov_rows(rng, num_rows: int, length: int) -> np.ndarray:
  rows = np.zeros((num_rows, length), np.int64)
  rows[:, 0] = rng.choice(N_MC, num_rows, p=START)
  for l in range(1, length):
    u = rng.random(num_rows)[:, None]
    rows[:, l] = np.argmax(u < np.cumsum(TRANSITION[rows[:, l - 1]], axis=-1), axis=-1)
  return rows


def _markov_posterior_logits(clean_BL):
  """The exact denoiser of a block given its noisy tokens and the clean token before it: log p(x_l | z_block,
  x_<block) by enumerating the block's 4^3 values (per-token t, as `uniform_nelbo` passes it)."""
  B, L = clean_BL.shape
  nb = L // BLOCK_MC
  log_T, log_start = jnp.log(jnp.asarray(TRANSITION)), jnp.log(jnp.asarray(START))
  configs = jnp.asarray(CONFIGS)
  # prior of each configuration of each block given the clean token before it: [B, nb, 64]
  previous = jnp.asarray(clean_BL).reshape(B, nb, BLOCK_MC)[:, :, -1]
  first = jnp.concatenate([jnp.broadcast_to(log_start[configs[:, 0]], (B, 1, len(CONFIGS))),
                           log_T[previous[:, :-1]][..., configs[:, 0]]], axis=1)
  prior = first + sum(log_T[configs[:, j - 1], configs[:, j]] for j in range(1, BLOCK_MC))

  def logits_fn(noisy_BL, t_BL):
    alpha = (1.0 - t_BL).reshape(B, nb, 1, BLOCK_MC)
    z = noisy_BL.reshape(B, nb, 1, BLOCK_MC)
    likelihood = jnp.sum(jnp.log(alpha * (z == configs[None, None]) + (1.0 - alpha) / N_MC), axis=-1)
    log_post = jax.nn.log_softmax(prior + likelihood, axis=-1)  # [B, nb, 64]
    one_hot = jax.nn.one_hot(configs, N_MC)  # [64, 3, N]
    marginal = jnp.einsum("bnc,cjx->bnjx", jnp.exp(log_post), one_hot).reshape(B, L, N_MC)
    return jnp.concatenate([jnp.log(marginal + 1e-30), jnp.full((B, L, 1), -1e30)], axis=-1)

  return logits_fn


def test_uniform_elbo_is_tight_for_a_source_with_context():
  """Rows of a sticky Markov chain in 4 blocks of 3. The exact denoiser (the posterior of each token given its noisy
  block and the clean tokens before it) gives a NELBO whose gap to each row's exact -log p(x) is pure Monte-Carlo
  noise with mean 0: within 4 standard errors of the rows' gaps (heavy-tailed: the 1/t of the small noise levels;
  about 0.1 nats). A NELBO noising each token at its own t instead of one t per block is 1 nat too high. The
  exact denoiser of a uniform i.i.d. source ignores the context and pays exactly what it misses, L log 4 - the
  row's -log p(x)."""
  B, L, K = 1024, 4 * BLOCK_MC, 32
  clean = _markov_rows(np.random.default_rng(0), B, L)
  log_T = np.log(TRANSITION)
  nll = -np.log(START[clean[:, 0]]) - np.sum(log_T[clean[:, :-1], clean[:, 1:]], axis=-1)
  tokens = jnp.asarray(clean, jnp.int32)
  blocks = jnp.broadcast_to(jnp.arange(L) // BLOCK_MC, (B, L))
  bound = jax.jit(lambda fn, rng: uniform_nelbo(fn, tokens, blocks, L // BLOCK_MC, rng, excluded_ids=(MASK_MC,),
                                                vocab_size=V_MC, num_t_samples=K)[0], static_argnums=0)
  stderr = lambda x: x.std(ddof=1) / np.sqrt(len(x))
  gap = np.asarray(bound(_markov_posterior_logits(clean), jax.random.key(1)), np.float64) - nll
  assert abs(gap.mean()) < 4 * stderr(gap), (gap.mean(), stderr(gap))

  def context_blind(noisy_BL, t_BL):
    alpha = (1.0 - t_BL)[..., None]
    likelihood = alpha * jax.nn.one_hot(noisy_BL, V_MC) + (1.0 - alpha) / N_MC
    return jnp.log(jnp.asarray(np.r_[START, 1e-30], jnp.float32)) + jnp.log(likelihood)

  blind_gap = np.asarray(bound(context_blind, jax.random.key(1)), np.float64) - nll
  missed = L * np.log(N_MC) - nll
  assert missed.mean() > 10
  assert abs(blind_gap.mean() - missed.mean()) < 4 * stderr(blind_gap - missed), (blind_gap.mean(), missed.mean())


def _expected_integrand_of_a_uniform_prediction(t: float, N: int) -> float:
  """E_{z ~ q_t(.|x)} f_t for the prediction x_theta = 1/N on every state, in closed form (the same for every x):
  f_t = 1/(N alpha) sum_{y != z} [r^_y - r_y - r_y log(r^_y / r_y)], with the model's rate
  r^_y = 1 + alpha/(1 - alpha) - alpha/(N alpha + 1 - alpha) for every y, and the true r_y: for z = x,
  (1 - alpha)/(N alpha + 1 - alpha); for z != x, 1 + N alpha/(1 - alpha) at y = x and 1 elsewhere."""
  alpha = 1.0 - t
  r_hat = 1.0 + alpha / t - alpha / (N * alpha + t)
  term = lambda r: r_hat - r - r * np.log(r_hat / r)
  same = (alpha + t / N) * (N - 1) * term(t / (N * alpha + t))
  other = (N - 1) * (t / N) * (term(1.0 + N * alpha / t) + (N - 2) * term(1.0))
  return (same + other) / (N * alpha)


def test_a_denoiser_that_ignores_its_input_gets_the_analytic_bound():
  """Under uniform noise a prediction that ignores its input is not free of the noise: per scored token its NELBO
  is int_eps^1 E f_t dt + log N, 13.45 nats for N = 63 (log N = 4.14; the small-t part grows as log(1/eps)). The
  objective's bound with all-zero logits, on packed rows with padding, matches each row's n * 13.45 within 4
  standard errors of the rows' paired differences (a mean over blocks instead of their sum, the reconstruction
  term left out, or padding scored each fail by far)."""
  from scipy import integrate
  N = TINY.vocab_size - 1
  per_token = integrate.quad(_expected_integrand_of_a_uniform_prediction, 1e-3, 1.0, args=(N,), limit=200,
                             points=(0.01, 0.1))[0] + np.log(N)
  B, L, K = 128, 16, 32
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, L + 1, B)
  split = rng.integers(1, L, B)
  positions = np.arange(L)[None].repeat(B, 0)
  segments = np.where(positions < split[:, None], 1, 2) * (positions < lengths[:, None])
  positions = np.where(positions < split[:, None], positions, positions - split[:, None])
  batch = {"tokens": jnp.asarray(rng.integers(0, N, (B, L)), jnp.int32), "segment_ids": jnp.asarray(segments),
           "positions": jnp.asarray(positions, jnp.int32)}
  objective = UniformDiffusion(mask_id=MASK, block_size=4)
  nelbo, _, num_tokens = jax.jit(lambda r: objective.sequence_bound(ConstantLogits(TINY.vocab_size), batch, r,
                                                                     num_t_samples=K))(jax.random.key(0))
  np.testing.assert_array_equal(num_tokens, lengths)
  difference = np.asarray(nelbo, np.float64) - lengths * per_token
  assert abs(difference.mean()) < 4 * difference.std(ddof=1) / np.sqrt(B), (difference.mean(), per_token)

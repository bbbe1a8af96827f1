"""The denoiser: shapes and dtypes per option, mask leakage through gradients, router, config errors, totals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffgemma_jax.config import base_config, load_config, validate
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model import ModelConfig, build_model, make_mask
from diffgemma_jax.model.inspect import count_params
from diffgemma_jax.model.moe import route, top_k_per_row
from diffgemma_jax.model.rope import apply_rope

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=4, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense")


def _inputs(cfg, B=2, L=12, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, cfg.vocab_size)
  positions = jnp.tile(jnp.arange(L), (B, 1))
  segments = jnp.ones((B, L), jnp.int32)
  return tokens, positions, segments


def _forward(model, cfg, kind="bidirectional", **kw):
  tokens, positions, segments = _inputs(cfg, **kw)
  return model(tokens, positions, make_mask(kind, segments, positions))


@pytest.mark.parametrize("options", [
    {},
    {"global_k_eq_v": False},
    {"rope_fraction": 0.5, "global_rope_fraction": 1.0},
    {"layer_pattern": ("global",)},
    {"compute_dtype": "bfloat16"},
    {"logit_softcap": 0.0},
])
def test_shapes_and_dtypes(options):
  cfg = dataclasses.replace(TINY, **options)
  model = build_model(cfg, 0)
  logits, aux = _forward(model, cfg)
  assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux["expert_load"].shape == (cfg.num_layers, cfg.num_experts)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), 1.0, rtol=1e-5)
  assert bool(jnp.all(jnp.isfinite(logits)))
  if cfg.logit_softcap:
    assert float(jnp.max(jnp.abs(logits))) <= cfg.logit_softcap
  attn = model.units[0].blocks[-1].attn
  assert (attn.v_proj is None) == (attn.kind == "global" and cfg.global_k_eq_v)


def test_global_layers_have_their_own_shapes():
  model = build_model(TINY, 0)
  sliding, global_ = model.units[0].blocks
  assert sliding.attn.q_proj.shape == (32, 4, 8) and sliding.attn.k_proj.shape == (32, 2, 8)
  assert global_.attn.q_proj.shape == (32, 4, 16) and global_.attn.k_proj.shape == (32, 1, 16)
  assert global_.attn.v_proj is None and sliding.attn.v_proj is not None


def test_scan_and_remat_match_the_plain_loop():
  cfg = dataclasses.replace(TINY, num_layers=4)
  plain = build_model(cfg, 0)
  ref_logits, _ = _forward(plain, cfg)
  for options in ({"scan_layers": True}, {"remat": "full"}, {"scan_layers": True, "remat": "dots"}):
    other_cfg = dataclasses.replace(cfg, **options)
    other = build_model(other_cfg, 0)
    logits, aux = _forward(other, other_cfg)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert aux["expert_load"].shape == (4, cfg.num_experts)

  def loss(model, cfg):
    return jnp.mean(_forward(model, cfg)[0] ** 2)

  ref_grads = nnx.grad(lambda m: loss(m, cfg))(plain)
  remat_cfg = dataclasses.replace(cfg, remat="full")
  grads = nnx.grad(lambda m: loss(m, remat_cfg))(build_model(remat_cfg, 0))
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _dependency(model, cfg, mask, tokens, positions):
  """d(logits . r)[b, q] / d(input embedding)[b', k], summed over |.| and D -> [B, L, B, L]."""
  B, L = tokens.shape
  r = jax.random.normal(jax.random.key(7), (cfg.vocab_size,))

  def f(e):
    logits, _ = model(tokens, positions, mask, embeddings_BLD=e)
    return logits @ r

  jac = jax.jacrev(f)(jnp.zeros((B, L, cfg.embed_dim)))
  return np.asarray(jnp.sum(jnp.abs(jac), axis=-1))


@pytest.mark.parametrize("kind,segments", [
    ("bidirectional", None), ("causal", None), ("block_causal", None),
    ("bidirectional", [[1] * 5 + [2] * 4 + [0] * 3, [1] * 12]),
    ("causal", [[1] * 7 + [2] * 5, [1] * 3 + [2] * 3 + [3] * 6]),
])
def test_no_logit_depends_on_a_token_it_may_not_see(kind, segments):
  cfg = TINY
  model = build_model(cfg, 0)
  tokens, positions, seg = _inputs(cfg)
  if segments is not None:
    seg = jnp.asarray(segments, jnp.int32)
    # positions restart in each packed document
    positions = jnp.asarray([[i - row.index(s) for i, s in enumerate(row)] for row in segments], jnp.int32)
  mask = make_mask(kind, seg, positions, block_size=4)
  dep = _dependency(model, cfg, mask, tokens, positions)
  allowed = np.asarray(mask)
  B = tokens.shape[0]
  for b in range(B):
    for b2 in range(B):
      if b != b2:
        assert np.all(dep[b, :, b2, :] == 0), "information crossed batch rows"
    own = dep[b, :, b, :]
    assert np.all(own[~allowed[b]] == 0), f"{kind}: a logit depends on a token it may not see"
    real = np.asarray(seg[b] > 0)
    visible = allowed[b] & real[:, None] & real[None, :]
    assert np.all(own[visible] > 0), f"{kind}: a logit ignores a token it may see"


def test_sliding_window_is_symmetric_around_the_query():
  cfg = dataclasses.replace(TINY, num_layers=1, layer_pattern=("sliding",), sliding_window=3)
  model = build_model(cfg, 0)
  tokens, positions, seg = _inputs(cfg)
  dep = _dependency(model, cfg, make_mask("bidirectional", seg, positions), tokens, positions)
  distance = np.abs(np.arange(12)[:, None] - np.arange(12)[None, :])
  assert np.all(dep[0, :, 0, :][distance >= 3] == 0)
  assert np.all(dep[0, :, 0, :][distance < 3] > 0)


def test_rope_partial_fraction_rotates_the_first_pairs_of_each_half():
  # "proportional" RoPE (the reference's): H=16, fraction 0.25 rotates pairs (0, 8) and (1, 9) only.
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
  pos = jnp.arange(5)[None]
  y = apply_rope(x, pos, base=10_000.0, fraction=0.25)
  rotated = np.array([0, 1, 8, 9])
  untouched = np.setdiff1d(np.arange(16), rotated)
  np.testing.assert_array_equal(y[..., untouched], x[..., untouched])
  assert not np.allclose(y[:, 1:][..., rotated], x[:, 1:][..., rotated])
  np.testing.assert_allclose(jnp.linalg.norm(y[..., rotated], axis=-1), jnp.linalg.norm(x[..., rotated], axis=-1),
                             rtol=1e-5)
  # pair i turns at base**(-2i/H), the frequency of a fully rotated head (the exponent is over H, not 4 dims)
  full = apply_rope(x, pos, base=10_000.0)
  np.testing.assert_allclose(y[..., rotated], full[..., rotated], rtol=1e-6)
  np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)  # position 0 is not rotated
  # relative: <rope(q, m), rope(k, n)> depends on m - n only
  q, k = x[:, :1], x[:, 1:2]
  def dot(m, n):
    return jnp.sum(apply_rope(q, jnp.array([[m]]), base=1e4) * apply_rope(k, jnp.array([[n]]), base=1e4))
  np.testing.assert_allclose(dot(3, 1), dot(7, 5), rtol=1e-4)


def test_router_top_k_renormalised_and_scaled():
  T, D, E, K = 64, 16, 8, 3
  x = jax.random.normal(jax.random.key(0), (T, D))
  w = jax.random.normal(jax.random.key(1), (D, E))
  per_expert = jnp.linspace(0.5, 1.5, E)
  r = route(x, jnp.ones(D), w, per_expert, top_k=K, eps=1e-6)
  assert r.expert_ids_TK.shape == (T, K)
  np.testing.assert_allclose(jnp.sum(r.combine_weights_TK / per_expert[r.expert_ids_TK], -1), 1.0, rtol=1e-5)
  # reference: softmax over all experts in float32 of RMSNorm_noscale(x) * D**-0.5 @ W
  h = x / jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6) * D ** -0.5
  probs = jax.nn.softmax(h @ w, -1)
  top = np.sort(np.asarray(probs), -1)[:, ::-1][:, :K]
  got = np.take_along_axis(np.asarray(probs), np.asarray(r.expert_ids_TK), -1)
  np.testing.assert_allclose(got, top, rtol=1e-5)
  np.testing.assert_allclose(r.expert_load_E.sum(), 1.0, rtol=1e-6)
  # a router that sends everything uniformly is perfectly balanced: loss 1
  uniform = route(x, jnp.ones(D), jnp.zeros((D, E)), jnp.ones(E), top_k=E, eps=1e-6)
  np.testing.assert_allclose(uniform.load_balance_loss, 1.0, rtol=1e-5)
  np.testing.assert_allclose(uniform.router_z_loss, np.log(E) ** 2, rtol=1e-5)


def test_router_top_k_equals_lax_top_k_with_ties_and_gradient():
  """The router's per-row top-k (argmax passes, which GSPMD keeps on each device's tokens) gives lax.top_k's values
  and indices exactly, ties (the lower index first) and rows of one value included, and the same gradient."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, (40, 16)).astype(np.float32) / 4  # many ties
  x[0] = 0.25  # one row of one value
  x[1] = rng.normal(size=16)
  for k in (1, 2, 8, 16):
    values, ids = top_k_per_row(jnp.asarray(x), k)
    ref_values, ref_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(values, ref_values)
    w = jnp.asarray(rng.normal(size=(40, k)), jnp.float32)
    grad, ref_grad = (jax.grad(lambda a, f=f: jnp.sum(f(a, k)[0] * w))(jnp.asarray(x))
                      for f in (top_k_per_row, jax.lax.top_k))
    np.testing.assert_array_equal(grad, ref_grad)


def test_aux_losses_enter_the_loss_only_when_weighted():
  model = build_model(TINY, 0)
  _, aux = _forward(model, TINY)
  assert float(aux["aux_loss"]) == 0.0 and float(aux["load_balance_loss"]) > 0
  cfg = dataclasses.replace(TINY, load_balance_loss_weight=0.01, router_z_loss_weight=0.001)
  _, aux = _forward(build_model(cfg, 0), cfg)
  expected = 0.01 * aux["load_balance_loss"] + 0.001 * aux["router_z_loss"]
  np.testing.assert_allclose(aux["aux_loss"], expected, rtol=1e-6)


@pytest.mark.parametrize("field,value,needle", [
    ("top_k", 9, "model.top_k=9 exceeds model.num_experts=8"),
    ("num_kv_heads", 3, "model.num_kv_heads=3 does not divide"),
    ("global_num_kv_heads", 3, "model.global_num_kv_heads"),
    ("layer_pattern", ("sliding", "sliding", "global"), "model.layer_pattern"),
    ("layer_pattern", ("sliding", "local"), "model.layer_pattern"),
    ("dispatch", "magic", "model.dispatch"),
    ("remat", "sometimes", "model.remat"),
])
def test_bad_model_config_names_the_field(field, value, needle):
  with pytest.raises(ConfigError, match=needle):
    dataclasses.replace(TINY, num_experts=8, num_layers=4, **{field: value})


def test_unknown_config_keys_are_rejected_with_the_valid_ones():
  config = base_config()
  config.model["num_expertz"] = 4
  with pytest.raises(ConfigError, match="num_expertz.*valid keys"):
    validate(config)
  with pytest.raises(ConfigError, match="train.num_stepz.*valid keys.*train.num_steps"):
    load_config("configs/pretrain_tiny.py", {"train.num_stepz": "3"})
  config = load_config("configs/pretrain_tiny.py", {"train.num_steps": "3", "model.top_k": "1"})
  assert config.train.num_steps == 3 and config.model.top_k == 1


def test_reference_architecture_totals():
  config = load_config("configs/diffusiongemma_26b_a4b.py")
  counts = count_params(ModelConfig.from_config_dict(config.model))
  assert abs(counts["total_params"] / 25.2e9 - 1) < 0.02
  assert abs(counts["active_params_per_token"] / 3.8e9 - 1) < 0.05


def test_reference_architecture_is_what_importing_the_release_builds():
  """configs/diffusiongemma_26b_a4b.py (and the SFT config built on it) must be the model diffgemma-import makes of
  the release: its HF config, mapped back, changes no model key (a parameter-free difference such as the canvas
  input norm would load the weights without complaint and compute something else)."""
  from diffgemma_jax.hf.mapping import hf_config_from_model, model_overrides_from_hf
  for name in ("diffusiongemma_26b_a4b", "diffusiongemma_26b_a4b_sft"):
    model = load_config(f"configs/{name}.py").model
    imported = model_overrides_from_hf(hf_config_from_model(ModelConfig.from_config_dict(model)))
    same = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    assert {k: v for k, v in imported.items() if same(model.get(k)) != same(v)} == {}, name

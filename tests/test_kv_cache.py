"""The KV cache: cached AR decoding equals full causal recomputation (scan and unrolled layers, a sliding window
shorter than the sequence), and the diffusion cache equals the uncached sampler when refreshed every step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffgemma_jax.model import ModelConfig, build_model, make_mask
from diffgemma_jax.sampling import ARConfig, BlockDenoiser, ModelDenoiser, SamplerConfig, autoregressive, generate

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=4, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense")
MASK, EOS = 4, 3
TIGHT = dict(rtol=1e-5, atol=2e-5)  # float32; only the summation order over masked-out slots differs


def _causal_logits(model, tokens_BL):
  B, L = tokens_BL.shape
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  return model(tokens_BL, positions, make_mask("causal", jnp.ones((B, L), jnp.int32), positions))[0]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_matches_full_recomputation_per_step(scan_layers):
  cfg = dataclasses.replace(TINY, num_layers=4, scan_layers=scan_layers)
  graphdef, state = nnx.split(build_model(cfg, 0))
  B, P, L = 2, 3, 11  # 11 > sliding_window: the window must hold with the cache
  tokens = jax.random.randint(jax.random.key(0), (B, L), 5, cfg.vocab_size)

  @jax.jit
  def both(state, tokens):
    model = nnx.merge(graphdef, state)
    cache = model.init_kv_cache(B, L)
    logits, cache = autoregressive.prefill(model, tokens[:, :P], cache)

    def step(cache, index):
      logits, cache = autoregressive.decode_step(model, tokens[:, index], index, cache)
      return cache, logits

    _, stepped = jax.lax.scan(step, cache, jnp.arange(P, L))
    stepped = jnp.concatenate([logits[:, None], jnp.swapaxes(stepped, 0, 1)], axis=1)
    return _causal_logits(model, tokens)[:, P - 1:], stepped

  full, stepped = both(state, tokens)
  np.testing.assert_allclose(stepped, full, **TIGHT)


def test_cached_ar_decoder_matches_greedy_full_recomputation():
  graphdef, state = nnx.split(build_model(TINY, 1))
  B, P, G = 2, 4, 12
  prompt = jax.random.randint(jax.random.key(1), (B, P), 5, TINY.vocab_size)
  cfg = ARConfig(max_new_tokens=G, stop_at_eos=False)
  out, calls = jax.jit(lambda s, p: autoregressive.generate(nnx.merge(graphdef, s), p, jax.random.key(0), cfg))(
      state, prompt)
  # Causal attention: what follows position i does not change its logits, so one fixed-shape buffer suffices.
  causal = jax.jit(lambda s, t: _causal_logits(nnx.merge(graphdef, s), t))
  reference = np.concatenate([np.asarray(prompt), np.zeros((B, G), np.int32)], axis=1)
  for index in range(P, P + G):
    reference[:, index] = np.argmax(np.asarray(causal(state, reference))[:, index - 1], axis=-1)
  np.testing.assert_array_equal(out, reference)
  np.testing.assert_array_equal(calls, [G, G])  # one prefill, G - 1 single-token steps


@pytest.mark.parametrize("token_shift", [False, True])
def test_cached_block_step_equals_the_full_forward_right_after_a_refresh(token_shift):
  graphdef, state = nnx.split(build_model(dataclasses.replace(TINY, token_shift=token_shift), 2))
  B, P, G, b = 2, 5, 16, 8
  canvas = jnp.concatenate([jax.random.randint(jax.random.key(2), (B, P), 5, TINY.vocab_size),
                            jnp.full((B, G), MASK, jnp.int32)], axis=1)
  canvas = canvas.at[:, P + b + 2].set(7)  # a block with a committed token

  @jax.jit
  def both(state, canvas):
    denoiser = ModelDenoiser(nnx.merge(graphdef, state), b, "dual")
    full, cache = denoiser.full(canvas, denoiser.init(canvas, P)[0], P + b)
    return full, denoiser.cached(canvas, cache, P + b)[0]

  full, cached = both(state, canvas)
  np.testing.assert_allclose(cached, full, **TIGHT)


@pytest.mark.parametrize("token_shift", [False, True])
def test_diffusion_cache_refreshed_every_step_equals_the_uncached_sampler(token_shift):
  model = build_model(dataclasses.replace(TINY, token_shift=token_shift), 3)
  graphdef, state = nnx.split(model)
  prompt = jax.random.randint(jax.random.key(3), (2, 5), 5, TINY.vocab_size)

  def run(cache, refresh_every):
    cfg = SamplerConfig(gen_length=16, block_length=8, steps_per_block=4, acceptance="threshold", threshold=0.2,
                        temperature=0.7, cache=cache, refresh_every=refresh_every)
    fn = lambda s: generate(ModelDenoiser(nnx.merge(graphdef, s), 8, cache), prompt, jax.random.key(4), cfg,
                            mask_id=MASK, eos_id=EOS)
    return jax.jit(fn)(state)

  uncached, uncached_calls = run("none", 0)
  refreshed, refreshed_calls = run("dual", 1)
  np.testing.assert_array_equal(refreshed, uncached)
  np.testing.assert_array_equal(refreshed_calls, uncached_calls)
  approximate, _ = run("dual", 0)  # the approximate cache still keeps the prompt and fills every mask
  np.testing.assert_array_equal(approximate[:, :5], prompt)
  assert not np.any(np.asarray(approximate) == MASK)


class _RecomputedBlockDenoiser:
  """Reference for block-diffusion models: every step runs the whole canvas, clean tokens before the block
  causally and the block over everything up to its end (the BD3-LM layout), no cache."""

  def __init__(self, model, block_length):
    self.model, self.block_length = model, block_length

  def init(self, canvas_BS, prompt_length):
    return (), 1  # the cached sampler spends one call on the prompt

  def __call__(self, canvas_BS, cache, block_start, refresh):
    B, S = canvas_BS.shape
    q, k = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    block_end = block_start + self.block_length
    visible = jnp.where(q < block_start, k <= q, jnp.where(q < block_end, k < block_end, k == q))
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    in_block = (positions >= block_start) & (positions < block_end)
    logits = self.model(canvas_BS, positions, jnp.broadcast_to(visible, (B, S, S)), canvas_BL=in_block)[0]
    first = block_start - 1 if self.model.cfg.token_shift else block_start  # token shift: read one slot earlier
    return jax.lax.dynamic_slice_in_dim(logits, first, self.block_length, axis=1), cache


@pytest.mark.parametrize("scan_layers,token_shift,P,gen_length", [(False, False, 5, 12), (True, False, 5, 12),
                                                                  (False, True, 5, 12), (False, True, 2, 4)])
def test_block_diffusion_cache_is_exact(scan_layers, token_shift, P, gen_length):
  """The clean prefix written once (prompt prefill, finished blocks re-run causally) equals recomputing it; with
  token shift the block's first token is read from the clean slot before it (prefill or the finished block). The
  last case is one block after a prompt shorter than it (the canvas holds fewer than two blocks' slots)."""
  cfg_model = dataclasses.replace(TINY, scan_layers=scan_layers, token_shift=token_shift)
  graphdef, state = nnx.split(build_model(cfg_model, 4))
  b = 4
  prompt = jax.random.randint(jax.random.key(5), (2, P), 5, TINY.vocab_size)
  cfg = SamplerConfig(gen_length=gen_length, block_length=b, steps_per_block=2, acceptance="threshold",
                      threshold=0.2, cache="block", stop_at_eos=False)

  @jax.jit
  def both(state):
    model = nnx.merge(graphdef, state)
    cached = generate(BlockDenoiser(model, b, P), prompt, jax.random.key(6), cfg, mask_id=MASK)
    recomputed = generate(_RecomputedBlockDenoiser(model, b), prompt, jax.random.key(6), cfg, mask_id=MASK)
    return cached, recomputed

  (cached, cached_calls), (recomputed, recomputed_calls) = both(state)
  np.testing.assert_array_equal(cached, recomputed)
  np.testing.assert_array_equal(cached_calls, recomputed_calls)
  np.testing.assert_array_equal(cached[:, :P], prompt)
  assert not np.any(np.asarray(cached) == MASK)


def test_token_shift_models_refuse_the_uniform_state_sampler():
  """A token-shift model read by a sampler that takes each position's own output would sample one slot off."""
  from diffgemma_jax.sampling import canvas
  model = build_model(dataclasses.replace(TINY, token_shift=True), 0)
  cfg = canvas.CanvasConfig(canvas_length=4, num_canvases=2, rule=canvas.EntropyBoundRule())
  with pytest.raises(ValueError, match="token_shift.*MaskedRule"):
    canvas.generate(model, jnp.ones((1, 3), jnp.int32), jax.random.key(0), cfg, mask_id=MASK)

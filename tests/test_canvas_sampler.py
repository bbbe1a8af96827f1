"""Multi-canvas generation (`sampling/canvas.py`): the entropy-bound parts against a direct implementation and the
transformers sampler's components, the canvas loop on a deterministic stand-in model (order, early stop, EOS
padding), and both rules on a tiny real model (prompt kept, no mask left, exact encoder cache, seeds, step caps,
agreement with the masked block sampler). The entropy-bound options' checks are in test_samplers.py."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import transformers_reference
from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.model.masks import MaskSpec
from diffgemma_jax.sampling import canvas, masked
from diffgemma_jax.sampling.parts import (
  accept_entropy_bound,
  linear_temperature,
  pad_after_eos,
  stable_and_confident,
  token_entropy,
)
from diffgemma_jax.sampling.requests import Generator
from diffgemma_jax.sampling.samplers import GenerationOptions, validate_options
from launch.generate import main

PAD, EOS, MASK = 0, 3, 4
TINY = ModelConfig(vocab_size=48, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=6, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense", self_conditioning=True,
                   canvas_input_norm=True)
P, B, C = 5, 2, 3  # prompt length, rows, canvases


# ---- the parts -------------------------------------------------------------------------------------------------
def _numpy_entropy_bound(logits, bound):
  """Direct implementation: per row, accept the k lowest-entropy positions for the largest k with
  sum of the k entropies minus the largest of them <= bound."""
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
  accepted = np.zeros(entropy.shape, bool)
  for row, h in enumerate(entropy):
    order = np.argsort(h, kind="stable")
    k = max(k for k in range(1, len(h) + 1) if h[order[:k]].sum() - h[order[k - 1]] <= bound)
    accepted[row, order[:k]] = True
  return entropy, accepted


@pytest.mark.parametrize("bound", [1e-6, 0.1, 1.0, 50.0])
def test_entropy_bound_rule_matches_a_direct_implementation(bound):
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(6, 24, 40)) * rng.uniform(0.1, 8.0, size=(6, 24, 1))).astype(np.float32)
  expected_entropy, expected = _numpy_entropy_bound(logits.astype(np.float64), bound)
  entropy = np.asarray(token_entropy(jnp.asarray(logits)))
  np.testing.assert_allclose(entropy, expected_entropy, rtol=1e-4, atol=1e-5)
  accepted = np.asarray(accept_entropy_bound(jnp.asarray(entropy), bound))
  np.testing.assert_array_equal(accepted, expected)
  assert accepted.sum(-1).min() >= 1
  # the accepted set is a lowest-entropy prefix: no rejected position has lower entropy than an accepted one
  for h, a in zip(entropy, accepted):
    assert a.all() or h[a].max() <= h[~a].min()


def test_temperature_schedule_and_stopping_rule():
  temps = [float(linear_temperature(s, 48, 0.8, 0.4)) for s in range(48)]
  assert temps[0] == pytest.approx(0.8) and temps[-1] == pytest.approx(0.4 + 0.4 / 48)
  assert all(a > b for a, b in zip(temps, temps[1:]))
  argmax = jnp.array([[5, 6], [5, 6], [5, 6]])
  entropy = jnp.array([[0.001, 0.002], [0.001, 0.002], [0.1, 0.0]])
  previous = jnp.array([[5, 6], [5, 7], [5, 6]])
  np.testing.assert_array_equal(stable_and_confident(argmax, previous, entropy, 0.005), [True, False, False])
  tokens = jnp.array([[7, 3, 8, 3, 9], [7, 8, 9, 10, 11]])
  np.testing.assert_array_equal(pad_after_eos(tokens, EOS, PAD), [[7, 3, 0, 0, 0], [7, 8, 9, 10, 11]])


def test_matches_the_transformers_sampler_components():
  """Issue #9: the same accepted positions, temperatures, entropies and stops as transformers' DiffusionGemma
  sampler components on the same logits."""
  torch, _ = transformers_reference()
  from transformers.models.diffusion_gemma import generation_diffusion_gemma as reference
  rng = np.random.default_rng(1)
  max_steps, t_start, t_end, b, V = 48, 0.8, 0.4, 32, 64
  processor = reference.LinearTemperatureScheduleLogitsProcessor(t_min=t_end, t_max=t_start,
                                                                  max_denoising_steps=max_steps)
  for bound in (0.1, 0.5, 3.0):
    sampler = reference.EntropyBoundSampler(reference.EntropyBoundSamplerConfig(entropy_bound=bound),
                                            canvas_length=b, vocab_size=V, max_denoising_steps=max_steps)
    for step in (0, 1, 23, 47):  # transformers counts the steps left: cur_step = max_steps - step
      raw = (rng.normal(size=(4, b, V)) * rng.uniform(0.2, 10.0, size=(4, b, 1))).astype(np.float32)
      scaled_ref = processor(None, torch.from_numpy(raw), cur_step=max_steps - step)
      temperature = float(linear_temperature(step, max_steps, t_start, t_end))
      np.testing.assert_allclose(raw / temperature, scaled_ref.numpy(), rtol=1e-6)
      scaled = jnp.asarray(scaled_ref.numpy())
      current = torch.zeros((4, b), dtype=torch.long)
      proposal = torch.ones((4, b), dtype=torch.long)
      sampler.accept_canvas(current, proposal, scaled_ref, max_steps - step)
      entropy = token_entropy(scaled)
      np.testing.assert_allclose(entropy, torch.distributions.Categorical(logits=scaled_ref).entropy().numpy(),
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(accept_entropy_bound(entropy, bound), sampler.accepted_token_mask.numpy())
  stopper = reference.StableAndConfidentStoppingCriteria(stability_threshold=1, confidence_threshold=0.005)
  sure = np.full((3, b, V), -30.0, np.float32)
  sure[:, :, 7] = 30.0
  sure[2, :, 7] = 0.0  # row 2 is not confident
  previous = jnp.full((3, b), -1, jnp.int32)
  for argmax in (np.full((3, b), 7), np.full((3, b), 7), np.tile(np.arange(b), (3, 1))):
    ours = stable_and_confident(jnp.asarray(argmax), previous, token_entropy(jnp.asarray(sure)), 0.005)
    theirs = stopper(torch.from_numpy(argmax), torch.from_numpy(sure))
    np.testing.assert_array_equal(ours, theirs.numpy())
    previous = jnp.asarray(argmax)


# ---- the canvas loop on a deterministic stand-in model ---------------------------------------------------------
class Oracle:
  """A stand-in for the model: its canvas prediction at position p is, with near certainty,
  5 + (sum of the clean tokens before the window + p - window start) % (V - 5), or EOS at `eos_position[row]`.
  The cache stores tokens, so a canvas that saw the wrong prefix (or a prefix not yet committed) predicts other
  tokens. It has no self-conditioning."""

  def __init__(self, vocab_size, eos_position):
    self.cfg = types.SimpleNamespace(vocab_size=vocab_size, embed_dim=8, token_shift=False)
    self.self_conditioning = None
    self.eos_position = jnp.asarray(eos_position)

  def init_kv_cache(self, batch_size, max_length):
    return (jnp.zeros((1, batch_size, max_length, 1, 1), jnp.float32),)

  def decode(self, tokens_BL, positions_BL, mask_BLS, kv_cache, kv_positions_BS, write_index, *, logits_start=0,
             logits_length=None, embeddings_BLD=None, canvas_BL=None):
    del embeddings_BLD, canvas_BL
    if isinstance(mask_BLS, MaskSpec):  # the encoder's pass describes its mask, as the model accepts
      mask_BLS = mask_BLS.dense()
    (k,) = kv_cache
    written = tokens_BL[None, :, :, None, None].astype(jnp.float32)
    k = jax.lax.dynamic_update_slice(k, written, (0, 0, write_index, 0, 0))
    first_BL = positions_BL[:, :1]
    before_BLS = mask_BLS & (kv_positions_BS[:, None, :] < first_BL[:, :, None])
    prefix_BL = jnp.sum(jnp.where(before_BLS, k[0, :, None, :, 0, 0], 0.0), axis=-1).astype(jnp.int32)
    V = self.cfg.vocab_size
    target = 5 + (prefix_BL + positions_BL - first_BL) % (V - 5)
    target = jnp.where(positions_BL == self.eos_position[:, None], EOS, target)
    logits = jnp.where(jax.nn.one_hot(target, V, dtype=bool), 40.0, 0.0)
    if logits_length is not None:
      logits = jax.lax.dynamic_slice_in_dim(logits, logits_start, logits_length, axis=1)
    return logits, (k,)


def _oracle_reference(prompt, eos_position, b, num_canvases, V):
  """The expected sequences, canvas by canvas in order, with padding after EOS and finished rows."""
  out = []
  for row, eos_at in zip(prompt.tolist(), eos_position):
    seq, finished = list(row), False
    for c in range(num_canvases):
      start = len(row) + c * b
      canvas_tokens = [EOS if start + i == eos_at else 5 + (sum(seq) + i) % (V - 5) for i in range(b)]
      if finished:
        canvas_tokens = [PAD] * b
      elif EOS in canvas_tokens:
        cut = canvas_tokens.index(EOS)
        canvas_tokens = canvas_tokens[:cut + 1] + [PAD] * (b - cut - 1)
        finished = True
      seq += canvas_tokens
    out.append(seq)
  return np.array(out)


@pytest.mark.parametrize("rule,steps", [(canvas.EntropyBoundRule(max_denoising_steps=6), 2),
                                        (canvas.MaskedRule(steps_per_canvas=4), 1)])
def test_canvases_fill_in_order_stop_early_and_pad_after_eos(rule, steps):
  V, b = 32, 4
  prompt = jnp.array([[2, 9, 11], [2, 6, 7]])
  eos_position = np.array([3 + b + 1, 100])  # row 0 ends in its second canvas; row 1 runs to the end
  cfg = canvas.CanvasConfig(canvas_length=b, num_canvases=C, rule=rule)
  out = canvas.generate(Oracle(V, eos_position), prompt, jax.random.key(0), cfg, mask_id=MASK, eos_id=EOS,
                        pad_id=PAD)
  np.testing.assert_array_equal(out.tokens, _oracle_reference(np.asarray(prompt), eos_position, b, C, V))
  # entropy bound: every token is accepted at step 1 and the argmax is stable at step 2 (early stop);
  # masked threshold: every proposal is confident, one step. Row 0 takes no steps after its EOS.
  np.testing.assert_array_equal(out.steps, [[steps, steps, 0], [steps, steps, steps]])
  no_stop = canvas.generate(Oracle(V, eos_position), prompt, jax.random.key(0),
                            dataclasses.replace(cfg, stop_at_eos=False), mask_id=MASK, eos_id=EOS, pad_id=PAD)
  assert np.asarray(no_stop.tokens)[0, 3 + b + 2] != PAD  # without stop_at_eos nothing is padded


# ---- a tiny real model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
  model = build_model(TINY, 0)
  # A trained self-conditioning MLP is not zero: make its signal matter.
  sc = model.self_conditioning
  sc.w_down[...] = 0.5 * jax.random.normal(jax.random.key(3), sc.w_down[...].shape)
  return model


@pytest.fixture(scope="module")
def prompt():
  return jax.random.randint(jax.random.key(0), (B, P), 5, TINY.vocab_size)


_COMPILED = {}


def _run(model, prompt, cfg, seed=0, eos_id=None):
  """canvas.generate, jitted once per config with the weights as an argument."""
  graphdef, state = nnx.split(model)
  key = (graphdef, cfg, eos_id is None)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(lambda state, prompt, rng, eos: canvas.generate(
        nnx.merge(graphdef, state), prompt, rng, cfg, mask_id=MASK, eos_id=eos, pad_id=PAD))
  return _COMPILED[key](state, prompt, jax.random.key(seed), eos_id)


UNIFORM = canvas.CanvasConfig(canvas_length=8, num_canvases=C, rule=canvas.EntropyBoundRule(max_denoising_steps=5),
                              stop_at_eos=False)
BLOCK = canvas.CanvasConfig(canvas_length=8, num_canvases=C, rule=canvas.MaskedRule(steps_per_canvas=4),
                            stop_at_eos=False)


@pytest.fixture(scope="module")
def uniform_run(model, prompt):
  return _run(model, prompt, UNIFORM)


@pytest.fixture(scope="module")
def block_run(model, prompt):
  return _run(model, prompt, BLOCK)


@pytest.mark.parametrize("name", ["uniform_run", "block_run"])
def test_prompt_kept_no_mask_left_and_steps_capped(name, request, prompt):
  out = request.getfixturevalue(name)
  tokens, steps = np.asarray(out.tokens), np.asarray(out.steps)
  assert tokens.shape == (B, P + 8 * C)
  np.testing.assert_array_equal(tokens[:, :P], prompt)
  assert not np.any(tokens == MASK) and tokens.min() >= 0 and tokens.max() < TINY.vocab_size
  max_steps = (UNIFORM if name == "uniform_run" else BLOCK).rule.max_steps
  assert steps.shape == (B, C) and steps.min() >= 1 and steps.max() <= max_steps


@pytest.mark.parametrize("name", ["uniform_run", "block_run"])
def test_committed_keys_and_values_equal_one_causal_pass(name, request, model):
  """Every slot before the last canvas holds what one causal pass over the final tokens would store."""
  out = request.getfixturevalue(name)
  committed = P + 8 * (C - 1)
  tokens = out.tokens[:, :committed]
  slots = jnp.broadcast_to(jnp.arange(committed), (B, committed))
  causal = slots[:, None, :] <= slots[:, :, None]
  _, reference = model.decode(tokens, slots, causal, model.init_kv_cache(B, committed), slots, 0)
  for (k, v), (k_ref, v_ref) in zip(out.cache, reference):
    np.testing.assert_allclose(k[:, :, :committed], k_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(v[:, :, :committed], v_ref, atol=2e-5, rtol=1e-5)


def test_reproducible_with_a_seed(model, prompt, uniform_run):
  again = _run(model, prompt, UNIFORM, seed=0)
  np.testing.assert_array_equal(again.tokens, uniform_run.tokens)
  np.testing.assert_array_equal(again.steps, uniform_run.steps)
  assert not np.array_equal(_run(model, prompt, UNIFORM, seed=1).tokens, uniform_run.tokens)


def test_self_conditioning_is_fed_between_steps(prompt, uniform_run):
  """The previous step's prediction changes the samples through the self-conditioning MLP; with that MLP at zero
  (untrained) the sampler equals the same weights without self-conditioning."""
  untrained = _run(build_model(TINY, 0), prompt, UNIFORM)  # the `model` fixture's weights, but w_down = 0
  assert not np.array_equal(untrained.tokens, uniform_run.tokens)
  plain = build_model(dataclasses.replace(TINY, self_conditioning=False), 0)
  np.testing.assert_array_equal(_run(plain, prompt, UNIFORM).tokens, untrained.tokens)


@pytest.mark.parametrize("token_shift", [False, True])
def test_masked_canvases_equal_the_block_sampler(prompt, token_shift):
  """Greedy threshold decoding canvas by canvas equals masked.generate with the exact block cache, with and
  without token shift (both read a canvas's first prediction from the clean slot before it)."""
  model = build_model(dataclasses.replace(TINY, token_shift=token_shift), 0)
  cfg = masked.SamplerConfig(gen_length=8 * C, block_length=8, steps_per_block=4, acceptance="threshold",
                             cache="block", stop_at_eos=False)
  reference, _ = jax.jit(lambda p: masked.generate(masked.make_denoiser(model, cfg, P), p, jax.random.key(0), cfg,
                                                   mask_id=MASK))(prompt)
  np.testing.assert_array_equal(_run(model, prompt, BLOCK).tokens, reference)


def test_eos_pads_the_rest_on_a_real_model(model, prompt, uniform_run):
  """Declaring a token the model produced as EOS cuts each row there: the same tokens up to it, padding after."""
  tokens = np.asarray(uniform_run.tokens)
  eos = int(tokens[0, P + 8 + 2])  # a token of row 0's second canvas
  out = _run(model, prompt, dataclasses.replace(UNIFORM, stop_at_eos=True), eos_id=jnp.int32(eos))
  expected = tokens.copy()
  for row in range(B):
    hits = np.flatnonzero(tokens[row, P:] == eos)
    if hits.size:
      expected[row, P + hits[0] + 1:] = PAD
  np.testing.assert_array_equal(out.tokens, expected)
  first = np.flatnonzero(tokens[0, P:] == eos)[0]
  steps = np.asarray(out.steps)
  assert np.all(steps[0, first // 8 + 1:] == 0) and np.all(steps[0, :first // 8 + 1] >= 1)


def test_released_model_samples_under_eval_shape():
  """The 26B-A4B config with the released sampler's defaults (RELEASED_SAMPLER) traces at full size."""
  from diffgemma_jax.config import load_config
  from diffgemma_jax.sampling.samplers import sampler_config
  config = load_config("configs/diffusiongemma_26b_a4b.py", {})
  options = validate_options(GenerationOptions(gen_length=512), "uniform", int(config.objective.block_size),
                             int(config.train.seq_len))
  cfg = sampler_config(options)
  assert cfg.canvas_length == 256 and cfg.rule == canvas.EntropyBoundRule()  # 48 steps, 0.1, 0.8 -> 0.4, 0.005
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(ModelConfig.from_config_dict(config.model), 0)))
  out = jax.eval_shape(lambda state, prompt: canvas.generate(nnx.merge(graphdef, state), prompt, jax.random.key(0),
                                                             cfg, mask_id=MASK, eos_id=EOS),
                       state, jax.ShapeDtypeStruct((1, 64), jnp.int32))
  assert out.tokens.shape == (1, 64 + 512) and out.steps.shape == (1, 2)


# ---- requests and the CLI ---------------------------------------------------------------------------------------
def test_generator_reports_steps_per_canvas(model, prompt):
  generator = Generator(model, mask_id=MASK, eos_id=EOS, pad_id=PAD)
  options = validate_options(GenerationOptions(gen_length=16, max_denoising_steps=3, stop_at_eos=False), "uniform",
                             block_size=8, context_length=64)
  assert options.sampler == "entropy_bound" and (options.entropy_bound, options.temperature_start) == (0.1, 0.8)
  (result,) = generator.run(np.asarray(prompt[:1]), options)
  assert len(result["steps_per_canvas"]) == 2 and all(1 <= s <= 3 for s in result["steps_per_canvas"])
  assert result["model_calls"] == 1 + sum(result["steps_per_canvas"]) + 1
  assert result["sequence"][:P] == np.asarray(prompt[0]).tolist()


def test_rules_refuse_bad_settings():
  with pytest.raises(ValueError, match="entropy_bound"):
    canvas.EntropyBoundRule(entropy_bound=0.0)
  with pytest.raises(ValueError, match="max_denoising_steps"):
    canvas.EntropyBoundRule(max_denoising_steps=0)
  with pytest.raises(ValueError, match="temperature"):
    canvas.EntropyBoundRule(temperature_start=0.4, temperature_end=0.8)


@pytest.mark.parametrize("argv,message", [
    (["--entropy_bound", "0"], "--entropy_bound must be > 0"),
    (["--max_denoising_steps", "0"], "--max_denoising_steps must be >= 1"),
    (["--temperature_start", "0.3"], "--temperature_end must lie in [0, --temperature_start=0.3]"),
    (["--config.objective.block_size=256"], "objective.block_size=256 is longer than the context"),
])
def test_cli_bad_canvas_options_exit_2(argv, message, capsys, tmp_path):
  code = main(["--config", "configs/diffusiongemma_tiny.py", "--workdir", str(tmp_path), "--prompt", "x"] + argv)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1

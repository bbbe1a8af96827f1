"""Batched generation (`sampling/batching.py`): every model call any sampler makes gives a left-padded row the
logits of its prompt alone; a batch of prompts of different lengths gives every row exactly what that prompt gives
alone in each sampler loop (AR decoder, masked blocks, multi-canvas), greedy and sampled (per-row keys), with rows
that stop at different steps; batches are grouped by prompt length."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.sampling import autoregressive, batching, masked
from diffgemma_jax.sampling import canvas as canvas_sampler
from diffgemma_jax.sampling.requests import GenerationOptions, Generator, cut_at_stop, validate_options

# Programs an earlier test of this file compiled are read back from JAX's cache, not compiled again.
pytestmark = pytest.mark.usefixtures("compilation_cache")

MASK, PAD = 4, 0
TINY = ModelConfig(vocab_size=48, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=6, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense", self_conditioning=True,
                   canvas_input_norm=True)
LENGTHS = (4, 9, 4)  # two rows share a length, so the batch holds padded and unpadded rows


@pytest.fixture(scope="module")
def model():
  return build_model(TINY, 0)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [[2] + rng.integers(5, TINY.vocab_size, n - 1).tolist() for n in LENGTHS]


def _first_positions(results):
  """{token: [index of its first occurrence in each row's new tokens, or None]}"""
  out = {}
  for row, result in enumerate(results):
    for index, token in enumerate(result["ids"]):
      out.setdefault(token, [None] * len(results))
      if out[token][row] is None:
        out[token][row] = index
  return out


def _stopping_eos(results, gen_length):
  """A token that ends the rows at different steps (the one that spreads them most): the EOS of the test."""
  best = None
  for token, firsts in _first_positions(results).items():
    ends = [gen_length if f is None else f for f in firsts]
    if token >= 5 and len(set(ends)) > 1 and min(ends) > 0:
      spread = max(ends) - min(ends)
      best = max(best or (0, None), (spread, token))
  assert best is not None, "no generated token ends the rows at different steps; change the prompts' seed"
  return best[1]


# sampler, objective (for validation), extra options: the three sampler loops, the AR decoder, the masked block loop
# (with the dual cache, whose refresh steps run the uncached path) and the multi-canvas loop (the entropy-bound rule,
# sampled, with uniform noise); sampled rows draw from per-row keys, so they too equal one request at a time. The
# other samplers differ in their acceptance rule or denoiser, whose padded calls the next test checks one by one.
CASES = [("ar", "ar", {}), ("threshold", "masked", dict(temperature=1.0)),
         ("entropy_bound", "uniform", dict(max_denoising_steps=4))]


@pytest.mark.parametrize("sampler,objective,extra", CASES)
def test_batched_equals_one_at_a_time(model, prompts, sampler, objective, extra):
  """Each prompt alone without stopping, then all of them in one batch with an EOS that the rows reach at
  different steps: every row's tokens are the lone run's up to its EOS, and a row that stopped took fewer calls."""
  gen_length, block = 16, 8
  options = validate_options(GenerationOptions(sampler=sampler, gen_length=gen_length, block_length=block, seed=3,
                                               stop_at_eos=False, **extra), objective, block_size=block)
  never = Generator(model, mask_id=MASK, eos_id=-1, pad_id=PAD)
  alone = [never.run([prompt], options)[0] for prompt in prompts]
  eos = _stopping_eos(alone, gen_length)
  batched = Generator(model, mask_id=MASK, eos_id=eos, pad_id=PAD).run(prompts, dataclasses.replace(
      options, stop_at_eos=True))
  for row, (b, a) in enumerate(zip(batched, alone)):
    ended = a["ids"].index(eos) if eos in a["ids"] else gen_length
    assert b["ids"] == a["ids"][:ended], f"row {row}"
    assert b["sequence"][:len(prompts[row]) + ended] == a["sequence"][:len(prompts[row]) + ended]
    assert b["sequence"][:len(prompts[row])] == prompts[row]
    assert b["model_calls"] <= a["model_calls"]
    if ended < gen_length and sampler == "ar":  # the AR decoder stops right after the EOS
      assert b["model_calls"] == ended + 1
  lengths = [r["new_tokens"] for r in batched]
  assert len(set(lengths)) > 1 and min(lengths) < gen_length  # rows stopped at different steps
  assert all(r["batch_size"] == len(prompts) for r in batched)


def test_padding_changes_no_logits(model):
  """Every model call of every sampler, on a left-padded row, gives the logits of the same prompt alone, whatever
  the padding slots hold: the AR prefill and decode step, canvas.py's encoder and canvas passes, the bidirectional
  denoiser uncached and with the dual cache, and the block denoiser's plain and commit-fusing steps."""
  graphdef, state = nnx.split(model)
  prompt, b = [2, 9, 17, 30, 11], 4
  canvas = [MASK, 21, MASK, 33]

  @jax.jit
  def all_logits(state, prompt_BP, starts_B):
    m = nnx.merge(graphdef, state)
    B, P = prompt_BP.shape
    S = P + 2 * b
    out = []
    logits, cache = autoregressive.prefill(m, prompt_BP, m.init_kv_cache(B, S), starts_B)
    out.append(logits)
    out.append(autoregressive.decode_step(m, prompt_BP[:, -1] + 1, P, cache, starts_B)[0])
    before, cache = canvas_sampler.encode_with_logits(m, prompt_BP, m.init_kv_cache(B, S), 0, starts_B)
    canvas_Bb = jnp.broadcast_to(jnp.asarray(canvas), (B, b))
    out += [before, canvas_sampler.canvas_logits(m, canvas_Bb, cache, P, starts_B=starts_B)[0]]
    full_BS = jnp.concatenate([prompt_BP, canvas_Bb, canvas_Bb], axis=1)
    dual = masked.ModelDenoiser(m, b, "dual", starts_B)
    cache, _ = dual.init(full_BS, P)
    logits, cache = dual(full_BS, cache, P + b, True)  # a refresh: the whole canvas (the uncached path)
    out += [logits, dual(full_BS.at[:, P + b].set(7), cache, P + b, False)[0]]
    block = masked.BlockDenoiser(m, b, P, starts_B)
    cache, _ = block.init(full_BS, P)
    logits, cache = block(full_BS, cache, P, True)
    out += [logits, block(full_BS, cache, P + b, True)[0]]  # commits block 0 inside block 1's first call
    return out

  alone = all_logits(state, jnp.asarray([prompt]), jnp.zeros((1,), jnp.int32))
  padded = jnp.asarray([[7, 44] + prompt, [2, 5, 6, 7, 8, 9, 10]])  # row 0 behind two padding slots
  batched = all_logits(state, padded, jnp.asarray([2, 0], jnp.int32))
  for index, (a, p) in enumerate(zip(alone, batched)):
    np.testing.assert_allclose(p[0], a[0], rtol=1e-5, atol=1e-5, err_msg=f"call {index}")
  other = all_logits(state, padded.at[0, :2].set(jnp.asarray([40, 41])), jnp.asarray([2, 0], jnp.int32))
  for p, o in zip(batched, other):
    np.testing.assert_array_equal(o, p)  # what the padding slots hold is never read


def test_left_padding_and_stop_strings():
  tokens, starts = batching.left_pad([[5, 6], [7, 8, 9, 10], [11]], PAD)
  np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]])
  np.testing.assert_array_equal(starts, [2, 0, 3])
  np.testing.assert_array_equal(batching.slot_positions(3, 5, jnp.asarray(starts)),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 1]])
  assert cut_at_stop("a\n\nb\ndef c", ["def", "\n\n"]) == "a" and cut_at_stop("abc", ["x", ""]) == "abc"


def test_slot_mask_describes_the_dense_masks_of_the_long_passes():
  """The prompt's passes (AR prefill, the canvas encoder, the bidirectional denoiser's full pass) describe their
  masks (no [B, L, S] array) and, for every real query, see exactly what the dense masks they replace saw."""
  B, S, starts = 3, 12, jnp.asarray([0, 3, 5], jnp.int32)
  slots = jnp.arange(S)
  real = batching.real_slots(B, S, starts)
  for start, length, causal, written_end in [(0, 7, True, None), (4, 5, True, None), (0, S, False, None),
                                             (2, 6, False, 10)]:
    spec = batching.slot_mask(B, S, start, length, starts, causal=causal, written_end=written_end)
    query_slots = start + jnp.arange(length)
    end = start + length if written_end is None else written_end
    want = real[:, None, :] & (slots < end)[None, None, :]
    if causal:
      want = want & (slots[None, None, :] <= query_slots[None, :, None])
    want = np.broadcast_to(np.asarray(want), (B, length, S))
    real_queries = np.asarray(real[:, start:start + length])
    np.testing.assert_array_equal(np.asarray(spec.dense())[real_queries], want[real_queries])


def test_run_batches_groups_by_length_and_keeps_the_order():
  class Spy(Generator):
    def __init__(self):
      self.pad_id, self.batches = PAD, []

    def run(self, prompts, options, seeds=None):
      self.batches.append([len(p) for p in prompts])
      return [{"prompt": list(p), "seed": s} for p, s in zip(prompts, seeds)]

  spy = Spy()
  prompts = [[1] * n for n in (5, 2, 9, 2, 4)]
  results = spy.run_batches(prompts, GenerationOptions(seed=7), batch_size=2)
  assert spy.batches == [[2, 2], [4, 5], [9]]
  assert [r["prompt"] for r in results] == prompts and {r["seed"] for r in results} == {7}

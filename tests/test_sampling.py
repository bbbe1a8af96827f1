"""Masked-diffusion samplers: schedules, acceptance rules, and the block loop on a known denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.sampling import (SamplerConfig, accept_low_confidence, accept_threshold, even_schedule, generate,
                                   truncate_at_eos)

V, MASK = 16, 1


def _oracle(target_BL, confidence):
  """A denoiser that proposes target[l] at every position with probability `confidence[l]`."""

  def logits_fn(canvas):
    conf = jnp.broadcast_to(jnp.asarray(confidence), canvas.shape)
    rest = (1.0 - conf) / (V - 2)  # spread over the other non-mask tokens
    probs = jnp.broadcast_to(rest[..., None], canvas.shape + (V,))
    probs = jnp.where(jax.nn.one_hot(target_BL, V, dtype=bool), conf[..., None], probs)
    return jnp.log(probs)

  return logits_fn


def test_even_schedule_finishes_the_block_in_time():
  masked, steps = 10, 4
  done = 0
  for s in range(steps):
    done += int(even_schedule(jnp.int32(masked - done), jnp.int32(steps - s)))
  assert done == masked


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


@pytest.mark.parametrize("acceptance,expected_calls", [("low_confidence", 4 * 4), ("threshold", 4)])
def test_generate_fills_the_canvas_and_keeps_the_prompt(acceptance, expected_calls):
  P, G, B = 5, 32, 2
  prompt = jax.random.randint(jax.random.key(0), (B, P), 2, V)
  target = jax.random.randint(jax.random.key(1), (B, P + G), 2, V)
  cfg = SamplerConfig(gen_length=G, block_length=8, steps_per_block=4, acceptance=acceptance)
  canvas, calls = jax.jit(lambda r: generate(_oracle(target, 0.97), prompt, r, cfg, mask_id=MASK))(
      jax.random.key(2))
  np.testing.assert_array_equal(canvas[:, :P], prompt)
  np.testing.assert_array_equal(canvas[:, P:], target[:, P:])
  np.testing.assert_array_equal(calls, [expected_calls] * B)


def test_low_confidence_commits_the_most_confident_first():
  """One commit per step; the proposal encodes the step (count of committed tokens), so the canvas shows order."""
  P, G = 2, 8
  prompt = jnp.full((1, P), 3, jnp.int32)
  confidence = jnp.concatenate([jnp.ones(P), jnp.linspace(0.3, 0.9, G)])  # later positions more confident

  def logits_fn(canvas):
    committed = jnp.sum(canvas != MASK, axis=-1, keepdims=True)
    return _oracle(jnp.broadcast_to(2 + committed, canvas.shape), confidence)(canvas)

  cfg = SamplerConfig(gen_length=G, block_length=G, steps_per_block=G)
  out, calls = generate(logits_fn, prompt, jax.random.key(0), cfg, mask_id=MASK)
  expected = [2 + P + (G - 1 - j) for j in range(G)]
  np.testing.assert_array_equal(out[0, P:], expected)
  assert int(calls[0]) == G


def test_bad_sampler_config():
  with pytest.raises(ValueError, match="acceptance"):
    SamplerConfig(acceptance="greedy")
  with pytest.raises(ValueError, match="block_length"):
    SamplerConfig(gen_length=30, block_length=8)


def test_truncate_at_eos():
  assert truncate_at_eos([5, 6, 3, 7], eos_id=3) == [5, 6]
  assert truncate_at_eos([5, 6], eos_id=3) == [5, 6]

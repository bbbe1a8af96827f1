"""The swappable parts of a sampler: token proposals (temperature, top-p), commit schedules, acceptance rules and
stopping helpers. Each is a small pure function on arrays; the loops in `masked.py` and `autoregressive.py` compose
them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffgemma_jax.sampling.batching import draw

ACCEPTANCE_RULES = ("low_confidence", "threshold")


# ---- schedules -------------------------------------------------------------------------------------------------
def even_schedule(num_masked, steps_left):
  """How many tokens to commit now so the block finishes in the remaining steps: ceil(masked / steps_left).

  Over a whole block this is LLaDA's `get_num_transfer_tokens` (the remainder goes to the first steps)."""
  return -(-num_masked // jnp.maximum(steps_left, 1))


# ---- proposals (the temperature shaper) ------------------------------------------------------------------------
def sample_categorical(rng, logits_NV):
  """One draw per row from softmax(logits) by inversion: a single uniform per row against the running sum of the
  probabilities (the first token whose cumulative probability exceeds it). Exact like the Gumbel-max trick
  (`jax.random.categorical`), but it draws one random number per row instead of one per vocabulary entry, which on
  a CPU is most of a sampling step's cost (about 8x less for a 16-token canvas at vocab 512). Tokens of zero
  probability (-inf logits) are never drawn. `rng`: one key, or one per row (`batching.draw`)."""
  logits_NV = logits_NV.astype(jnp.float32)
  probs_NV = jax.nn.softmax(logits_NV, axis=-1)
  cumulative_NV = jnp.cumsum(probs_NV, axis=-1)
  u_N1 = draw(jax.random.uniform, rng, logits_NV.shape[:-1] + (1,)) * cumulative_NV[..., -1:]
  # XLA sums a long row in blocks, so the running sum is not monotone to the last bit: "how many entries are <= u"
  # can land on a zero-mass token. The first token of positive mass whose running sum exceeds u cannot.
  hit_NV = (cumulative_NV > u_N1) & (probs_NV > 0)
  V = logits_NV.shape[-1]
  last_positive = V - 1 - jnp.argmax((probs_NV > 0)[..., ::-1], axis=-1)  # rounding put u at the very top
  return jnp.where(jnp.any(hit_NV, axis=-1), jnp.argmax(hit_NV, axis=-1), last_positive).astype(jnp.int32)


def propose(logits_BLV, rng, *, temperature: float, mask_id: int):
  """A token per position and its probability under the (temperature-free) model distribution, as LLaDA: the
  token is a draw from softmax(logits / temperature) (greedy at temperature 0), the mask token excluded."""
  logits_BLV = logits_BLV.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  if temperature > 0:
    tokens_BL = sample_categorical(rng, logits_BLV / temperature)
  else:
    tokens_BL = jnp.argmax(logits_BLV, axis=-1)
  log_probs = jax.nn.log_softmax(logits_BLV, axis=-1)
  confidence_BL = jnp.exp(jnp.take_along_axis(log_probs, tokens_BL[..., None], axis=-1)[..., 0])
  return tokens_BL.astype(jnp.int32), confidence_BL


def top_p_filter(logits_BV, top_p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches `top_p` (nucleus); -inf elsewhere."""
  if top_p >= 1.0:
    return logits_BV
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept = mass_before_BV < top_p  # the most likely token always has mass_before 0
  cutoff_B1 = jnp.min(jnp.where(kept, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)


def sample_next(logits_BV, rng, *, temperature: float, top_p: float = 1.0):
  """The next token of each row: greedy at temperature 0, else a draw from softmax(logits / T) under top-p."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = top_p_filter(logits_BV / temperature, top_p)
  return sample_categorical(rng, logits_BV)


# ---- acceptance rules ------------------------------------------------------------------------------------------
def _ranks(confidence_BL, candidates_BL):
  """0 for the most confident candidate of each row, 1 for the next, ...; non-candidates rank last."""
  scores = jnp.where(candidates_BL, confidence_BL, -jnp.inf)
  return jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)


def accept_low_confidence(confidence_BL, candidates_BL, num_to_commit_B):
  """Commits the `num_to_commit` most confident candidates of each row (LLaDA's low-confidence remasking)."""
  return candidates_BL & (_ranks(confidence_BL, candidates_BL) < num_to_commit_B[:, None])


def accept_threshold(confidence_BL, candidates_BL, threshold: float, min_commit_B=None):
  """Commits every candidate at or above the threshold, and always at least the `min_commit` (default 1) most
  confident ones (Fast-dLLM's parallel decoding; a `min_commit` from a schedule caps the number of steps)."""
  if min_commit_B is None:
    min_commit_B = jnp.ones(confidence_BL.shape[:1], jnp.int32)
  at_least = _ranks(confidence_BL, candidates_BL) < jnp.maximum(min_commit_B, 1)[:, None]
  return candidates_BL & ((confidence_BL >= threshold) | at_least)


# ---- stopping --------------------------------------------------------------------------------------------------
def masked_step(logits_BLV, rng, candidates_BL, *, acceptance: str, threshold: float, temperature: float,
                steps_left, mask_id: int):
  """One denoising step of a masked canvas: (proposed tokens, which masked positions commit them now), with the
  even schedule's count as the floor of either rule (low-confidence: exactly that many; threshold: every token
  above the threshold, at least that many)."""
  tokens, confidence = propose(logits_BLV, rng, temperature=temperature, mask_id=mask_id)
  num_to_commit = even_schedule(jnp.sum(candidates_BL, axis=-1), steps_left)
  if acceptance == "threshold":
    return tokens, accept_threshold(confidence, candidates_BL, threshold, num_to_commit)
  return tokens, accept_low_confidence(confidence, candidates_BL, num_to_commit)


def has_eos(tokens_BL, eos_id: int, *, start=0, stop=None):
  """Whether each row holds an EOS at an index in [start, stop)."""
  index = jnp.arange(tokens_BL.shape[1])
  hit = (tokens_BL == eos_id) & (index >= start)[None, :]
  if stop is not None:
    hit = hit & (index < stop)[None, :]
  return jnp.any(hit, axis=-1)


def truncate_at_eos(tokens, eos_id: int) -> list[int]:
  """Generated ids up to (not including) the first EOS."""
  out = []
  for token in tokens:
    if int(token) == eos_id:
      break
    out.append(int(token))
  return out


# ---- uniform-state canvases (DiffusionGemma's entropy-bound sampler) -----------------------------------------------
def linear_temperature(step, max_steps: int, start: float, end: float):
  """The temperature of denoising step `step` (0-based) out of `max_steps`: `start` at step 0, falling linearly
  by (start - end) / max_steps per step, so the last allowed step uses end + (start - end) / max_steps (the
  released sampler counts steps down from max_steps to 1: T = end + (start - end) * remaining / max_steps)."""
  remaining = max_steps - jnp.asarray(step, jnp.float32)
  return end + (start - end) * remaining / max_steps


def token_entropy(logits_BLV):
  """Entropy (nats) of softmax(logits) at each position, float32; -inf logits (excluded tokens) count as zero."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits_BLV, axis=-1)
  probs = jnp.exp(log_probs)
  return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


def accept_entropy_bound(entropy_BL, bound: float):
  """Accepts the lowest-entropy positions of each row while sum(H_1..H_k) - H_k <= bound (H ascending): the sum
  bounds the mutual information among the accepted tokens, so they are nearly independent. The lowest-entropy
  position always passes (its left side is 0), so every row accepts at least one token."""
  order_BL = jnp.argsort(entropy_BL, axis=-1)
  sorted_BL = jnp.take_along_axis(entropy_BL, order_BL, axis=-1)
  passes_BL = jnp.cumsum(sorted_BL, axis=-1) - sorted_BL <= bound
  # one scatter per row, vmapped: its row axis a batching axis, which rows split over devices keep split
  return jax.vmap(lambda order_L, passes_L: jnp.zeros(order_L.shape, bool).at[order_L].set(passes_L))(
      order_BL, passes_BL)


def stable_and_confident(argmax_BL, previous_argmax_BL, entropy_BL, mean_entropy_below: float):
  """The early stop of a canvas: its argmax equals the previous step's and the mean entropy is below the limit."""
  stable_B = jnp.all(argmax_BL == previous_argmax_BL, axis=-1)
  return stable_B & (jnp.mean(entropy_BL, axis=-1) < mean_entropy_below)


def pad_after_eos(tokens_BL, eos_id: int, pad_id: int):
  """Every token after the first EOS of a row becomes `pad_id` (the EOS itself stays)."""
  is_eos = tokens_BL == eos_id
  after = (jnp.cumsum(is_eos, axis=-1) - is_eos) > 0
  return jnp.where(after, pad_id, tokens_BL)


def shifted(logits_BbV, before_B1V):
  """Token shift (`model.token_shift`): canvas position j is predicted by the output at j-1, the canvas's first
  position by `before_B1V`, the clean pass's output at the slot before the canvas."""
  return jnp.concatenate([before_B1V.astype(logits_BbV.dtype), logits_BbV[:, :-1]], axis=1)

"""Every objective's training loss against a spy model: the spy records what it was given and returns logits from
fixed random tables, and the test recomputes the loss from those logits in numpy, without the objective's code.

What the spy sees checks the noise: the fraction of masked (masked, block) or replaced (uniform) positions matches
each row's or block's noise level t, and nothing outside the scored tokens (padding, an SFT prompt) is ever
corrupted. The recomputation checks the scoring: which positions count, against which targets, with which 1/t
weights and normalisation. The noise levels come from the documented key split of each `loss_fn` (`t_rng` first)
and `stratified_t`, which tests/test_estimators.py checks on its own.

SFT (masked, block, uniform): the prompt never reaches the model corrupted and is never scored, so with logits
that ignore the input, changing the prompt's tokens leaves the loss exactly as it was; with a spy that reads its
input, or with the prompt scored, the same change moves it.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffgemma_jax.objectives import Autoregressive, BlockDiffusion, MaskedDiffusion, UniformDiffusion, stratified_t

V, MASK, EPS = 24, 3, 1e-3
N_STATES = V - 1  # uniform noise draws from the vocabulary without the mask token
B, L = 16, 32
BLOCK = 8


class Spy:
  """Records each call's inputs and returns `table_pos[position]`, plus, scaled by `reads` (a traced 0 or 1),
  `table_tok[token]` and the row's mean token embedding: its logits are known, and with `reads = 1` they depend on
  what it was given."""

  cfg = types.SimpleNamespace(vocab_size=V, token_shift=False)
  self_conditioning = None

  def __init__(self, reads):
    rng = np.random.default_rng(0)
    self.reads = reads
    self.table_pos = jnp.asarray(rng.normal(0, 2.0, (L, V)), jnp.float32)
    self.table_tok = jnp.asarray(rng.normal(0, 2.0, (V, V)), jnp.float32)
    self.table_ctx = jnp.asarray(rng.normal(0, 4.0, (V, V)), jnp.float32)
    self.calls = []

  def __call__(self, tokens, positions, mask, token_mask_BL=None, embeddings_BLD=None, canvas_BL=None):
    read = self.table_tok[tokens] + jnp.mean(self.table_ctx[tokens], axis=1, keepdims=True)
    logits = self.table_pos[positions] + self.reads * read
    self.calls.append(dict(tokens=tokens, positions=positions, logits=logits, token_mask=token_mask_BL,
                           canvas=canvas_BL))
    aux = {"aux_loss": jnp.float32(0), "load_balance_loss": jnp.float32(1), "router_z_loss": jnp.float32(0),
           "expert_load": jnp.full((1, 2), 0.5), "dropped_tokens": jnp.float32(0)}
    return logits, aux


@functools.lru_cache(maxsize=None)
def _spied_loss(name: str, sft: bool):
  """`loss_fn` of objective `name` on a spy, jitted once per objective and batch kind:
  (batch, rng, reads) -> (loss, metrics, the spy's calls as numpy)."""
  del sft  # the batch's structure (loss_mask or not) keys the cache, as it keys jit's
  objective = OBJECTIVES[name][0]()

  def run(batch, rng, reads):
    spy = Spy(reads)
    loss, metrics = objective.loss_fn(spy, batch, rng)
    return loss, metrics, spy.calls

  jitted = jax.jit(run)

  def call(batch, rng, reads=True):
    loss, metrics, calls = jitted(batch, rng, jnp.float32(reads))
    to_numpy = lambda x: None if x is None else np.asarray(x, np.float64 if x.dtype == np.float32 else x.dtype)
    return float(loss), metrics, [types.SimpleNamespace(**{k: to_numpy(v) for k, v in c.items()}) for c in calls]

  return call


def _nll(logits_LV, targets_L, exclude_mask=True):
  """-log softmax(logits)[target] in float64, with the mask token given zero probability."""
  logits = np.array(logits_LV, np.float64)
  if exclude_mask:
    logits[..., MASK] = -np.inf
  top = np.max(logits, axis=-1, keepdims=True)
  log_z = np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]
  return log_z - np.take_along_axis(logits, np.asarray(targets_L)[..., None], axis=-1)[..., 0]


def _batch(seed=0, sft=False):
  """Rows of L tokens (never the mask token). Pretraining: rows end in padding of 0-7 tokens. SFT: one example
  per row, prompts of 3-17 tokens, responses to the row end (a last canvas may be cut by it)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V - 1, (B, L))
  tokens = tokens + (tokens >= MASK)
  lengths = L - rng.integers(0, 8, B) if not sft else np.full(B, L)
  segments = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.asarray(segments),
           "positions": jnp.tile(jnp.arange(L, dtype=jnp.int32), (B, 1))}
  if sft:
    prompt = rng.integers(3, 18, B)
    batch["loss_mask"] = jnp.asarray(np.arange(L)[None] >= prompt[:, None], jnp.int32)
  return batch


def _scored(batch):
  scored = np.asarray(batch["segment_ids"]) > 0
  return scored & (np.asarray(batch["loss_mask"]) > 0) if "loss_mask" in batch else scored


def _assert_noise_follows_t(noised, scored, p):
  """Noised positions are scored ones, and their count in each unit (row or block) is Binomial(n, p): the total
  within 4 standard deviations, and a chi-square over the units that a wrong p (e.g. 1 - t) fails."""
  assert not np.any(noised & ~scored), "an unscored position (padding or prompt) reached the model corrupted"
  n = scored.sum(-1).astype(float)
  k = noised.sum(-1).astype(float)
  p = np.broadcast_to(np.reshape(p, -1), n.shape)
  var = n * p * (1 - p)
  assert abs(np.sum(k - n * p)) < 4 * np.sqrt(np.sum(var)) + 1, (k.sum(), np.sum(n * p))
  chi2 = np.sum((k - n * p) ** 2 / np.maximum(var, 1.0))
  assert stats.chi2.sf(chi2, len(n)) > 1e-4, (chi2, len(n), k, n * p)


def _sft_normalise(per_example, scored, sft):
  n = scored.sum(-1)
  if sft:
    return np.mean(per_example[n > 0] / n[n > 0])
  return per_example.sum() / n.sum()


# ---- masked -----------------------------------------------------------------------------------------------------
def _masked_reference(calls, batch, rng):
  (call,) = calls
  tokens, scored, sft = np.asarray(batch["tokens"]), _scored(batch), "loss_mask" in batch
  noised = call.tokens == MASK
  np.testing.assert_array_equal(call.tokens[~noised], tokens[~noised])
  t = np.asarray(stratified_t(jax.random.split(rng)[0], B, EPS), np.float64)
  _assert_noise_follows_t(noised, scored, t)
  per_example = np.sum(np.where(noised, _nll(call.logits, tokens), 0.0), -1) / t
  return _sft_normalise(per_example, scored, sft)


# ---- block --------------------------------------------------------------------------------------------------------
def _block_reference(calls, batch, rng):
  (call,) = calls
  tokens, scored, sft = np.asarray(batch["tokens"]), _scored(batch), "loss_mask" in batch
  assert call.tokens.shape == (B, 2 * L) and call.canvas[:, :L].all() and not call.canvas[:, L:].any()
  canvas_in, clean_in = call.tokens[:, :L], call.tokens[:, L:]
  np.testing.assert_array_equal(clean_in, tokens)  # the encoder half is the clean row
  noised = canvas_in == MASK
  np.testing.assert_array_equal(canvas_in[~noised], tokens[~noised])
  assert not np.any(noised & ~scored), "an unscored position (padding or prompt) reached the model corrupted"
  # blocks of BLOCK tokens from the row start, or (SFT) from the first response token; the prompt is block -1
  start = np.argmax(scored, axis=-1) if sft else np.zeros(B, int)
  relative = np.arange(L)[None] - start[:, None]
  blocks = np.where(relative >= 0, relative // BLOCK, -1)
  num_blocks = L // BLOCK
  t_BN = np.asarray(stratified_t(jax.random.split(rng)[0], B * num_blocks, EPS), np.float64)
  t_BN = t_BN.reshape(num_blocks, B).T  # block j of row b takes stratum j * B + b
  in_block = blocks[:, None, :] == np.arange(num_blocks)[None, :, None]  # [B, N, L]
  unit = lambda x: np.broadcast_to(x[:, None, :], in_block.shape) & in_block
  _assert_noise_follows_t(unit(noised).reshape(B * num_blocks, L), unit(scored).reshape(B * num_blocks, L),
                          t_BN.reshape(-1))
  t_BL = np.take_along_axis(t_BN, np.maximum(blocks, 0), axis=1)
  per_example = np.sum(np.where(noised, _nll(call.logits[:, :L], tokens) / t_BL, 0.0), -1)
  return _sft_normalise(per_example, scored, sft)


# ---- uniform --------------------------------------------------------------------------------------------------------
ENCODER_WEIGHT = 0.7


def _uniform_reference(calls, batch, rng):
  (call,) = calls
  tokens, segments, scored = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]), _scored(batch)
  C = BLOCK
  assert call.tokens.shape == (B, C + L) and call.canvas[:, :C].all() and not call.canvas[:, C:].any()
  np.testing.assert_array_equal(call.tokens[:, C:], tokens)  # the encoder half is the clean row
  # The chosen canvas: from its positions (rows hold one document from position 0); a whole block of the
  # response, counted from the first response token.
  canvas_start = call.positions[:, 0]
  response_start = np.argmax(scored, axis=-1)
  assert np.all((canvas_start - response_start) % C == 0) and np.all(scored[np.arange(B), canvas_start])
  assert len(set(canvas_start - response_start)) > 1  # canvases are drawn, not always the first
  index = canvas_start[:, None] + np.arange(C)
  inside = index < L
  index = np.minimum(index, L - 1)
  clean_canvas = np.take_along_axis(tokens, index, axis=1)
  canvas_scored = np.take_along_axis(scored, index, axis=1) & inside
  np.testing.assert_array_equal(call.token_mask[:, :C], inside & (np.take_along_axis(segments, index, 1) > 0))
  canvas_in = call.tokens[:, :C]
  assert not np.any(canvas_in == MASK)  # uniform noise never draws the mask token
  noised = canvas_in != clean_canvas
  t = np.asarray(stratified_t(jax.random.split(rng, 4)[0], B, EPS), np.float64)
  _assert_noise_follows_t(noised, canvas_scored, t * (N_STATES - 1) / N_STATES)  # a draw may keep x
  canvas_nll = _nll(call.logits[:, :C], clean_canvas)
  canvas_ce = canvas_nll[canvas_scored].mean()
  # The encoder: the clean pass at l predicts token l + 1 of the same document, scored where l + 1 is scored.
  encoder_valid = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0) & scored[:, 1:]
  encoder_nll = _nll(call.logits[:, C:-1], tokens[:, 1:], exclude_mask=False)
  return canvas_ce + ENCODER_WEIGHT * encoder_nll[encoder_valid].mean()


# ---- autoregressive -------------------------------------------------------------------------------------------------
def _ar_reference(calls, batch, rng):
  """Pretraining: the mean NLL over every next token of a segment. SFT: over the response's tokens only (the
  target scored), each row's mean, then the mean over rows."""
  del rng
  (call,) = calls
  tokens, segments, sft = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]), "loss_mask" in batch
  np.testing.assert_array_equal(call.tokens, tokens)
  valid = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0) & _scored(batch)[:, 1:]
  nll = _nll(call.logits[:, :-1], tokens[:, 1:], exclude_mask=False)
  return np.mean([row[keep].mean() for row, keep in zip(nll, valid)]) if sft else nll[valid].mean()


OBJECTIVES = {
    "masked": (lambda: MaskedDiffusion(mask_id=MASK, eps=EPS), _masked_reference),
    "block": (lambda: BlockDiffusion(mask_id=MASK, eps=EPS, block_size=BLOCK), _block_reference),
    "uniform": (lambda: UniformDiffusion(mask_id=MASK, eps=EPS, block_size=BLOCK,
                                         encoder_loss_weight=ENCODER_WEIGHT), _uniform_reference),
    "ar": (Autoregressive, _ar_reference),
}
CASES = [(name, sft) for sft in (False, True) for name in OBJECTIVES]


@pytest.mark.parametrize("name,sft", CASES, ids=[f"{n}-{'sft' if s else 'pretrain'}" for n, s in CASES])
def test_loss_recomputed_from_what_the_model_saw(name, sft):
  reference = OBJECTIVES[name][1]
  batch = _batch(seed=1, sft=sft)
  loss_fn = _spied_loss(name, sft)
  for seed in range(2):
    rng = jax.random.key(seed)
    loss, metrics, calls = loss_fn(batch, rng)
    np.testing.assert_allclose(loss, reference(calls, batch, rng), rtol=2e-5)
    if name != "uniform":  # the uniform loss counts one canvas per row
      assert int(metrics["num_tokens"]) == int(_scored(batch)[:, 1:].sum() if name == "ar" else _scored(batch).sum())


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_the_prompt_changes_the_loss_only_through_conditioning(name):
  """Another prompt (every prompt token replaced) leaves the loss of input-blind logits exactly as it was, for the
  same draws; it moves the loss of a model that reads its input, and, with the prompt scored too, of the blind
  one (so each comparison can fail)."""
  batch = _batch(seed=2, sft=True)
  prompt = np.asarray(batch["loss_mask"]) == 0
  tokens = np.asarray(batch["tokens"])
  other = np.where(prompt, (tokens + 5) % V, tokens)
  other = np.where(other == MASK, MASK + 1, other)
  assert np.all(other[prompt] != tokens[prompt])
  changed = dict(batch, tokens=jnp.asarray(other, jnp.int32))
  scored_too = lambda b: dict(b, loss_mask=jnp.ones_like(b["loss_mask"]))
  loss = lambda b, rng, reads: _spied_loss(name, True)(b, rng, reads)[0]
  for seed in range(3):
    rng = jax.random.key(seed)
    assert loss(batch, rng, False) == loss(changed, rng, False)
    assert loss(batch, rng, True) != loss(changed, rng, True)
    assert loss(scored_too(batch), rng, False) != loss(scored_too(changed), rng, False)

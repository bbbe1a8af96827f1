"""Block diffusion: the [canvas ; clean] mask through gradients, the b = L and b = 1 limits, SFT canvases, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ConstantLogits
from diffgemma_jax.config import base_config, validate
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.model.masks import make_mask
from diffgemma_jax.objectives import BlockDiffusion, MaskedDiffusion
from diffgemma_jax.objectives.ar import Autoregressive
from diffgemma_jax.objectives.block import block_ids, canvas_clean_forward, canvas_clean_mask, check_block_size
from diffgemma_jax.objectives.estimators import masked_token_nll
from diffgemma_jax.objectives.rows import has_predecessor

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=6, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense")
MASK = 63


def _batch(segments, seed=0, loss_mask=None):
  segments = np.asarray(segments, np.int32)
  positions = np.zeros_like(segments)
  for b, row in enumerate(segments):
    for i in range(1, len(row)):
      positions[b, i] = positions[b, i - 1] + 1 if row[i] == row[i - 1] else 0
  tokens = jax.random.randint(jax.random.key(seed), segments.shape, 0, MASK)
  batch = {"tokens": tokens, "segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions)}
  if loss_mask is not None:
    batch["loss_mask"] = jnp.asarray(loss_mask, jnp.int32)
  return batch


PACKED = [[1] * 7 + [2] * 5, [1] * 12, [1] * 9 + [0] * 3]
SFT_MASK = [[0] * 3 + [1] * 9, [0] * 5 + [1] * 7, [0] * 2 + [1] * 7 + [0] * 3]


def _allowed(batch, blocks, canvas_blocks, canvas_index):
  """The dependence a canvas query may have, from the definition: [B, C, B, C + L] booleans."""
  seg = np.asarray(batch["segment_ids"])
  blocks = np.asarray(blocks)
  B, L = seg.shape
  C = canvas_index.shape[1]
  allowed = np.zeros((B, C, B, C + L), bool)
  for b in range(B):
    for q in range(C):
      sq, bq = seg[b, canvas_index[b, q]], canvas_blocks[b, q]
      for k in range(C):
        allowed[b, q, b, k] = seg[b, canvas_index[b, k]] == sq and canvas_blocks[b, k] == bq
      for k in range(L):
        allowed[b, q, b, C + k] = seg[b, k] == sq and blocks[b, k] < bq
  return allowed


@pytest.mark.parametrize("block_size,sft,chosen", [(4, False, None), (1, False, None), (3, True, None)])
def test_a_canvas_token_sees_only_its_block_and_earlier_clean_blocks(block_size, sft, chosen):
  """d canvas logits / d input embeddings is zero for every key the layout forbids (and not for all others)."""
  batch = _batch(PACKED, loss_mask=SFT_MASK if sft else None)
  blocks = block_ids(batch, block_size)
  B, L = batch["tokens"].shape
  if chosen is None:  # the block objective: every block is a canvas
    canvas_index = np.tile(np.arange(L), (B, 1))
    canvas_blocks = np.asarray(blocks)
  else:  # the uniform objective: one chosen canvas per row
    canvas_index = np.asarray(chosen)[:, None] * block_size + np.arange(block_size)
    canvas_blocks = np.broadcast_to(np.asarray(chosen)[:, None], canvas_index.shape)
  take = lambda x: jnp.take_along_axis(x, jnp.asarray(canvas_index), axis=1)
  model = build_model(TINY, 0)
  C = canvas_index.shape[1]
  mask = canvas_clean_mask(take(batch["segment_ids"]), jnp.asarray(canvas_blocks), batch["segment_ids"],
                           batch["positions"], blocks)
  tokens = jnp.concatenate([take(batch["tokens"]), batch["tokens"]], axis=1)
  positions = jnp.concatenate([take(batch["positions"]), batch["positions"]], axis=1)
  r = jax.random.normal(jax.random.key(7), (TINY.vocab_size,))

  def canvas_logits(e):
    logits, _ = model(tokens, positions, mask, embeddings_BLD=e)
    return logits[:, :C] @ r

  # Eager on purpose: jax.jit(jax.jacrev(.)) of this layout returned misplaced entries on XLA:CPU (B >= 2), while
  # single jitted VJPs (what training uses) agree with the eager Jacobian.
  jac = jax.jacrev(canvas_logits)(jnp.zeros((B, C + L, TINY.embed_dim)))
  dependence = np.asarray(jnp.sum(jnp.abs(jac), axis=-1))
  allowed = _allowed(batch, blocks, canvas_blocks, canvas_index)
  assert np.all(dependence[~allowed] == 0.0), (np.max(dependence[~allowed]), np.max(dependence))
  # The layout does let canvases read earlier clean blocks and their own block (within the sliding window).
  assert np.mean(dependence[allowed] > 0) > 0.5


def test_the_chosen_canvas_layout_masks_exactly_the_forbidden_keys():
  """The uniform objective's [one canvas ; clean row] layout uses the same mask builder; check it entry by entry."""
  batch = _batch(PACKED)
  block_size, chosen = 4, np.array([1, 2, 0])
  blocks = block_ids(batch, block_size)
  canvas_index = chosen[:, None] * block_size + np.arange(block_size)
  canvas_blocks = np.broadcast_to(chosen[:, None], canvas_index.shape)
  take = lambda x: jnp.take_along_axis(x, jnp.asarray(canvas_index), axis=1)
  mask = np.asarray(canvas_clean_mask(take(batch["segment_ids"]), jnp.asarray(canvas_blocks), batch["segment_ids"],
                                      batch["positions"], blocks))
  allowed = _allowed(batch, blocks, canvas_blocks, canvas_index)
  for b in range(3):
    np.testing.assert_array_equal(mask[b, :block_size], allowed[b, :, b])
    assert not mask[b, block_size:, :block_size].any()  # the clean encoder never reads the canvas


def test_block_size_L_is_plain_masked_diffusion():
  batch = _batch(PACKED)
  L = batch["tokens"].shape[1]
  model = build_model(TINY, 0)
  block, masked = BlockDiffusion(mask_id=MASK, block_size=L), MaskedDiffusion(mask_id=MASK)
  loss = {o.name: jax.jit(lambda rng, o=o: o.loss_fn(model, batch, rng)) for o in (block, masked)}
  bound = {o.name: jax.jit(lambda rng, o=o: o.sequence_bound(model, batch, rng, num_t_samples=4))
           for o in (block, masked)}
  for seed in range(3):
    rng = jax.random.key(seed)
    (loss_b, m_b), (loss_m, m_m) = loss["block"](rng), loss["masked"](rng)
    np.testing.assert_allclose(loss_b, loss_m, rtol=1e-6)
    assert float(m_b["masked_fraction"]) == float(m_m["masked_fraction"])
    for a, b in zip(bound["block"](rng), bound["masked"](rng)):
      np.testing.assert_allclose(a, b, rtol=1e-5)


def test_block_size_1_is_the_autoregressive_loss_in_expectation():
  """With b = 1 a canvas token sees only itself and the clean tokens before it, so E_noise[NELBO] is the exact
  autoregressive NLL sum_l -log p(x_l | x_<l) read at canvas queries holding the mask token."""
  batch = _batch(PACKED, seed=3)
  B, L = batch["tokens"].shape
  model = build_model(TINY, 1)
  objective = BlockDiffusion(mask_id=MASK, block_size=1)
  blocks = block_ids(batch, 1)
  all_masked = jnp.full((B, L), MASK)
  logits, _, _ = canvas_clean_forward(model, all_masked, batch["positions"], batch["segment_ids"], blocks, batch,
                                      blocks)
  nll = masked_token_nll(logits, batch["tokens"], mask_id=MASK)
  ar_nll_B = np.asarray(jnp.sum(jnp.where(batch["segment_ids"] > 0, nll, 0.0), axis=-1))

  bound = jax.jit(lambda rng: objective.sequence_bound(model, batch, rng, num_t_samples=16)[0])
  estimates = np.stack([np.asarray(bound(jax.random.key(s))) for s in range(24)])  # [24, B]
  mean = estimates.mean(0)
  stderr = estimates.std(0, ddof=1) / np.sqrt(len(estimates))
  assert np.all(np.abs(mean - ar_nll_B) < 3.5 * stderr + 1e-3), (mean, ar_nll_B, stderr)
  # The training loss is the same estimator, per token. Its 1/t weights make single draws heavy-tailed (one draw's
  # spread is 1.2 nats a token), so each draw is also paired with the loss that uniform logits get from the same
  # noise (log(V-1) per weighted token, expectation log(V-1)): their weighted difference has expectation 0 and
  # cancels the weights' noise, which checks the scored log-likelihoods to 4 standard errors of 64 draws (0.1 nats
  # a token). The weights themselves are checked draw by draw in tests/test_objective_spies.py.
  expected = ar_nll_B.sum() / float(jnp.sum(batch["segment_ids"] > 0))
  paired = jax.jit(jax.vmap(lambda rng: (objective.loss_fn(model, batch, rng)[0],
                                         objective.loss_fn(ConstantLogits(TINY.vocab_size), batch, rng)[0])))
  loss, uniform_loss = (np.asarray(x, np.float64) for x in paired(jax.random.split(jax.random.key(100), 64)))
  assert abs(loss.mean() - expected) < 0.5, (loss.mean(), expected)
  difference = loss - expected / np.log(TINY.vocab_size - 1) * uniform_loss
  assert abs(difference.mean()) < 4 * difference.std(ddof=1) / np.sqrt(len(difference)), (difference.mean(),
                                                                                          difference.std())


def test_sft_canvases_start_at_the_response():
  """Block ids of SFT rows; that the prompt is never noised or scored is checked on a spy model in
  tests/test_objective_spies.py."""
  batch = _batch([[1] * 12] * 3, loss_mask=SFT_MASK)
  blocks = np.asarray(block_ids(batch, 4))
  np.testing.assert_array_equal(blocks[0], [-1] * 3 + [0] * 4 + [1] * 4 + [2])
  np.testing.assert_array_equal(blocks[1], [-1] * 5 + [0] * 4 + [1] * 3)
  np.testing.assert_array_equal(blocks[2], [-1] * 2 + [0] * 4 + [1] * 4 + [2] * 2)
  # a packed row (data.sft_packing): each example's canvases start at its response, numbered on along the row
  packed = _batch([[1] * 6 + [2] * 5 + [0]], loss_mask=[[0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(block_ids(packed, 2))[0], [-1, -1, 0, 0, 1, 1, -1, 2, 2, 3, 3, -1])


def test_loss_is_finite_and_differentiable_under_jit():
  from flax import nnx
  batch = _batch(PACKED)
  model = build_model(TINY, 0)
  objective = BlockDiffusion(mask_id=MASK, block_size=4)
  grads = nnx.jit(nnx.grad(lambda m: objective.loss_fn(m, batch, jax.random.key(0))[0]))(model)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  nelbo, stderr, num = jax.jit(lambda r: objective.sequence_bound(model, batch, r, num_t_samples=2))(jax.random.key(1))
  assert nelbo.shape == (3,) and bool(jnp.all(nelbo > 0)) and list(np.asarray(num)) == [12, 12, 9]


def test_block_size_errors_name_the_keys():
  with pytest.raises(ConfigError, match=r"objective.block_size=5.*train.seq_len=12"):
    BlockDiffusion(mask_id=MASK, block_size=5).loss_fn(build_model(TINY, 0), _batch(PACKED), jax.random.key(0))
  with pytest.raises(ConfigError, match="longer than the context"):
    check_block_size(12, 24)
  c = base_config()
  c.objective.name = "block"
  c.objective.block_size = 24
  with pytest.raises(ConfigError, match=r"objective.block_size=24 does not divide train.seq_len=128"):
    validate(c)
  c.objective.block_size = 256
  with pytest.raises(ConfigError, match="longer than the context"):
    validate(c)
  c.objective.block_size = 0
  with pytest.raises(ConfigError, match="objective.block_size"):
    validate(c)


# ---- token shift (model.token_shift) --------------------------------------------------------------------------
SHIFTED = dataclasses.replace(TINY, token_shift=True)


def _causal_logits(model, batch):
  """The clean pass on its own: the autoregressive reading of the same weights."""
  mask = make_mask("causal", batch["segment_ids"], batch["positions"])
  return model(batch["tokens"], batch["positions"], mask, token_mask_BL=batch["segment_ids"] > 0)[0]


@pytest.mark.parametrize("block_size", [1, 4])
def test_token_shift_reads_block_starts_from_the_causal_pass(block_size):
  """With token shift a block's first token is predicted by the causal pass at the position before it: exactly the
  next-token distribution of the same weights read as an AR model (so an AR checkpoint starts there intact); at
  b = 1 every prediction is, whatever the noise. Inside a block the prediction is the canvas output one slot back."""
  batch = _batch(PACKED, seed=4)
  model = build_model(SHIFTED, 2)
  objective = BlockDiffusion(mask_id=MASK, block_size=block_size)
  blocks = block_ids(batch, block_size)
  noisy = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, batch["tokens"].shape), MASK, batch["tokens"])
  logits = np.asarray(objective.canvas_logits_fn(model, batch, blocks)(noisy))
  causal = np.asarray(_causal_logits(model, batch))
  canvas, _, _ = canvas_clean_forward(model, noisy, batch["positions"], batch["segment_ids"], blocks, batch, blocks)
  predictable = np.asarray(has_predecessor(batch["segment_ids"]) & (batch["segment_ids"] > 0))
  for b, l in zip(*np.nonzero(predictable)):
    if l % block_size == 0:
      np.testing.assert_allclose(logits[b, l], causal[b, l - 1], rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_array_equal(logits[b, l], np.asarray(canvas)[b, l - 1])


def test_token_shift_scores_what_the_ar_model_scores():
  """Every token but the first of its document is noised and scored, as the AR baseline counts them, and at b = 1
  E_noise[NELBO] is the exact AR NLL of the same weights (the causal pass's next-token loss)."""
  batch = _batch(PACKED, seed=5)
  model = build_model(SHIFTED, 3)
  ar_nll, valid, _ = Autoregressive()._nll(model, batch)
  objective = BlockDiffusion(mask_id=MASK, block_size=1)
  bound = jax.jit(lambda rng: objective.sequence_bound(model, batch, rng, num_t_samples=16))
  estimates = []
  for s in range(24):
    nelbo, _, num = bound(jax.random.key(s))
    np.testing.assert_array_equal(num, jnp.sum(valid, axis=-1))  # [10, 11, 8]
    estimates.append(np.asarray(nelbo))
  estimates = np.stack(estimates)
  mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(len(estimates))
  ar_B = np.asarray(jnp.sum(ar_nll, axis=-1))
  assert np.all(np.abs(mean - ar_B) < 3.5 * stderr + 1e-3), (mean, ar_B, stderr)
  _, metrics = objective.loss_fn(model, batch, jax.random.key(0))
  assert int(metrics["num_tokens"]) == int(jnp.sum(valid))
  sft = _batch([[1] * 12] * 3, loss_mask=SFT_MASK)  # the first response token is predicted from the prompt
  _, metrics = BlockDiffusion(mask_id=MASK, block_size=4).loss_fn(model, sft, jax.random.key(0))
  assert int(metrics["num_tokens"]) == 9 + 7 + 7


"""Packed SFT rows (`data.sft_packing`, data/sft/rows.py): the layout of a packed row, each example normalised by
its own response (`rows.normalise_loss` against a loop over examples), and the exact AR loss of packed rows equal to
that of each example alone in its row (attention never crosses an example, positions restart)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffgemma_jax.data.sft import make_rows
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.objectives import make_objective
from diffgemma_jax.objectives.rows import normalise_loss

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=6, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense")


def _records(n: int):
  return [{"prompt": f"def f{i}(x):", "response": " return x" + " + 1" * (i % 4)} for i in range(n)]


def test_packed_rows_hold_every_example_whole(tiny_tokenizer):
  """Each example once, whole, in a segment of its own: [bos] prompt response EOS, EOS-padded to whole units;
  first fit fills rows tighter than one after another would; a long example is cut into a row of its own."""
  tok = tiny_tokenizer
  records = _records(12) + [{"prompt": "p " * 40, "response": "r " * 40}]  # the last fits no row alone
  records += [{"prompt": "x", "response": " y"}] * 3  # short ones fill the gaps first fit finds
  one_per_row, _ = make_rows(records, tok, 64, "plain")
  packed, stats = make_rows(records, tok, 64, "plain", pack_unit=4)
  assert len(one_per_row["tokens"]) == 16 and stats.responses_cut == 1
  examples, cut = [], []
  for row in range(len(packed["tokens"])):
    tokens, segments, positions, loss = (packed[k][row] for k in ("tokens", "segment_ids", "positions", "loss_mask"))
    real = segments > 0
    assert np.all(np.diff(segments[real]) >= 0) and np.all(segments[~real] == 0) and np.all(loss[~real] == 0)
    for s in range(1, segments.max() + 1):
      at = np.flatnonzero(segments == s)
      assert np.array_equal(at, np.arange(at[0], at[-1] + 1)) and np.array_equal(positions[at], np.arange(len(at)))
      whole_row = len(at) == len(segments)
      assert tokens[at[0]] == tok.bos_id and (whole_row or tokens[at[-1]] == tok.eos_id)
      response = at[loss[at] > 0]
      assert np.array_equal(response, at[len(at) - len(response):])  # prompt, then the response to the end
      (cut if whole_row else examples).append((tokens[at[1]:response[0]].tolist(), tokens[response].tolist()))
  assert len(examples) == 15 and len(cut) == 1  # the long example fills a row of its own, cut as one per row cuts it
  expected = []
  for row in [r for r in range(16) if r != 12]:
    alone = one_per_row["loss_mask"][row] > 0
    response = one_per_row["tokens"][row][alone].tolist()
    response = response[:response.index(tok.eos_id) + 1]
    expected.append((one_per_row["tokens"][row][1:int(np.argmax(alone))].tolist(),
                     response + [tok.eos_id] * (-len(response) % 4)))  # EOS-padded to whole units
  assert sorted(examples) == sorted(expected)
  used = int(np.sum(packed["segment_ids"] > 0))
  assert len(packed["tokens"]) == -(-(used - 64) // 64) + 1  # as few rows as the tokens need, and the cut one


def test_each_example_is_normalised_by_its_own_response():
  rng = np.random.default_rng(0)
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0], [1] * 10, [1, 1, 2, 2, 2, 0, 0, 0, 0, 0]], np.int32)
  scored = (rng.random(segments.shape) < 0.6) & (segments > 0)
  scored[2, :2] = False  # an example with nothing scored does not count
  contrib = np.where(scored, rng.random(segments.shape), 0.0).astype(np.float32)
  per_example = [contrib[b][(segments[b] == s)].sum() / scored[b][segments[b] == s].sum()
                 for b in range(3) for s in range(1, segments[b].max() + 1) if scored[b][segments[b] == s].any()]
  got = normalise_loss(jnp.asarray(contrib), jnp.asarray(scored), jnp.asarray(segments))
  np.testing.assert_allclose(float(got), np.mean(per_example), rtol=1e-6)
  pretraining = normalise_loss(jnp.asarray(contrib), jnp.asarray(scored))
  np.testing.assert_allclose(float(pretraining), contrib.sum() / scored.sum(), rtol=1e-6)


def _rows_of(examples, seq_len):
  """Rows holding `examples` [(tokens, prompt length)] in the given groups, segments 1, 2, ... per row."""
  rows = {k: np.zeros((len(examples), seq_len), np.int32) for k in ("tokens", "segment_ids", "positions",
                                                                      "loss_mask")}
  for r, group in enumerate(examples):
    start = 0
    for s, (tokens, prompt_length) in enumerate(group, 1):
      n = len(tokens)
      rows["tokens"][r, start:start + n] = tokens
      rows["segment_ids"][r, start:start + n] = s
      rows["positions"][r, start:start + n] = np.arange(n)
      rows["loss_mask"][r, start + prompt_length:start + n] = 1
      start += n
  return {k: jnp.asarray(v) for k, v in rows.items()}


def test_ar_loss_of_packed_rows_is_each_example_alone():
  """The AR objective is exact: its loss over two packed rows of five examples equals its loss over the five
  examples each alone in a row (attention, positions and normalisation all per example)."""
  rng = np.random.default_rng(1)
  examples = [(rng.integers(1, 60, n).tolist(), p) for n, p in [(9, 3), (5, 2), (7, 4), (11, 5), (6, 1)]]
  packed = _rows_of([examples[:3], examples[3:]], 24)
  alone = _rows_of([[e] for e in examples], 24)
  model = build_model(TINY, 0)
  objective = make_objective({"name": "ar"}, mask_id=-1)
  loss = jax.jit(lambda batch: objective.loss_fn(model, batch, jax.random.key(0))[1]["nelbo_per_token"])
  np.testing.assert_allclose(float(loss(packed)), float(loss(alone)), rtol=1e-5)
  # not the token-weighted mean: the examples' lengths differ, so that would be another number
  nll, valid, _ = objective._nll(model, alone)  # pylint: disable=protected-access
  assert abs(float(jnp.sum(nll) / jnp.sum(valid)) - float(loss(alone))) > 1e-3

"""Mixtures of token stores (rows drawn by weight, deterministic from the seed; per-source and weighted bounds)
and grain worker processes (the same batches as without them; refused where they cannot start)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os

import numpy as np
import pytest

from diffgemma_jax.data import make_train_iterator
from diffgemma_jax.data.mixture import mixture_bound, parse_mixture
from diffgemma_jax.data.store import ShardWriter
from diffgemma_jax.errors import DataError


def _synthetic_store(directory, low, high, num_docs=40, seed=0):
  """A token store whose ids all lie in [low, high), so a row tells which dataset it came from."""
  rng = np.random.default_rng(seed)
  stores = {}
  for split in ("train", "heldout"):
    writer = ShardWriter(os.path.join(directory, split), "00000", 512)
    docs = [rng.integers(low, high, size=int(n), dtype=np.int32) for n in rng.integers(5, 60, size=num_docs)]
    writer.add([("d", "")] * len(docs), docs)
    stores[split] = {"shards": [writer.close()], "unigram_counts": f"{split}.unigram"}
    writer.counts.tofile(os.path.join(directory, f"{split}.unigram"))
  with open(os.path.join(directory, "manifest.json"), "w") as f:
    json.dump({"kind": "text", "vocab_size": 512, "store": {"format": 1, "dtype": "<u2", "splits": stores}}, f)
  return directory


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  return _synthetic_store(str(root / "code"), 10, 100), _synthetic_store(str(root / "prose"), 100, 200, seed=1)


def test_rows_follow_the_weights_deterministically(two_stores):
  code, prose = two_stores

  def first_rows(seed, steps=40):
    it = make_train_iterator([code, prose], weights=[0.7, 0.3], seq_len=16, batch_size=10, seed=seed)
    return np.concatenate([next(it)["tokens"] for _ in range(steps)])

  rows = first_rows(0)
  from_code = np.all(rows < 100, axis=1)
  assert np.all(from_code | np.all(rows >= 100, axis=1))  # a row never mixes datasets
  assert abs(from_code.mean() - 0.7) < 0.01
  np.testing.assert_array_equal(first_rows(0), rows)
  assert not np.array_equal(first_rows(1), rows)


def test_mixture_spec_errors_name_the_key():
  assert parse_mixture("a:3, b:1") == [("a", 0.75), ("b", 0.25)]
  for bad, message in (("a:0.5,b", "not DIR:WEIGHT"), ("a:-1,b:1", "positive"), ("a:1", "at least two"),
                       ("a:1,a:2", "twice")):
    with pytest.raises(DataError, match=f"data.mixture.*{message}"):
      parse_mixture(bad)


def test_the_total_bound_is_the_weighted_mean_of_the_sources():
  code = {"nats_per_token": 1.0, "stderr_bits_per_token": 0.1, "num_tokens": 100, "num_sequences": 4,
          "num_examples": 4, "num_t_samples": 2}
  prose = dict(code, nats_per_token=3.0, stderr_bits_per_token=0.2, num_tokens=900)
  total = mixture_bound([("code", 0.7, code), ("prose", 0.3, prose)])
  assert math.isclose(total["nats_per_token"], 0.7 * 1.0 + 0.3 * 3.0)  # not token-weighted (that would be 2.8)
  assert math.isclose(total["ppl_bound"], math.exp(1.6)) and math.isclose(total["bits_per_token"], 1.6 / math.log(2))
  assert math.isclose(total["stderr_bits_per_token"], math.hypot(0.07, 0.06))
  assert total["sources"]["prose"]["weight"] == 0.3 and total["num_tokens"] == 1000


def test_eval_reports_each_source_and_the_weighted_total(two_stores, load_tiny):
  """The trainer's eval path (eval_sets -> held_out_bounds) with a bound function that scores every real token
  at a known cost per dataset."""
  import jax

  from diffgemma_jax.evaluate import held_out_bounds
  from diffgemma_jax.parallel.mesh import mesh_from_config
  from diffgemma_jax.train.dataset import eval_sets
  code, prose = two_stores
  config = load_tiny({"data.mixture": f"{code}:0.25,{prose}:0.75", "data.dir": "", "data.source": "",
                      "eval.max_sequences": "0"})
  sets = eval_sets(config, code)
  assert [(name, weight) for name, weight, _ in sets] == [(code, 0.25), (prose, 0.75)]

  def bound_fn(params, batch, key, row_ids):
    real = (batch["segment_ids"] > 0).sum(axis=1)
    cost = jax.numpy.where(batch["tokens"][:, 0] < 100, 1.0, 2.0)  # nats per token: 1 for code, 2 for prose
    return cost * real, real * 0.0, real

  result = held_out_bounds(bound_fn, None, sets, seed=0, num_t_samples=1, mesh=mesh_from_config(config))
  assert math.isclose(result["sources"][code]["nats_per_token"], 1.0, rel_tol=1e-6)
  assert math.isclose(result["sources"][prose]["nats_per_token"], 2.0, rel_tol=1e-6)
  assert math.isclose(result["nats_per_token"], 0.25 * 1.0 + 0.75 * 2.0, rel_tol=1e-6)


def test_workers_give_the_same_batches_and_resume(two_stores):
  code = two_stores[0]
  plain = make_train_iterator(code, seq_len=16, batch_size=4, seed=3)
  want = [next(plain) for _ in range(5)]
  workers = make_train_iterator(code, seq_len=16, batch_size=4, seed=3, num_workers=1)
  for expected in want[:3]:
    np.testing.assert_array_equal(next(workers)["tokens"], expected["tokens"])
  state = workers.get_state()
  assert state == {"next_index": 3}  # batches consumed, not those the worker prefetched
  resumed = make_train_iterator(code, seq_len=16, batch_size=4, seed=3)
  resumed.set_state(state)
  for expected in want[3:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_workers_are_refused_where_they_cannot_start(two_stores, monkeypatch):
  monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)  # pylint: disable=protected-access
  with pytest.raises(DataError, match="data.num_workers=2: this process is a daemon"):
    make_train_iterator(two_stores[0], seq_len=16, batch_size=4, seed=0, num_workers=2)


def test_config_refuses_a_bad_mixture_or_one_beside_a_source(load_tiny, two_stores):
  from diffgemma_jax.errors import ConfigError
  with pytest.raises(DataError, match="data.mixture.*at least two"):
    load_tiny({"data.mixture": f"{two_stores[0]}:1", "data.source": "", "data.dir": ""})
  with pytest.raises(ConfigError, match="data.mixture .* replaces data.recipe, data.source and data.dir"):
    load_tiny({"data.mixture": f"{two_stores[0]}:1,{two_stores[1]}:1"})  # the tiny config sets data.source
  with pytest.raises(ConfigError, match="data.num_workers: must be >= 0"):
    load_tiny({"data.num_workers": "-1"})

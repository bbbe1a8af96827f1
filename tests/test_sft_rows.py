"""Prompt-masked SFT rows (`data/sft/rows.py`): the row layout and mask, cuts counted, and the rows kept on disk
(`data/sft/cache.py`)."""

import numpy as np

from diffgemma_jax.data.sft import RowStats, make_row


def test_row_layout_masks_and_eos_padding():
  row = make_row([10, 11, 12], [20, 21], 10, bos_id=2, eos_id=3)
  np.testing.assert_array_equal(row["tokens"], [2, 10, 11, 12, 20, 21, 3, 3, 3, 3])
  np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # response + EOS padding
  np.testing.assert_array_equal(row["segment_ids"], np.ones(10))
  np.testing.assert_array_equal(row["positions"], np.arange(10))


def test_long_prompts_cut_from_the_left_and_counted():
  stats = RowStats()
  prompt = list(range(100, 120))
  row = make_row(prompt, [50, 51], 10, bos_id=2, eos_id=3, stats=stats)
  # bos kept, then the *last* prompt tokens, then the whole response and its EOS
  np.testing.assert_array_equal(row["tokens"], [2, 114, 115, 116, 117, 118, 119, 50, 51, 3])
  assert (stats.examples, stats.prompts_cut, stats.responses_cut) == (1, 1, 0)
  long_response = make_row(prompt, list(range(60, 80)), 10, bos_id=2, eos_id=3, stats=stats)
  # the prompt keeps half the row; the response is cut on the right (no EOS: it does not end there)
  np.testing.assert_array_equal(long_response["tokens"], [2, 116, 117, 118, 119, 60, 61, 62, 63, 64])
  assert (stats.examples, stats.prompts_cut, stats.responses_cut) == (2, 2, 1)
  assert "2 of 2 prompts were cut from the left and 1 responses cut" in stats.report("x")
  make_row([1], [2], 10, bos_id=2, eos_id=3, stats=stats)
  assert stats.examples == 3 and stats.prompts_cut == 2


def test_row_cache_is_written_as_rows_come_and_read_in_place(tmp_path):
  """data/sft/cache.py: the rows of a generator written to a cache folder read back as read-only memory maps
  equal to the rows; a second writer of the same folder (another process) finds the first's; an ArrayRows of the
  cache pickles (to grain's workers) as file names, not contents."""
  import pickle

  from diffgemma_jax.data.pipeline import ArrayRows
  from diffgemma_jax.data.sft.cache import open_rows, write_rows
  rng = np.random.default_rng(0)
  rows = [{k: rng.integers(0, 500, 64).astype(np.int32) for k in ("tokens", "segment_ids", "positions",
                                                                  "loss_mask")} for _ in range(300)]
  made = []

  def one_at_a_time():
    for row in rows:
      made.append(row)
      yield row

  folder = str(tmp_path / "train.rows")
  assert open_rows(folder) is None
  cached = write_rows(folder, one_at_a_time(), 64)
  assert len(made) == 300 and isinstance(cached["tokens"], np.memmap) and not cached["tokens"].flags.writeable
  for key in rows[0]:
    np.testing.assert_array_equal(cached[key], np.stack([r[key] for r in rows]))
  again = write_rows(folder, iter(rows[:1]), 64)  # lost the race: the folder in place is kept
  assert len(again["tokens"]) == 300 and sorted(p.name for p in tmp_path.iterdir()) == ["train.rows"]
  blob = pickle.dumps(ArrayRows(cached))
  assert len(blob) < 2000
  np.testing.assert_array_equal(pickle.loads(blob).take([5, 7])["loss_mask"], cached["loss_mask"][[5, 7]])
  assert len(write_rows(str(tmp_path / "empty.rows"), iter([]), 64)["tokens"]) == 0


def test_old_npz_row_caches_of_the_split_are_deleted_and_nothing_else(tiny_tokenizer, tmp_path, capsys):
  """Row caches of earlier versions (`<split>-sft-<template>-<seq_len>[-packed<n>]-<hash>.npz`, and a killed
  writer's `.<pid>.tmp.npz`) are never read: building the split's cache folder deletes that split's, in one line
  on stderr; the other split's (its rows not built yet), files of other names and the new cache stay."""
  from data_recipes.common import write_dataset
  from diffgemma_jax.data.pipeline import sft_rows
  data_dir = tmp_path / "ds"
  write_dataset(str(data_dir), "jsonl", {"train": [(f"t{i}", {"prompt": f"p{i}", "response": f"r{i}"})
                                                   for i in range(3)], "heldout": [("h", {"prompt": "p", "response": "r"})]},
                tokenizer=tiny_tokenizer.path)
  old = ("train-sft-gemma-128-0123456789abcdef.npz", "train-sft-diffusiongemma-512-packed16-fedcba9876543210.npz",
         "train-sft-plain-64-0123456789abcdef.npz.4242.tmp.npz")
  kept = ("heldout-sft-gemma-128-0123456789abcdef.npz", "train-sft-gemma-128-0123456789abcdeg.npz",
          "train-sft-gemma-128-0123456789abcdef.npz.bak", "train-tokens-0123456789abcdef.npz", "train.npz",
          "my-train-sft-gemma-128-0123456789abcdef.npz")
  for name in old + kept:
    (data_dir / name).write_bytes(b"\0" * 1000)
  before = set(p.name for p in data_dir.iterdir())
  rows = sft_rows(str(data_dir), "train", 32, "gemma")
  assert len(rows["tokens"]) == 3
  (new_cache,) = set(p.name for p in data_dir.iterdir()) - before
  assert new_cache.startswith("train-sft-gemma-32-") and new_cache.endswith(".rows")
  assert set(p.name for p in data_dir.iterdir()) == before - set(old) | {new_cache}
  err = capsys.readouterr().err
  assert err == (f"removed 3 row cache file(s) of the train split in the old format, no longer read (0.0 MiB) from "
                 f"{data_dir}: {', '.join(sorted(old))}\n")
  (data_dir / old[0]).write_bytes(b"")  # left by a run of an older version: the next start deletes it too
  sft_rows(str(data_dir), "train", 32, "gemma")
  assert not (data_dir / old[0]).exists() and "removed 1 row cache file(s)" in capsys.readouterr().err

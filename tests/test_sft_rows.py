"""Prompt-masked SFT rows (`data/sft/rows.py`): the row layout and mask, and cuts counted."""

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

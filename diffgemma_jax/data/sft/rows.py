"""Prompt-masked SFT rows: one example per row of `seq_len`.

[bos] prompt response [eos] [eos]... with `loss_mask` 1 on the response and its EOS padding (the padding is
corrupted and scored so the model learns to stop), 0 on bos and prompt; segment 1 everywhere; positions
0..seq_len-1. An example longer than the row is cut: the response keeps at most the row minus half of it (or minus
the whole prompt, if shorter), cut on the right; the prompt is cut from the left. Both cuts are counted and
reported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from diffgemma_jax.data.sft.encoding import marker_ids, split_tokens
from diffgemma_jax.data.sft.templates import render
from diffgemma_jax.errors import DataError


@dataclasses.dataclass
class RowStats:
  examples: int = 0
  prompts_cut: int = 0
  responses_cut: int = 0

  def report(self, what: str) -> str | None:
    if not (self.prompts_cut or self.responses_cut):
      return None
    return (f"warning: {what}: {self.prompts_cut} of {self.examples} prompts were cut from the left and "
            f"{self.responses_cut} responses cut on the right to fit train.seq_len")


def make_row(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int, *, bos_id: int, eos_id: int,
             stats: RowStats | None = None) -> dict[str, np.ndarray]:
  """One SFT row (see module docstring); counts cuts in `stats`."""
  if seq_len < 3:
    raise DataError(f"train.seq_len={seq_len} is too short for an SFT row (bos, prompt, response, eos)")
  prompt, response = list(prompt_ids), list(response_ids) + [eos_id]
  budget = seq_len - 1  # after bos
  if len(prompt) + len(response) > budget:
    keep_prompt = max(budget - len(response), min(len(prompt), budget // 2))
    keep_response = budget - keep_prompt
    if stats is not None:
      stats.prompts_cut += keep_prompt < len(prompt)
      stats.responses_cut += keep_response < len(response)
    prompt = prompt[len(prompt) - keep_prompt:]
    response = response[:keep_response]
  if stats is not None:
    stats.examples += 1
  head = [bos_id] + prompt
  tokens = np.full((seq_len,), eos_id, np.int32)
  tokens[:len(head)] = head
  tokens[len(head):len(head) + len(response)] = response
  loss_mask = np.zeros((seq_len,), np.int32)
  loss_mask[len(head):] = 1
  return {"tokens": tokens, "segment_ids": np.ones((seq_len,), np.int32),
          "positions": np.arange(seq_len, dtype=np.int32), "loss_mask": loss_mask}


def make_rows(records: Iterable[dict[str, Any]], tokenizer, seq_len: int, template: str,
              ) -> tuple[dict[str, np.ndarray], RowStats]:
  """All rows of a list of records, stacked: {tokens, segment_ids, positions, loss_mask} of [N, seq_len]."""
  stats = RowStats()
  markers = marker_ids(tokenizer, template)
  pairs = [pair for record in records for pair in render(record, template)]
  rows = []
  for prompt, response in pairs:
    prompt_ids, response_ids = split_tokens(tokenizer, prompt, response, markers)
    rows.append(make_row(prompt_ids, response_ids, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                         stats=stats))
  keys = ("tokens", "segment_ids", "positions", "loss_mask")
  if not rows:
    return {k: np.zeros((0, seq_len), np.int32) for k in keys}, stats
  return {k: np.stack([r[k] for r in rows]) for k in keys}, stats

"""Prompt-masked SFT rows: one example per row of `seq_len`, or several (packed).

One per row: [bos] prompt response [eos] [eos]... with `loss_mask` 1 on the response and its EOS padding (the
padding is corrupted and scored so the model learns to stop), 0 on bos and prompt; segment 1 everywhere; positions
0..seq_len-1. An example longer than the row is cut: the response keeps at most the row minus half of it (or minus
the whole prompt, if shorter), cut on the right; the prompt is cut from the left. Both cuts are counted and
reported.

Packed (`pack_unit` > 0, `data.sft_packing`): examples follow each other in a row, each its own segment with
positions from 0, as [bos] prompt response [eos] and EOS padding up to a whole number of `pack_unit` response
tokens (the objective's canvas, so a canvas sampler's last canvas learns to end in EOS; 1: a single EOS). Attention
never crosses an example, and every objective normalises each example by its own response length. An example goes
in the first of the open rows (at most 64, oldest first) with room for it, else it opens a row (the fullest open row
is then finished); the training iterator shuffles rows, so their order does not matter. One that fits no row alone
is cut as above and fills a row of its own. The rest of a row is padding (segment 0: never attended or
scored). A packed run's held-out examples are laid out the same way one per row (`alone`), so the bound scores
each response as training did and stays per example.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Sequence

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


KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def packed_example(prompt_ids: Sequence[int], response_ids: Sequence[int], pack_unit: int, *, bos_id: int,
                   eos_id: int) -> tuple[list[int], int]:
  """(tokens, prompt length with bos) of one packed example: [bos] prompt response [eos], EOS-padded to a whole
  number of `pack_unit` response tokens."""
  response = list(response_ids) + [eos_id]
  response += [eos_id] * (-len(response) % pack_unit)
  head = [bos_id] + list(prompt_ids)
  return head + response, len(head)


class RowPacker:
  """Rows of `seq_len` filled with packed examples, first fit among the last `max_open` rows still open (module
  docstring); each call returns the rows it finished. Memory holds at most `max_open` rows, however many
  examples."""

  def __init__(self, seq_len: int, pad_id: int, max_open: int = 64):
    self.seq_len, self.pad_id, self.max_open = seq_len, pad_id, max_open
    self.open: list[list] = []  # [row, tokens used], oldest first

  def add(self, tokens: Sequence[int], prompt_length: int) -> list[dict[str, np.ndarray]]:
    n = len(tokens)
    finished = []
    fits = [entry for entry in self.open if entry[1] + n <= self.seq_len]
    if fits:
      entry = fits[0]
    else:
      row = {k: np.zeros((self.seq_len,), np.int32) for k in KEYS}
      row["tokens"][:] = max(self.pad_id, 0)  # a tokenizer without a pad piece: id 0 (never read)
      entry = [row, 0]
      self.open.append(entry)
      if len(self.open) > self.max_open:  # the fullest open row is finished to make room
        fullest = max(self.open[:-1], key=lambda e: e[1])
        self.open = [e for e in self.open if e is not fullest]
        finished.append(fullest[0])
    row, start = entry
    row["tokens"][start:start + n] = tokens
    row["segment_ids"][start:start + n] = int(row["segment_ids"].max()) + 1
    row["positions"][start:start + n] = np.arange(n)
    row["loss_mask"][start + prompt_length:start + n] = 1
    entry[1] += n
    if entry[1] == self.seq_len:
      self.open = [e for e in self.open if e is not entry]
      finished.append(row)
    return finished

  def close(self) -> list[dict[str, np.ndarray]]:
    finished = [row for row, _ in self.open]
    self.open = []
    return finished


def iter_rows(records: Iterable[dict[str, Any]], tokenizer, seq_len: int, template: str, *, pack_unit: int = 0,
              alone: bool = False, stats: RowStats | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The rows of `records` one at a time, in order: one example per row, or packed with `pack_unit` > 0 (module
  docstring). `alone`: packed examples one per row (a packed run's held-out rows: each scored as training saw
  it, EOS-padded to whole units, not to the row). Cuts are counted in `stats`."""
  stats = RowStats() if stats is None else stats
  markers = marker_ids(tokenizer, template)
  packer = RowPacker(seq_len, tokenizer.pad_id)
  for record in records:
    for prompt, response in render(record, template):
      prompt_ids, response_ids = split_tokens(tokenizer, prompt, response, markers)
      if pack_unit > 0:
        tokens, prompt_length = packed_example(prompt_ids, response_ids, pack_unit, bos_id=tokenizer.bos_id,
                                               eos_id=tokenizer.eos_id)
        if len(tokens) <= seq_len:
          stats.examples += 1
          yield from packer.add(tokens, prompt_length)
          if alone:
            yield from packer.close()
          continue
      yield make_row(prompt_ids, response_ids, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                     stats=stats)
  yield from packer.close()


def make_rows(records: Iterable[dict[str, Any]], tokenizer, seq_len: int, template: str, *, pack_unit: int = 0,
              alone: bool = False) -> tuple[dict[str, np.ndarray], RowStats]:
  """All rows of `records` (`iter_rows`), stacked: {tokens, segment_ids, positions, loss_mask} of [N, seq_len]."""
  stats = RowStats()
  rows = list(iter_rows(records, tokenizer, seq_len, template, pack_unit=pack_unit, alone=alone, stats=stats))
  if not rows:
    return {k: np.zeros((0, seq_len), np.int32) for k in KEYS}, stats
  return {k: np.stack([r[k] for r in rows]) for k in KEYS}, stats

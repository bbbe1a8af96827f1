"""grain pipelines: tokenise once (cached), pack into rows with segment ids and positions, shuffle, shard, batch.

Packing concatenates the documents of a split, each as [bos] + ids + [eos], and cuts the stream into rows of
`seq_len`. A document that runs past a row's end continues in the next row as a new segment whose positions
start again at 0 (the model cannot attend across rows anyway). Rows therefore carry no padding, except the last
held-out row. Segment ids count 1, 2, ... within a row; 0 marks padding.

Training rows: `grain.MapDataset` over row indices -> shuffled anew each epoch with the seed -> repeated forever
-> this process's slice -> batched; its iterator is checkpointable (`get_state` / `set_state`). Held-out rows
come in order, unshuffled, with a padded final batch.
"""

from __future__ import annotations

import hashlib
import os

import grain
import numpy as np

from data_recipes.common import read_manifest, read_records, read_split
from diffgemma_jax.data.errors import DataError
from diffgemma_jax.data.tokenizer import Tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions")
SFT_KEYS = BATCH_KEYS + ("loss_mask",)


def _tokenizer_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def token_stream(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, document starts) of a split, tokenised once and cached as .npy beside the data."""
  manifest = read_manifest(data_dir)
  if manifest is None:
    raise DataError(f"data directory {data_dir!r} holds no manifest.json; build it with a data recipe")
  tok_path = os.path.join(data_dir, "tokenizer.model")
  cache = os.path.join(data_dir, f"{split}-tokens-{_tokenizer_hash(tok_path)}.npz")
  if os.path.isfile(cache):
    with np.load(cache) as z:
      return z["tokens"], z["starts"]
  tokenizer = Tokenizer(tok_path)
  docs = tokenizer.encode(read_split(data_dir, split), num_threads=2)
  pieces = [np.asarray([tokenizer.bos_id] + ids + [tokenizer.eos_id], np.int32) for ids in docs]
  lengths = np.asarray([len(p) for p in pieces], np.int64)
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  _save_npz(cache, tokens=tokens, starts=starts)
  return tokens, starts


def _save_npz(cache: str, **arrays) -> None:
  """Writes a cache file atomically: processes of one run may fill it at once, and the rename is atomic."""
  tmp = f"{cache}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, cache)


def pack_rows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, *, keep_partial: bool) -> dict[str, np.ndarray]:
  """Cuts the stream into [N, seq_len] rows with per-row segment ids and positions (see module docstring)."""
  n_full = len(tokens) // seq_len
  n_rows = n_full + (1 if keep_partial and len(tokens) % seq_len else 0)
  total = n_rows * seq_len
  padded = np.zeros((total,), np.int32)
  used = min(total, len(tokens))
  padded[:used] = tokens[:used]
  is_start = np.zeros((total,), bool)
  is_start[starts[starts < total]] = True
  is_start[::seq_len] = True  # a document continuing into a new row starts a new segment there
  real = np.arange(total) < used
  is_start &= real
  row_of = np.arange(total) // seq_len
  seg_counter = np.cumsum(is_start)
  first_seg_of_row = seg_counter[::seq_len][row_of] - 1 if n_rows else seg_counter
  segment_ids = np.where(real, seg_counter - first_seg_of_row, 0).astype(np.int32)
  last_start = np.maximum.accumulate(np.where(is_start, np.arange(total), 0))
  positions = np.where(real, np.arange(total) - last_start, 0).astype(np.int32)
  shape = (n_rows, seq_len)
  return {"tokens": padded.reshape(shape), "segment_ids": segment_ids.reshape(shape),
          "positions": positions.reshape(shape)}


def is_sft(data_dir: str) -> bool:
  manifest = read_manifest(data_dir)
  return bool(manifest and manifest.get("kind") == "sft")


def sft_rows(data_dir: str, split: str, seq_len: int, template: str) -> dict[str, np.ndarray]:
  """The prompt-masked rows of an SFT split (data/sft.py), built once per tokenizer, template and length and
  cached beside the data. Cut prompts and responses are counted and reported on stderr."""
  import sys
  from diffgemma_jax.data.sft import make_rows
  tok_path = os.path.join(data_dir, "tokenizer.model")
  cache = os.path.join(data_dir, f"{split}-sft-{template}-{seq_len}-{_tokenizer_hash(tok_path)}.npz")
  if os.path.isfile(cache):
    with np.load(cache) as z:
      rows = {k: z[k] for k in SFT_KEYS}
  else:
    rows, stats = make_rows(read_records(data_dir, split), Tokenizer(tok_path), seq_len, template)
    note = stats.report(f"{data_dir} ({split}, {template} template)")
    if note:
      print(note, file=sys.stderr)
    _save_npz(cache, **rows)
  if len(rows["tokens"]) == 0:
    raise DataError(f"the {split} split of {data_dir!r} holds no SFT examples")
  return rows


def _rows(data_dir: str, split: str, seq_len: int, keep_partial: bool, template: str = "gemma"
          ) -> dict[str, np.ndarray]:
  if is_sft(data_dir):
    return sft_rows(data_dir, split, seq_len, template)
  tokens, starts = token_stream(data_dir, split)
  rows = pack_rows(tokens, starts, seq_len, keep_partial=keep_partial)
  if len(rows["tokens"]) == 0:
    raise DataError(f"the {split} split of {data_dir!r} has {len(tokens)} tokens, fewer than one row of "
                    f"train.seq_len={seq_len}; use a bigger corpus or a shorter seq_len")
  return rows


class _TakeRow:
  """Rows by id; given an array of ids, the `count` of them from `start` (this process's part of a batch)."""

  def __init__(self, rows, start: int = 0, count: int | None = None):
    self.rows = rows
    self.start, self.count = start, count

  def __call__(self, index):
    if self.count is not None:
      index = index[self.start:self.start + self.count]
    return {k: v[index] for k, v in self.rows.items()}


def make_train_iterator(data_dir: str, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, num_workers: int = 0, template: str = "gemma"):
  """Infinite, checkpointable iterator of this process's batches ([batch_size, seq_len] int32 arrays).

  Process p of P gets rows [p * batch_size, (p + 1) * batch_size) of each global batch of P * batch_size rows, so
  the global batch (and the run) is the same for any number of processes.
  """
  del num_workers  # rows are precomputed in memory: the map is a gather, no worker processes needed
  rows = _rows(data_dir, "train", seq_len, keep_partial=False, template=template)
  n = len(rows["tokens"])
  if n < batch_size * process_count:
    raise DataError(f"the train split of {data_dir!r} packs into {n} rows of {seq_len}, fewer than one global "
                    f"batch ({batch_size} x {process_count} processes)")
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
  ds = ds.batch(batch_size * process_count, drop_remainder=True)  # row ids of global batches
  ds = ds.map(_TakeRow(rows, start=process_index * batch_size, count=batch_size))
  return iter(ds)


def make_eval_batches(data_dir: str, *, seq_len: int, batch_size: int, max_sequences: int = 0,
                      process_index: int = 0, process_count: int = 1,
                      template: str = "gemma") -> list[dict[str, np.ndarray]]:
  """The held-out split in order, unshuffled; the last batch padded with all-padding rows (segment 0)."""
  rows = _rows(data_dir, "heldout", seq_len, keep_partial=True, template=template)
  n = len(rows["tokens"])
  if max_sequences:
    n = min(n, max_sequences)
  index = np.arange(n)[process_index::process_count]
  batches = []
  for start in range(0, len(index), batch_size):
    take = index[start:start + batch_size]
    batch = {}
    for key in rows:
      x = rows[key][take]
      if len(take) < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - len(take), seq_len), np.int32)])
      batch[key] = x
    batches.append(batch)
  return batches


def unigram_ppl(data_dir: str, *, seq_len: int = 0, template: str = "gemma") -> float:
  """Held-out perplexity of an add-one-smoothed unigram model fitted on the training tokens (all tokens the bound
  scores: bos and eos included; for SFT data the response tokens and their EOS padding)."""
  if is_sft(data_dir):
    train, heldout = (sft_rows(data_dir, split, seq_len, template) for split in ("train", "heldout"))
    train_tokens = train["tokens"][train["loss_mask"] > 0]
    heldout_tokens = heldout["tokens"][heldout["loss_mask"] > 0]
  else:
    train_tokens, _ = token_stream(data_dir, "train")
    heldout_tokens, _ = token_stream(data_dir, "heldout")
  vocab = Tokenizer(os.path.join(data_dir, "tokenizer.model")).vocab_size
  counts = np.bincount(train_tokens, minlength=vocab).astype(np.float64) + 1.0
  log_p = np.log(counts / counts.sum())
  return float(np.exp(-np.mean(log_p[heldout_tokens])))

"""grain pipelines over built datasets: rows read on demand, shuffled, mixed, sharded by process, batched.

A pretraining dataset is a token store (data/store.py): rows of `seq_len` are read from memory-mapped shards when a
batch needs them, with their segment ids and positions. An SFT dataset's rows are made once per tokenizer,
template and length (data/sft/) and cached beside the data.

Training batches: per dataset, `grain.MapDataset` over row indices -> shuffled anew each epoch with the seed ->
repeated forever; several datasets (a mixture) are interleaved by weight (`MapDataset.mix`); the stream is cut
into global batches of `batch_size x process_count` rows and each process reads only its slice of each. The
iterator's state is the number of global batches consumed, so a resume on any number of processes (or workers)
continues with the same global batches. `num_workers` > 0 reads and batches in grain worker processes with
prefetch. Held-out rows come in order, unshuffled, with a padded final batch; with several processes each reads its
slice of every global batch.
"""

from __future__ import annotations

import collections.abc
import hashlib
import multiprocessing
import os
import sys

import grain
import numpy as np
from absl import flags

from diffgemma_jax.data.manifest import iter_records, read_manifest
from diffgemma_jax.data.sft import RowStats, iter_rows
from diffgemma_jax.data.sft.cache import open_rows, remove_old_npz_caches, write_rows
from diffgemma_jax.data.store import SplitStore, open_split, unigram_counts
from diffgemma_jax.data.tokenizer import Tokenizer
from diffgemma_jax.errors import DataError

BATCH_KEYS = ("tokens", "segment_ids", "positions")
PREFETCH_PER_WORKER = 2


def _tokenizer_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def dataset_manifest(data_dir: str) -> dict:
  manifest = read_manifest(data_dir)
  if manifest is None:
    raise DataError(f"data directory {data_dir!r} holds no manifest.json; build it with a data recipe")
  if manifest.get("kind", "text") == "text" and "store" not in manifest:
    raise DataError(f"{data_dir!r} was built before the token store; rebuild it (delete the folder, or run its "
                    f"recipe again)")
  return manifest


def is_sft(data_dir: str) -> bool:
  manifest = read_manifest(data_dir)
  return bool(manifest and manifest.get("kind") == "sft")


def sft_rows(data_dir: str, split: str, seq_len: int, template: str, pack_unit: int = 0) -> dict[str, np.ndarray]:
  """The prompt-masked rows of an SFT split (data/sft/; packed with `pack_unit` > 0, the held-out split one
  example per row in the packed layout), built once per tokenizer, template, length and packing into a cache
  folder beside the data (data/sft/cache.py: written as the records are read, then mapped read-only, so neither
  the records nor the rows need to fit in memory). Cut prompts and responses are counted and reported on stderr,
  and the split's `.npz` row caches of earlier versions deleted (one line on stderr)."""
  tok_path = os.path.join(data_dir, "tokenizer.model")
  packing = f"-packed{pack_unit}" if pack_unit > 0 else ""
  cache = os.path.join(data_dir, f"{split}-sft-{template}-{seq_len}{packing}-{_tokenizer_hash(tok_path)}.rows")
  rows = open_rows(cache)
  if rows is None:
    stats = RowStats()
    rows = write_rows(cache, iter_rows(iter_records(data_dir, split), Tokenizer(tok_path), seq_len, template,
                                       pack_unit=pack_unit, alone=split == "heldout", stats=stats), seq_len)
    note = stats.report(f"{data_dir} ({split}, {template} template)")
    if note:
      print(note, file=sys.stderr)
  stale = remove_old_npz_caches(data_dir, split)
  if stale:
    print(f"removed {len(stale)} row cache file(s) of the {split} split in the old format, no longer read "
          f"({sum(size for _, size in stale) / 2**20:.1f} MiB) from {data_dir}: {', '.join(n for n, _ in stale)}",
          file=sys.stderr)
  if len(rows["tokens"]) == 0:
    raise DataError(f"the {split} split of {data_dir!r} holds no SFT examples")
  return rows


class StoreRows:
  """Rows of a token-store split (read when asked for)."""

  def __init__(self, store: SplitStore, seq_len: int, keep_partial: bool):
    self.store, self.seq_len = store, seq_len
    self.num_rows = store.num_rows(seq_len, keep_partial)

  def take(self, indices) -> dict[str, np.ndarray]:
    return self.store.rows(indices, self.seq_len)


class ArrayRows:
  """Rows as arrays (an SFT split: memory maps of its row cache, data/sft/cache.py). Pickled (to grain's worker
  processes) a memory map travels as its file's name and shape, not as its contents."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self.rows = rows
    self.num_rows = len(rows["tokens"])

  def __getstate__(self):
    mapped = lambda v: isinstance(v, np.memmap) and v.filename is not None  # noqa: E731
    return {k: (str(v.filename), v.shape) if mapped(v) else v for k, v in self.rows.items()}

  def __setstate__(self, state):
    self.__init__({k: np.memmap(v[0], np.int32, "r", shape=v[1]) if isinstance(v, tuple) else v
                   for k, v in state.items()})

  def take(self, indices) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    return {k: v[indices] for k, v in self.rows.items()}


def split_rows(data_dir: str, split: str, seq_len: int, *, keep_partial: bool, template: str = "gemma",
               pack_unit: int = 0):
  """The rows of one split of a built dataset (StoreRows or ArrayRows; SFT rows packed with `pack_unit` > 0); at
  least one, else a DataError."""
  if is_sft(data_dir):
    return ArrayRows(sft_rows(data_dir, split, seq_len, template, pack_unit))
  rows = StoreRows(open_split(data_dir, dataset_manifest(data_dir), split), seq_len, keep_partial)
  if rows.num_rows == 0:
    raise DataError(f"the {split} split of {data_dir!r} has {rows.store.num_tokens} tokens, fewer than one row of "
                    f"train.seq_len={seq_len}; use a bigger corpus or a shorter seq_len")
  return rows


class _Tag:
  def __init__(self, source: int):
    self.source = source

  def __call__(self, row):
    return np.int64(self.source), np.int64(row)


class _ReadSlice:
  """Given a global batch of (source, row) ids, reads this process's `count` rows from `start`."""

  def __init__(self, readers: list, start: int, count: int):
    self.readers, self.start, self.count = readers, start, count

  def __call__(self, batch) -> dict[str, np.ndarray]:
    sources, rows = (np.asarray(x)[self.start:self.start + self.count] for x in batch)
    if len(self.readers) == 1:
      return self.readers[0].take(rows)
    parts = {s: self.readers[s].take(rows[sources == s]) for s in np.unique(sources)}
    out = {}
    for key in next(iter(parts.values())):
      x = np.empty((self.count,) + parts[sources[0]][key].shape[1:], np.int32)
      for s, part in parts.items():
        x[sources == s] = part[key]
      out[key] = x
    return out


def _source_seed(seed: int, source: int) -> int:
  return int(np.random.SeedSequence([seed, source]).generate_state(1)[0])


def row_ids(num_rows: list[int], weights: list[float] | None, seed: int) -> grain.MapDataset:
  """The infinite training stream of (source, row) ids: each source's rows shuffled anew each epoch, sources
  interleaved by weight (deterministic proportions)."""
  if len(num_rows) == 1:
    return grain.MapDataset.range(num_rows[0]).shuffle(seed=seed).repeat(None).map(_Tag(0))
  parts = [grain.MapDataset.range(n).shuffle(seed=_source_seed(seed, s)).repeat(None).map(_Tag(s))
           for s, n in enumerate(num_rows)]
  return grain.MapDataset.mix(parts, weights)


class TrainIterator:
  """This process's training batches; `get_state()` is `{"next_index": global batches consumed}` (the same as
  the grain iterator's before, so older checkpoints resume), independent of the process and worker counts."""

  def __init__(self, batches: grain.MapDataset, num_workers: int):
    self._batches, self._workers = batches, num_workers
    self._next, self._stream = 0, None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._workers == 0:
      batch = self._batches[self._next]
    else:
      if self._stream is None:
        _absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=PREFETCH_PER_WORKER)
        self._stream = iter(self._batches[self._next:].to_iter_dataset().mp_prefetch(options))
      batch = next(self._stream)
    self._next += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"next_index": self._next}

  def set_state(self, state: dict) -> None:
    self._next, self._stream = int(state["next_index"]), None


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags (their defaults here): our entry points parse arguments with
  argparse, so the flags are marked parsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def check_workers(num_workers: int) -> None:
  """Refuses `data.num_workers` where worker processes cannot start."""
  if num_workers < 0:
    raise DataError(f"data.num_workers={num_workers}: must be >= 0 (0 reads batches in the training process)")
  if num_workers and multiprocessing.current_process().daemon:
    raise DataError(f"data.num_workers={num_workers}: this process is a daemon process, which may not start "
                    f"worker processes; set data.num_workers=0")


def make_train_iterator(data_dirs: str | list[str], *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                        template: str = "gemma", weights: list[float] | None = None,
                        sft_pack_unit: int = 0) -> TrainIterator:
  """Infinite, checkpointable iterator of this process's batches ([batch_size, seq_len] int32 arrays).

  `data_dirs`: one built dataset, or several (a mixture, data/mixture.py) drawn by `weights`. Process p of P gets
  rows [p * batch_size, (p + 1) * batch_size) of each global batch of P * batch_size rows, so the global batch (and
  the run) is the same for any number of processes. SFT datasets are packed with `sft_pack_unit` > 0
  (data/sft/rows.py).
  """
  check_workers(num_workers)
  dirs = [data_dirs] if isinstance(data_dirs, str) else list(data_dirs)
  for d in dirs:
    if (read_manifest(d) or {}).get("evaluation_only"):
      raise DataError(f"{d!r} is an evaluation set (built from data.heldout_source alone): it has no train split "
                      f"to train on; give data.source too, or point data.dir at a training dataset")
  readers = [split_rows(d, "train", seq_len, keep_partial=False, template=template, pack_unit=sft_pack_unit)
             for d in dirs]
  if len(dirs) == 1 and readers[0].num_rows < batch_size * process_count:
    raise DataError(f"the train split of {dirs[0]!r} packs into {readers[0].num_rows} rows of {seq_len}, fewer "
                    f"than one global batch ({batch_size} x {process_count} processes)")
  ids = row_ids([r.num_rows for r in readers], weights, seed)
  batches = ids.batch(batch_size * process_count, drop_remainder=True)
  return TrainIterator(batches.map(_ReadSlice(readers, process_index * batch_size, batch_size)), num_workers)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-padding rows (segment 0: never scored), so every eval batch has one shape
  and the bound function compiles once."""
  out = {}
  for key in batch:
    x = np.asarray(batch[key], np.int32)
    if x.shape[0] < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - x.shape[0],) + x.shape[1:], np.int32)])
    out[key] = x
  return out


def row_hashes(batch: dict[str, np.ndarray]) -> np.ndarray:
  """[B] int32: per row, a 31-bit hash of its fields (tokens, positions, segments, loss mask) up to its last real
  token (segment > 0; the whole row without `segment_ids`), so the same row padded wider hashes the same. The
  bound keys a row's Monte-Carlo draws by it (train/bound.py)."""
  fields = sorted(batch)
  segments = np.asarray(batch["segment_ids"]) if "segment_ids" in batch else None
  out = np.zeros(len(batch[fields[0]]), np.int32)
  for b in range(len(out)):
    end = len(batch[fields[0]][b])
    if segments is not None:
      real = np.flatnonzero(segments[b] > 0)
      end = int(real[-1]) + 1 if len(real) else 0
    digest = hashlib.blake2b(digest_size=4)
    for key in fields:
      digest.update(key.encode() + np.ascontiguousarray(np.asarray(batch[key][b])[:end], np.int32).tobytes())
    out[b] = int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF
  return out


class EvalBatches(collections.abc.Sequence):
  """The held-out split as fixed-shape int32 batches, in order and unshuffled, each read when it is asked for: memory
  holds the batch in use, not the split (a whole held-out split of a large corpus is gigabytes of rows). The last
  batch is padded with all-padding rows (segment 0: never scored), so every batch has one shape.

  Several processes evaluating together (a mesh spanning them) each read one slice of every global batch of
  `batch_size` rows: slice `slice_index` of `num_slices` is rows [slice_index * batch_size / num_slices, ...) of
  each, so process p's batch b holds rows of the batch b one process reads, and the global batch the processes
  assemble (`jax.make_array_from_process_local_data`) holds the rows of one process's batch b, in the order the
  mesh places the processes' devices. Every process has the same number of batches; a slice past the split's end
  is all padding."""

  def __init__(self, rows, index: np.ndarray, batch_size: int, data_dir: str = "", *, slice_index: int = 0,
               num_slices: int = 1):
    if num_slices < 1 or not 0 <= slice_index < num_slices or batch_size % num_slices:
      raise ValueError(f"slice {slice_index} of {num_slices} of held-out batches of {batch_size} rows: the slice "
                       f"count must divide the batch size")
    self.rows, self.index, self.batch_size, self.data_dir = rows, index, batch_size, data_dir
    self.slice_index, self.num_slices = slice_index, num_slices

  @property
  def num_rows(self) -> int:
    """The rows of every slice together (the held-out rows evaluated)."""
    return len(self.index)

  @property
  def slice_rows(self) -> int:
    """Rows of each batch this slice holds (`batch_size` for one slice)."""
    return self.batch_size // self.num_slices

  def __len__(self) -> int:
    return -(-len(self.index) // self.batch_size)

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    if not -len(self) <= b < len(self):
      raise IndexError(f"held-out batch {b} of {len(self)}")
    b %= len(self)
    start = b * self.batch_size + self.slice_index * self.slice_rows
    return pad_batch(self.rows.take(self.index[start:start + self.slice_rows]), self.slice_rows)


def make_eval_batches(data_dir: str, *, seq_len: int, batch_size: int, max_sequences: int = 0,
                      process_index: int = 0, process_count: int = 1, template: str = "gemma",
                      sft_pack_unit: int = 0) -> EvalBatches:
  """The held-out split's first `max_sequences` rows (0: all) as `EvalBatches` of `batch_size` rows; with several
  processes loading slices (`parallel.mesh.batch_slice`), slice `process_index` of `process_count` of every batch
  (`batch_size` is the global batch: the slice count must divide it). SFT rows in a packed run's layout with
  `sft_pack_unit` > 0."""
  rows = split_rows(data_dir, "heldout", seq_len, keep_partial=True, template=template, pack_unit=sft_pack_unit)
  n = rows.num_rows
  if max_sequences:
    n = min(n, max_sequences)
  return EvalBatches(rows, np.arange(n), batch_size, data_dir, slice_index=process_index, num_slices=process_count)


def scored_counts(rows: dict[str, np.ndarray], vocab: int, chunk: int = 4096) -> np.ndarray:
  """[vocab] counts of the scored (`loss_mask`) tokens of SFT rows, read `chunk` rows at a time."""
  counts = np.zeros(vocab, np.int64)
  for start in range(0, len(rows["tokens"]), chunk):
    tokens, loss = (np.asarray(rows[k][start:start + chunk]) for k in ("tokens", "loss_mask"))
    counts += np.bincount(tokens[loss > 0], minlength=vocab)
  return counts


def unigram_ppl(data_dir: str, *, seq_len: int = 0, template: str = "gemma", sft_pack_unit: int = 0,
                heldout_dir: str | None = None) -> float:
  """Held-out perplexity of an add-one-smoothed unigram model fitted on the training tokens (all tokens the bound
  scores: bos and eos included; for SFT data the response tokens and their EOS padding). A token store keeps the
  counts of both splits, so this reads no tokens. `heldout_dir`: the held-out split of that dataset instead (an
  evaluation set of the same tokenizer; a token store)."""
  vocab = Tokenizer(os.path.join(data_dir, "tokenizer.model")).vocab_size
  manifest = None if is_sft(data_dir) else dataset_manifest(data_dir)

  def split_counts(split: str) -> np.ndarray:
    if manifest is None:  # SFT rows: their scored tokens
      return scored_counts(sft_rows(data_dir, split, seq_len, template, sft_pack_unit), vocab)
    return unigram_counts(data_dir, manifest, split)

  train_counts = split_counts("train")
  heldout_counts = split_counts("heldout") if heldout_dir is None else unigram_counts(
      heldout_dir, dataset_manifest(heldout_dir), "heldout")  # (the dataset's own held-out rows never read)
  counts = train_counts.astype(np.float64) + 1.0
  log_p = np.log(counts / counts.sum())
  return float(np.exp(-np.dot(heldout_counts, log_p) / heldout_counts.sum()))

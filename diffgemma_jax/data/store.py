"""The token store: a built pretraining split as shards of flat token ids and document starts, read row by row.

On disk, per split, shards `DIR/<split>/<name>.tokens` (the token ids of whole documents, each `[bos] ids [eos]`,
back to back, little-endian uint16 when the vocabulary fits, else uint32) and `DIR/<split>/<name>.starts`
(int64: where each document starts in its shard). The manifest's `store` section lists the shards in order with
their token and document counts; a split is the concatenation of its shards.

Rows are cut from that concatenation as they always were: row r of length L holds the split's tokens
[r L, (r + 1) L); a document that runs past a row's end continues in the next row as a new segment whose positions
start again at 0; segment ids count 1, 2, ... within a row and 0 marks padding (only in a held-out split's last
row). A row's segment ids and positions are computed when it is read, from the document starts that fall inside
it (a binary search in the memory-mapped starts), so reading never holds more than the rows asked for.

The local copy of a dataset in a bucket fetches a split's files when the split is opened (`open_split`,
`REMOTE_FILE`); a streamed one (`data.stream_tokens`) reads the token shards' rows in the bucket instead, a batch's
ranges in one concurrent request (`SplitStore`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time

import numpy as np

from diffgemma_jax import storage
from diffgemma_jax.errors import DataError

STARTS_DTYPE = np.dtype("<i8")
OPEN_SHARDS = 64  # memory maps kept open per split (each holds a file descriptor)
READ_ATTEMPTS = 4  # a streamed split's ranged reads: tries before a failure is an error


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned type that holds every id of the vocabulary."""
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
  """Writes one shard of one split, document batch by document batch; keeps only counters in memory."""

  def __init__(self, directory: str, name: str, vocab_size: int):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.name = directory, name
    self.dtype = token_dtype(vocab_size)
    self.counts = np.zeros((vocab_size,), np.int64)
    self.num_tokens = self.num_documents = self.bytes = 0
    self._digest = hashlib.sha256()
    self._tokens = open(os.path.join(directory, name + ".tokens"), "wb")
    self._starts = open(os.path.join(directory, name + ".starts"), "wb")

  def add(self, documents: list[tuple[str, str]], ids: list[np.ndarray]) -> None:
    """Appends documents (identity, text) and their token ids (bos and eos included)."""
    if ids:
      self.add_packed(documents, np.concatenate(ids), np.asarray([len(x) for x in ids], np.int64))

  def add_packed(self, documents: list[tuple[str, str]], packed: np.ndarray, lengths: np.ndarray) -> None:
    """Appends documents (identity, text) given as their token ids back to back and each one's length."""
    if not len(lengths):
      return
    starts = self.num_tokens + np.cumsum(lengths) - lengths
    self._tokens.write(packed.astype(self.dtype))
    self._starts.write(starts.astype(STARTS_DTYPE))
    self.counts += np.bincount(packed, minlength=len(self.counts))
    self.num_tokens += int(lengths.sum())
    self.num_documents += len(lengths)
    for identity, text in documents:
      data = text.encode("utf-8")
      self.bytes += len(data)
      self._digest.update(f"{identity}\0{len(data)}\0".encode())
      self._digest.update(data)

  def close(self) -> dict | None:
    """The shard's manifest entry; None (and no files) when it holds no document."""
    self._tokens.close()
    self._starts.close()
    if not self.num_documents:
      for suffix in (".tokens", ".starts"):
        os.remove(os.path.join(self.directory, self.name + suffix))
      return None
    split = os.path.basename(self.directory)
    return {"name": f"{split}/{self.name}", "num_tokens": self.num_tokens, "num_documents": self.num_documents,
            "bytes": self.bytes, "sha256": self._digest.hexdigest()}


class SplitStore:
  """One split of a token store, opened read-only; picklable (memory maps are reopened where it lands).

  With `tokens_url` (a streamed bucket dataset, data/remote_dataset.py) the `.tokens` shards stay in the bucket
  folder of that URL and a batch of rows reads its token ranges there, all the batch's ranges in one concurrent
  call (`fsspec`'s `cat_ranges`); `token_sizes` ({shard name + ".tokens": bytes}, what the bucket's listing held
  when the dataset was fetched) is checked against the manifest in place of the local files' sizes. The
  document starts are always local (memory-mapped): a binary search per row would cost a request per probe."""

  merge_ranges = True  # streamed: touching pieces read as one range (False: one per piece, bench/stream_rows.py's
  # baseline)

  def __init__(self, data_dir: str, split: str, shards: list[dict], dtype: str, *, tokens_url: str | None = None,
               token_sizes: dict[str, int] | None = None):
    self.data_dir, self.split, self.tokens_url = data_dir, split, tokens_url
    self.names = [s["name"] for s in shards]
    self.dtype = np.dtype(dtype)
    sizes = np.asarray([s["num_tokens"] for s in shards], np.int64)
    self.doc_counts = [int(s["num_documents"]) for s in shards]
    self.bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.num_tokens = int(self.bases[-1])
    for name, size, docs in zip(self.names, sizes, self.doc_counts):
      if tokens_url is None:
        self._check_size(name + ".tokens", int(size) * self.dtype.itemsize)
      else:
        listed = (token_sizes or {}).get(name + ".tokens")
        self._check_object(name + ".tokens", int(size) * self.dtype.itemsize, listed)
      self._check_size(name + ".starts", docs * STARTS_DTYPE.itemsize)
    self._open: collections.OrderedDict = collections.OrderedDict()

  def _check_size(self, name: str, expected: int) -> None:
    path = os.path.join(self.data_dir, name)
    if not os.path.isfile(path):
      raise DataError(f"token store shard {path} is missing; rebuild the dataset (delete {self.data_dir})")
    if os.path.getsize(path) != expected:
      raise DataError(f"token store shard {path} has {os.path.getsize(path)} bytes, the manifest says {expected} "
                      f"(truncated or overwritten); rebuild the dataset (delete {self.data_dir})")

  def _check_object(self, name: str, expected: int, listed: int | None) -> None:
    url = f"{self.tokens_url}/{name}"
    if listed is None:
      raise DataError(f"token store shard {url} is missing from the bucket; rebuild the dataset there")
    if listed != expected:
      raise DataError(f"token store shard {url} has {listed} bytes, the manifest says {expected} (truncated or "
                      f"overwritten); rebuild the dataset there")

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_open"] = collections.OrderedDict()
    return state

  def _shard(self, index: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(the shard's tokens, memory-mapped, or None when they stay in the bucket; its document starts)."""
    if index in self._open:
      self._open.move_to_end(index)
      return self._open[index]
    base = os.path.join(self.data_dir, self.names[index])
    size = int(self.bases[index + 1] - self.bases[index])
    tokens = None if self.tokens_url else np.memmap(base + ".tokens", self.dtype, "r", shape=(size,))
    maps = (tokens, np.memmap(base + ".starts", STARTS_DTYPE, "r", shape=(self.doc_counts[index],)))
    self._open[index] = maps
    if len(self._open) > OPEN_SHARDS:
      self._open.popitem(last=False)
    return maps

  def _pieces(self, start: int, stop: int) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """The split's tokens [start, stop) as (shard, first, end, offset) pieces (tokens [first, end) of the shard go
    to `offset` from `start`), and the document starts inside [start, stop), relative to `start`."""
    pieces, doc_starts = [], []
    first = int(np.searchsorted(self.bases, start, side="right")) - 1
    for index in range(first, len(self.names)):
      base = int(self.bases[index])
      if base >= stop:
        break
      lo, hi = max(start, base) - base, min(stop, int(self.bases[index + 1])) - base
      pieces.append((index, lo, hi, base + lo - start))
      shard_starts = self._shard(index)[1]
      i, j = np.searchsorted(shard_starts, [lo, hi], side="left")
      doc_starts.append(np.asarray(shard_starts[i:j]) + (base - start))
    return pieces, np.concatenate(doc_starts) if doc_starts else np.zeros((0,), np.int64)

  def _fill(self, out: list[np.ndarray], pieces: list[list[tuple[int, int, int, int]]]) -> None:
    """Writes each piece of `pieces[b]` into `out[b]`: from the memory maps, or (streamed) with one concurrent
    ranged read of every piece from the bucket."""
    if self.tokens_url is None:
      for row, row_pieces in zip(out, pieces):
        for index, lo, hi, offset in row_pieces:
          row[offset:offset + hi - lo] = self._shard(index)[0][lo:hi]
      return
    flat = [(row, piece) for row, row_pieces in zip(out, pieces) for piece in row_pieces]
    if not flat:
      return
    # One request per run of pieces that touch in a shard (consecutive rows: a held-out batch, read in order), so
    # an evaluation reads a batch of rows in a request or two; a shuffled training batch's rows rarely touch.
    ranges, where = [], [None] * len(flat)  # [shard, first, end] of each request; (request, token offset) per piece
    for k in sorted(range(len(flat)), key=lambda k: flat[k][1][:2]):
      index, lo, hi, _ = flat[k][1]
      if not (self.merge_ranges and ranges and ranges[-1][0] == index and ranges[-1][2] == lo):
        ranges.append([index, lo, hi])
      ranges[-1][2] = hi
      where[k] = (len(ranges) - 1, lo - ranges[-1][1])
    size = self.dtype.itemsize
    data = self._read_ranges([f"{self.names[index]}.tokens" for index, _, _ in ranges],
                             [lo * size for _, lo, _ in ranges], [hi * size for _, _, hi in ranges])
    for (index, lo, hi), got in zip(ranges, data):
      if len(got) != (hi - lo) * size:
        raise DataError(f"token store shard {self.tokens_url}/{self.names[index]}.tokens returned {len(got)} bytes "
                        f"of {(hi - lo) * size} asked for at byte {lo * size} (changed since the dataset was "
                        f"fetched); rebuild the dataset there or run again")
    for (row, (_, lo, hi, offset)), (request, at) in zip(flat, where):
      row[offset:offset + hi - lo] = np.frombuffer(data[request], self.dtype, hi - lo, at * size)

  def _read_ranges(self, names: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    """Bytes [start, end) of each named object of the bucket folder, read concurrently; a failed read is tried
    again (READ_ATTEMPTS in all, after 1, 2, 4 s: a bucket's passing errors must not end a long run), then a
    one-line DataError."""
    fs, root = storage.filesystem(self.tokens_url)
    keys = [f"{root.rstrip('/')}/{name}" for name in names]
    for attempt in range(READ_ATTEMPTS):
      try:
        return fs.cat_ranges(keys, starts, ends, on_error="raise")
      except Exception as e:  # noqa: BLE001 -- each client raises its own types (OSError, aiohttp's, botocore's)
        error = e
        if isinstance(e, (FileNotFoundError, PermissionError)):
          break  # an answer, not a passing failure
        if attempt + 1 < READ_ATTEMPTS:
          time.sleep(2 ** attempt)
    message = str(error).splitlines()[0][:200] if str(error) else ""
    raise DataError(f"reading the token store in {self.tokens_url} failed ({type(error).__name__}: {message}); "
                    f"check the bucket, or copy the dataset (data.stream_tokens=False)")

  def span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [start, stop) of the split (int32) and the document starts inside it, relative to `start`."""
    tokens = np.empty((stop - start,), np.int32)
    pieces, doc_starts = self._pieces(start, stop)
    self._fill([tokens], [pieces])
    return tokens, doc_starts

  def num_rows(self, seq_len: int, keep_partial: bool) -> int:
    return -(-self.num_tokens // seq_len) if keep_partial else self.num_tokens // seq_len

  def rows(self, indices, seq_len: int) -> dict[str, np.ndarray]:
    """The rows at `indices` ([len(indices), seq_len] int32 tokens, segment_ids and positions; padding past the
    split's end)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    count = len(indices)
    tokens = np.zeros((count, seq_len), np.int32)
    is_start = np.zeros((count, seq_len), bool)
    used = np.minimum(indices * seq_len + seq_len, self.num_tokens) - indices * seq_len
    pieces = []
    for b, index in enumerate(indices.tolist()):
      start = index * seq_len
      row_pieces, doc_starts = self._pieces(start, start + int(used[b]))
      pieces.append(row_pieces)
      is_start[b, doc_starts] = True
    self._fill(list(tokens), pieces)
    is_start[:, 0] = used > 0  # a document continuing into a row starts a new segment there
    column = np.arange(seq_len)
    real = column[None, :] < used[:, None]
    segment_ids = np.where(real, np.cumsum(is_start, axis=1), 0).astype(np.int32)
    last_start = np.maximum.accumulate(np.where(is_start, column, 0), axis=1)
    positions = np.where(real, column - last_start, 0).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


# In the local copy of a dataset in a bucket (data/remote_dataset.py): {"url": the bucket folder, "stream": whether
# the token shards stay there, "objects": {path: [size, sha256]} of the split folders' files, and when streamed
# "sizes": {path: bytes} of the token shards as listed at the fetch}. A split's files are fetched when it opens.
REMOTE_FILE = "remote.json"


def is_token_shard(rel: str) -> bool:
  """Whether a dataset file (a path in its folder) is a token shard, the files a streamed copy never holds."""
  return rel.endswith(".tokens")


def _fetch_split(data_dir: str, record: dict, split: str) -> None:
  """Copies the files of `split` that the local copy lacks (or holds cut short) from the bucket, each checked
  against its recorded size and sha256 (a streamed copy: its document starts only); one line on stderr when any."""
  missing = []
  for rel, (size, sha256) in sorted(record["objects"].items()):
    path = os.path.join(data_dir, rel)
    if rel.startswith(split + "/") and not (record["stream"] and is_token_shard(rel)) and not storage.has_file(
        path, size):
      missing.append((rel, size, sha256))
  if not missing:
    return
  total = sum(size for _, size, _ in missing)
  from diffgemma_jax.data import remote_dataset  # pylint: disable=import-outside-toplevel (it imports this module)
  remote_dataset.make_room(data_dir, total)  # data.cache_max_gb counts the split before it lands
  print(f"fetching the {split} split of {record['url']}: {len(missing)} file(s), {total / 2**20:,.1f} MiB, into "
        f"{data_dir}", file=sys.stderr, flush=True)

  def fetch(item):
    rel, size, sha256 = item
    url = storage.join(record["url"], rel)
    try:
      storage.download(url, os.path.join(data_dir, rel), size=size, sha256=sha256)
    except FileNotFoundError:
      raise DataError(f"token store file {url} is missing from the bucket; rebuild the dataset there") from None

  storage.concurrently(fetch, missing)  # thousands of shards: round trips overlap


def open_split(data_dir: str, manifest: dict, split: str) -> SplitStore:
  """One split of the token store in `data_dir`; in the local copy of a bucket dataset, its files are fetched
  first where missing (`REMOTE_FILE`), and a streamed copy's token shards are read in the bucket."""
  store = manifest["store"]
  remote = {}
  path = os.path.join(data_dir, REMOTE_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      record = json.load(f)
    _fetch_split(data_dir, record, split)
    if record["stream"]:
      remote = {"tokens_url": record["url"], "token_sizes": record["sizes"]}
  return SplitStore(data_dir, split, store["splits"][split]["shards"], store["dtype"], **remote)


def unigram_counts(data_dir: str, manifest: dict, split: str) -> np.ndarray:
  """Token counts of a split (every id, bos and eos included), accumulated by the build."""
  name = manifest["store"]["splits"][split]["unigram_counts"]
  path = os.path.join(data_dir, name)
  counts = np.fromfile(path, STARTS_DTYPE) if os.path.isfile(path) else None
  if counts is None or len(counts) != manifest["vocab_size"]:
    raise DataError(f"unigram counts {path} are missing or damaged; rebuild the dataset (delete {data_dir})")
  return counts

"""Reading and writing the safetensors format with numpy alone (bfloat16 through ml_dtypes, which jax ships).

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus an optional "__metadata__"), then the raw little-endian tensor bytes. Reading takes a local path or a bucket
URL (`storage` decides which): a local file is memory-mapped, an object is read in place by ranged reads (the
header, then each tensor's exact bytes when it is asked for), so a tensor costs host memory only when it is
converted and a checkpoint in a bucket is never downloaded whole. The `safetensors` package is not needed (its
numpy API cannot return bfloat16, the dtype of the released weights).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import struct
from typing import Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DAMAGED = "the file is damaged or cut short (an interrupted upload or copy?); replace it"


class SafetensorsFile:
  """Lazy reader of one .safetensors file, a local path or a bucket URL: `names()`, `get(name)` (a read-only array).

  Opening reads the header (two small reads: its length, then the JSON) and checks every tensor's byte range
  against the file's size and the tensor's shape and dtype, so a damaged file fails naming the file and the tensor
  before anything is converted. `get` memory-maps a local file; from a bucket it reads exactly the tensor's bytes
  (one ranged read) and checks that they all came.
  """

  def __init__(self, path):
    self.path = str(path)
    size = storage.file_size(self.path)
    if size is None:
      raise FileNotFoundError(f"{self.path}: no such file")
    if size < 8:
      raise ConfigError(f"{self.path}: {size} bytes, shorter than a safetensors header's length field; {_DAMAGED}")
    (length,) = struct.unpack("<Q", self._read(0, 8, "the header length"))
    if 8 + length > size:
      raise ConfigError(f"{self.path}: the header length says {length} bytes but the file holds {size}; {_DAMAGED}")
    try:
      header = json.loads(self._read(8, 8 + length, "the header"))
    except ValueError as e:  # json's errors and UnicodeDecodeError
      raise ConfigError(f"{self.path}: the header is not JSON ({e}); {_DAMAGED}") from None
    if not isinstance(header, dict):
      raise ConfigError(f"{self.path}: the header is not a JSON object; {_DAMAGED}")
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header = header
    self._data_start = 8 + length
    for name, entry in header.items():
      self._check(name, entry, size)
    self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if header and not storage.is_url(self.path) else None

  def _check(self, name: str, entry, size: int) -> None:
    """Fails naming `name` unless its entry has a dtype, a shape and a byte range that lies inside the file and
    holds exactly that shape of that dtype."""
    try:
      start, end = (int(x) for x in entry["data_offsets"])
      shape = [int(d) for d in entry["shape"]]
      dtype = entry["dtype"]
    except (KeyError, TypeError, ValueError):
      raise ConfigError(f"{self.path}: tensor {name}: header entry {entry!r} lacks dtype, shape or data_offsets "
                        f"[start, end]; {_DAMAGED}") from None
    if not 0 <= start <= end or self._data_start + end > size:
      raise ConfigError(f"{self.path}: tensor {name} lies at bytes {self._data_start + start}-{self._data_start + end}"
                        f" but the file holds {size}; {_DAMAGED}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize if dtype in DTYPES else end - start
    if end - start != nbytes:
      raise ConfigError(f"{self.path}: tensor {name} ({dtype} {shape}) needs {nbytes} bytes but its data_offsets "
                        f"span {end - start}; {_DAMAGED}")

  def _read(self, start: int, end: int, what: str) -> bytes:
    """Bytes [start, end) of the file, failing naming `what` when fewer came (the file changed or was cut short
    while it was read)."""
    data = storage.read_range(self.path, start, end)
    if len(data) != end - start:
      raise ConfigError(f"{self.path}: {what}: got {len(data)} of its {end - start} bytes ({start}-{end}); the file "
                        f"changed or was cut short while it was read: check it and import again")
    return data

  def names(self) -> list[str]:
    return list(self.header)

  @property
  def remote(self) -> bool:
    """Read from a bucket (ranged requests), not memory-mapped."""
    return self._map is None

  def nbytes(self, name: str) -> int:
    start, end = self.header[name]["data_offsets"]
    return int(end) - int(start)

  def get(self, name: str) -> np.ndarray:
    entry = self.header[name]
    if entry["dtype"] not in DTYPES:
      raise ConfigError(f"{self.path}: tensor {name} has dtype {entry['dtype']}; supported: {', '.join(DTYPES)}")
    start, end = (self._data_start + int(x) for x in entry["data_offsets"])
    if self._map is not None:
      raw = self._map[start:end]
    else:
      raw = np.frombuffer(self._read(start, end, f"tensor {name}"), np.uint8)
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


READ_AHEAD_TENSORS = 8
READ_AHEAD_BYTES = 2 << 30


def tensors_in_order(files: Sequence[SafetensorsFile], skip: Callable[[str], bool] = lambda name: False, *,
                     workers: int = READ_AHEAD_TENSORS,
                     max_bytes: int = READ_AHEAD_BYTES) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) of every tensor of `files` in file and header order, but those `skip` names. From a bucket the
  next tensors are fetched while the current one is converted, each by its own ranged request on one of `workers`
  threads, at most `max_bytes` of them ahead (one request at a time spends a round trip per tensor: the 26B
  release's thousands of tensors would leave the network idle between them); local files are memory-mapped, so
  nothing is read ahead."""
  wanted = [(f, name) for f in files for name in f.names() if not skip(name)]
  with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
    ahead: collections.deque = collections.deque()
    in_flight, submitted = 0, 0
    for f, name in wanted:
      while submitted < len(wanted) and (not ahead or (len(ahead) < workers and in_flight < max_bytes)):
        next_file, next_name = wanted[submitted]
        size = next_file.nbytes(next_name) if next_file.remote else 0
        ahead.append((size, pool.submit(next_file.get, next_name) if next_file.remote else None))
        in_flight += size
        submitted += 1
      size, future = ahead.popleft()
      in_flight -= size
      yield name, future.result() if future is not None else f.get(name)


def shard_files(directory: str) -> list[str]:
  """The checkpoint's .safetensors files in index order (or the single file) in `directory`, a local folder or a
  bucket URL."""
  index = storage.join(directory, INDEX_FILE)
  if storage.file_size(index) is not None:
    weight_map = json.loads(storage.open_path(index).read_text())["weight_map"]
    return [storage.join(directory, name) for name in dict.fromkeys(weight_map.values())]
  single = storage.join(directory, SINGLE_FILE)
  if storage.file_size(single) is not None:
    return [single]
  found = sorted(p.name for p in storage.open_path(directory).iterdir() if p.name.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(f"{directory}: no {INDEX_FILE}, {SINGLE_FILE} or other .safetensors file")
  return [storage.join(directory, name) for name in found]


def write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
  """Writes (name, array) pairs to one file; the arrays are written one after another."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, array in tensors:
    dtype = np.dtype(array.dtype)
    if dtype not in NAMES:
      raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors name")
    header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, array in tensors:
      f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def write_sharded(directory: str, tensors: Iterator[tuple[str, np.ndarray]], *, max_shard_bytes: int = 4 << 30,
                  metadata: dict[str, str] | None = None) -> list[str]:
  """Writes tensors into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own) and the
  index file; only one shard's tensors are held at a time. Returns the shard file names."""
  os.makedirs(directory, exist_ok=True)
  pending, size, written = [], 0, []

  def flush():
    nonlocal pending, size
    if pending:
      name = f"shard-{len(written):05d}.tmp"
      write_file(os.path.join(directory, name), pending, metadata)
      written.append((name, [n for n, _ in pending], size))
    pending, size = [], 0

  for name, array in tensors:
    if pending and size + array.nbytes > max_shard_bytes:
      flush()
    pending.append((name, array))
    size += array.nbytes
  flush()
  total = len(written)
  weight_map, files, total_size = {}, [], 0
  for i, (tmp, names, nbytes) in enumerate(written):
    final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
    os.replace(os.path.join(directory, tmp), os.path.join(directory, final))
    files.append(final)
    total_size += nbytes
    weight_map.update({n: final for n in names})
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
  return files

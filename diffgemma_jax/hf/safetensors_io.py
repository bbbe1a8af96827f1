"""Reading and writing the safetensors format with numpy alone (bfloat16 through ml_dtypes, which jax ships).

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus an optional "__metadata__"), then the raw little-endian tensor bytes. Reading memory-maps the file, so a
tensor costs host memory only when it is converted; the `safetensors` package is not needed (its numpy API cannot
return bfloat16, the dtype of the released weights).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
  """Lazy reader of one .safetensors file: `names()`, `get(name)` (a read-only memory-mapped array)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (length,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(length))
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header = header
    self._data_start = 8 + length
    self._map = np.memmap(path, dtype=np.uint8, mode="r") if header else None

  def names(self) -> list[str]:
    return list(self.header)

  def get(self, name: str) -> np.ndarray:
    entry = self.header[name]
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which is not supported")
    start, end = entry["data_offsets"]
    raw = self._map[self._data_start + start:self._data_start + end]
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def shard_files(directory: str) -> list[str]:
  """The checkpoint's .safetensors files in index order (or the single file)."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return [os.path.join(directory, name) for name in dict.fromkeys(weight_map.values())]
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(single):
    return [single]
  found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(f"{directory}: no {INDEX_FILE}, {SINGLE_FILE} or other .safetensors file")
  return [os.path.join(directory, f) for f in found]


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

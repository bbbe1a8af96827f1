"""A large job's inputs kept on disk, not in memory: a generation job of ten million prompts read them whole.

`diffgemma-generate --prompts FILE` held every prompt as a Python string (with a string naming its line), every
prompt's token ids as an array, and, for the run, every prompt's ids again as a list of Python ints: about 12 kB a
prompt of 500 characters (281 tokens of the main job's tokenizer), so a million prompts took 12 GB before the first
batch ran and ten million did not fit a GPU host. Now the texts and the ids lie in unnamed temporary files (gone
with the process) and memory holds where each one lies: 8 bytes a text, 12 an id row (`bench/prompts_memory.py`).

`SpoolFile`: bytes appended to an unnamed temporary file and read back from where they lie (`os.pwrite` /
`os.pread`, so no file position is shared). `Records`: records 0, 1, ... appended in order, their ends in an
array of 8-byte ints. `Texts`: strings as UTF-8 records, a `Sequence[str]`. `TokenRows`: int32 rows of token ids,
a `Sequence[list[int]]` that also gives every row's length without reading one (`lengths`), which the batching of
prompts by length needs. `Take`: a view of some items of a sequence, by position, that keeps `lengths`; `Mapped`:
a function of each item, applied as it is read.
"""

from __future__ import annotations

import array
import os
import tempfile
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
_READ_AHEAD = 1 << 20  # bytes read at a time when records are iterated in order


class SpoolFile:
  """Bytes appended to an unnamed temporary file in `folder` (default: the temporary folder), read back by offset.
  A short write (a full disk) is an OSError naming the folder and `what` the spool holds."""

  def __init__(self, folder: str | None = None, what: str = "spool"):
    self.folder, self.what = folder or tempfile.gettempdir(), what
    self._file = tempfile.TemporaryFile(prefix="diffgemma-spool-", dir=self.folder)
    self.size = 0

  def append(self, data: bytes) -> int:
    """Writes `data` at the end; returns where it starts."""
    at = self.size
    if data and os.pwrite(self._file.fileno(), data, at) != len(data):  # a regular file writes short only when full
      raise OSError(f"the {self.what} file in {self.folder} could not take {len(data)} more bytes: is the disk full?")
    self.size += len(data)
    return at

  def read(self, offset: int, length: int) -> bytes:
    data = os.pread(self._file.fileno(), length, offset)
    if len(data) != length:
      raise OSError(f"the {self.what} file in {self.folder} ended at {self.size} bytes, short of a record")
    return data


class Records(Sequence[bytes]):
  """Byte records 0, 1, ... appended in order to a `SpoolFile`; memory holds each one's end (8 bytes)."""

  def __init__(self, folder: str | None = None, what: str = "spool"):
    self.spool = SpoolFile(folder, what)
    self._ends = array.array("q")

  def append(self, record: bytes) -> None:
    self.spool.append(record)
    self._ends.append(self.spool.size)

  def _span(self, index: int) -> tuple[int, int]:
    if index < 0:
      index += len(self._ends)
    if not 0 <= index < len(self._ends):
      raise IndexError(f"record {index} of {len(self._ends)}")
    start = self._ends[index - 1] if index else 0
    return start, self._ends[index] - start

  def __getitem__(self, index):  # a slice is not needed by any caller: refused rather than read whole
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f"records are read one at a time, by an int index (got {type(index).__name__})")
    return self.spool.read(*self._span(int(index)))

  def __len__(self) -> int:
    return len(self._ends)

  def __iter__(self) -> Iterator[bytes]:
    """The records in order, read a megabyte or so at a time (one read each would cost a system call)."""
    index, count = 0, len(self._ends)
    while index < count:
      start = self._ends[index - 1] if index else 0
      last = index
      while last + 1 < count and self._ends[last + 1] - start <= _READ_AHEAD:
        last += 1
      data = self.spool.read(start, self._ends[last] - start)
      for i in range(index, last + 1):
        begin = (self._ends[i - 1] if i else 0) - start
        yield data[begin:self._ends[i] - start]
      index = last + 1

  def lengths(self) -> np.ndarray:
    """Every record's length in bytes, int64 (read from memory, not from the spool)."""
    ends = np.frombuffer(self._ends, np.int64) if len(self._ends) else np.zeros((0,), np.int64)
    return np.diff(ends, prepend=0)


class Texts(Sequence[str]):
  """Strings spooled as UTF-8 (`Records`)."""

  def __init__(self, folder: str | None = None, what: str = "text spool"):
    self.records = Records(folder, what)

  def append(self, text: str) -> None:
    self.records.append(text.encode("utf-8"))

  def __getitem__(self, index) -> str:
    return self.records[index].decode("utf-8")

  def __len__(self) -> int:
    return len(self.records)

  def __iter__(self) -> Iterator[str]:
    return (record.decode("utf-8") for record in self.records)


class TokenRows(Sequence[list[int]]):
  """Rows of token ids spooled as int32 (`Records`); `row(i)` an array, `[i]` a list of ints, `lengths()` every
  row's length in tokens."""

  def __init__(self, folder: str | None = None, what: str = "token spool"):
    self.records = Records(folder, what)

  def append(self, ids) -> None:
    self.records.append(np.asarray(ids, np.int32).astype("<i4", copy=False).tobytes())

  def row(self, index) -> np.ndarray:
    return np.frombuffer(self.records[index], "<i4").astype(np.int32)

  def __getitem__(self, index) -> list[int]:
    return self.row(index).tolist()

  def __len__(self) -> int:
    return len(self.records)

  def lengths(self) -> np.ndarray:
    return self.records.lengths() // 4


class Take(Sequence[T]):
  """`items[positions[i]]` as item i (a view: nothing copied); `lengths()` where `items` gives them (`lengths`)."""

  def __init__(self, items: Sequence[T], positions: Sequence[int]):
    self.items, self.positions = items, positions

  def __getitem__(self, index) -> T:
    return self.items[self.positions[index]]

  def __len__(self) -> int:
    return len(self.positions)

  def lengths(self) -> np.ndarray:
    return lengths(self.items)[np.asarray(self.positions, np.int64)]


class Mapped(Sequence[T]):
  """`fn(items[i])` as item i, made as it is read (a chat turn around a spooled prompt: a `ChatText` keeps where
  its content lies, which a spooled string would lose). Iterated only, `items` may be any sized iterable (a
  results file's `Results`)."""

  def __init__(self, items: Sequence, fn: Callable[..., T]):
    self.items, self.fn = items, fn

  def __getitem__(self, index) -> T:
    return self.fn(self.items[index])

  def __len__(self) -> int:
    return len(self.items)

  def __iter__(self) -> Iterator[T]:
    return map(self.fn, self.items)


def lengths(items: Sequence) -> np.ndarray:
  """Every item's length, int64: from `items.lengths()` where it has one (a spool: nothing read), else `len` each."""
  if hasattr(items, "lengths"):
    return items.lengths()
  return np.fromiter((len(item) for item in items), np.int64, len(items))

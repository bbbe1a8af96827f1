"""Pretraining documents from files, by extension; every record is one document.

  .jsonl, .jsonl.gz   one JSON object per line, the text in `text_field` (identity `file:LINE`, 1-based)
  .parquet            the `text_field` column, read one record batch at a time (identity `file:ROW`, 0-based)
  .array_record       UTF-8 text records (identity `file:RECORD`, 0-based)
  anything else       a UTF-8 text file, one document (identity: the file's relative path); newlines are read
                      as Python's text mode reads them (\\r\\n -> \\n)

Empty (or whitespace-only) documents are skipped and counted. A JSONL line that is not JSON, or an ArrayRecord
record that is not UTF-8, is a bad line: reported with its file and line (or record) and skipped, up to
`max_bad_lines` for the whole build, then the build fails. A text file that is not UTF-8 is skipped and named (as
it always was). A JSONL object without the text field (or with a non-string one), a Parquet file without the
column and a file that cannot be opened at all fail at once, naming the file (and line).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Iterator

from diffgemma_jax.data.errors import DataError

RECORD_FORMATS = (".jsonl", ".jsonl.gz", ".parquet", ".array_record")
PARQUET_BATCH_ROWS = 1024


def file_format(path: str) -> str:
  """'jsonl', 'parquet', 'array_record' or 'text', from the file name."""
  name = path.lower()
  if name.endswith((".jsonl", ".jsonl.gz")):
    return "jsonl"
  if name.endswith(".parquet"):
    return "parquet"
  if name.endswith(".array_record"):
    return "array_record"
  return "text"


@dataclasses.dataclass
class ReadStats:
  """What a read skipped: counts, and the bad lines and non-UTF-8 files by name (for the report)."""
  documents: int = 0
  empty: int = 0
  bad_lines: list[str] = dataclasses.field(default_factory=list)
  non_utf8_files: list[str] = dataclasses.field(default_factory=list)

  def add(self, other: "ReadStats") -> None:
    self.documents += other.documents
    self.empty += other.empty
    self.bad_lines += other.bad_lines
    self.non_utf8_files += other.non_utf8_files


def read_documents(root: str, rel: str, *, text_field: str = "text", max_bad_lines: int = 10,
                   stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
  """(identity, text) of every non-empty document of `root/rel`, in file order. Skips are counted in `stats`;
  more than `max_bad_lines` bad lines in `stats` fail."""
  stats = stats if stats is not None else ReadStats()
  path = os.path.join(root, rel)
  kind = file_format(rel)
  if kind == "text":
    records = _text_file(path, rel, stats)
  elif kind == "jsonl":
    records = _jsonl(path, rel, text_field, stats)
  elif kind == "parquet":
    records = _parquet(path, rel, text_field)
  else:
    records = _array_record(path, rel, stats)
  for identity, text in records:
    check_bad_lines(stats, max_bad_lines)
    if text is None:
      continue
    if not text.strip():
      stats.empty += 1
      continue
    stats.documents += 1
    yield identity, text
  check_bad_lines(stats, max_bad_lines)


def check_bad_lines(stats: ReadStats, max_bad_lines: int) -> None:
  if len(stats.bad_lines) > max_bad_lines:
    raise DataError(f"{len(stats.bad_lines)} bad lines, more than data.max_bad_lines={max_bad_lines}: "
                    + "; ".join(stats.bad_lines[:3]) + (" ..." if len(stats.bad_lines) > 3 else ""))


def _text_file(path, rel, stats):
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError:
    stats.non_utf8_files.append(path)
    return
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror}") from None
  yield rel, text


def _jsonl(path, rel, text_field, stats):
  opener = gzip.open if path.lower().endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          stats.bad_lines.append(f"{path}:{number}: not JSON ({e.msg})")
          yield None, None
          continue
        if not isinstance(record, dict) or text_field not in record:
          got = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
          raise DataError(f"{path}:{number}: no {text_field!r} field (data.text_field); the record has {got}")
        text = record[text_field]
        if text is None:
          text = ""
        if not isinstance(text, str):
          raise DataError(f"{path}:{number}: field {text_field!r} (data.text_field) is a "
                          f"{type(text).__name__}, not a string")
        yield f"{rel}:{number}", text
  except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as e:
    raise DataError(f"cannot read {path}: {e}") from None


def _parquet(path, rel, text_field):
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"cannot read {path} as Parquet: {str(e).splitlines()[0][:200]}") from None
  names = parquet.schema_arrow.names
  if text_field not in names:
    raise DataError(f"{path}: no column {text_field!r} (data.text_field); its columns are {names[:20]}")
  column_type = parquet.schema_arrow.field(text_field).type
  if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
    raise DataError(f"{path}: column {text_field!r} (data.text_field) holds {column_type}, not strings")
  row = 0
  try:
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
      for text in batch.column(0).to_pylist():
        yield f"{rel}:{row}", text or ""
        row += 1
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: unreadable after row {row}: {str(e).splitlines()[0][:200]}") from None


def _array_record(path, rel, stats, chunk: int = 1024):
  from array_record.python.array_record_module import ArrayRecordReader
  if not os.path.isfile(path):
    raise DataError(f"cannot read {path}: no such file")
  try:
    reader = ArrayRecordReader(path)
    count = reader.num_records()
  except (RuntimeError, ValueError, OSError) as e:
    raise DataError(f"cannot read {path} as ArrayRecord: {str(e).splitlines()[0][:200]}") from None
  if count == 0 and os.path.getsize(path) > 0 and not reader.ok():
    raise DataError(f"cannot read {path} as ArrayRecord: not an ArrayRecord file")
  try:
    for start in range(0, count, chunk):
      try:
        records = reader.read(start, min(start + chunk, count))
      except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable at record {start}: {str(e).splitlines()[0][:200]}") from None
      for index, data in enumerate(records, start):
        try:
          yield f"{rel}:{index}", data.decode("utf-8")
        except UnicodeDecodeError:
          stats.bad_lines.append(f"{path}: record {index} is not UTF-8")
          yield None, None
  finally:
    reader.close()

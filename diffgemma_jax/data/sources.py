"""Pretraining documents from files, by extension; every record is one document.

  .jsonl, .jsonl.gz, .jsonl.zst, .json.gz, .json.zst
                      one JSON object per line, the text in `text_field` (identity `file:LINE`, 1-based); gzip or
                      Zstandard streams decompressed as read (The Pile and SlimPajama ship as .jsonl.zst, C4, Dolma
                      and RedPajama-V2 as .json.gz holding JSON lines; a plain .json file is one text document)
  .parquet            the `text_field` column, read one record batch at a time (identity `file:ROW`, 0-based)
  .array_record       UTF-8 text records (identity `file:RECORD`, 0-based)
  anything else       a UTF-8 text file, one document (identity: the file's relative path); newlines are read
                      as Python's text mode reads them (\\r\\n -> \\n)

Files may lie in a bucket (`gs://`, `s3://`; diffgemma_jax/storage.py): JSONL, Parquet and text files are read
as streams (an object is fetched in ranges as it is consumed, a span from its own offset); ArrayRecord's reader
reads local files only, so such a file is copied to the local temporary folder first.

A JSONL line ends at "\n" (JSON text holds no raw newline; "\r\n" is read as "\n" plus whitespace). A large
file is read as several spans (`file_spans`: byte ranges of whole lines, runs of Parquet row groups, ranges of
ArrayRecord records; found by reads in parts, `span_parts`, that the build spreads over its workers too), so the
build can spread one file over several workers; documents and their identities are
those of reading the file whole. A compressed JSONL file is one span (a gzip or Zstandard stream is read from its
start).

Empty (or whitespace-only) documents are skipped and counted. A JSONL line that is not JSON, or an ArrayRecord
record that is not UTF-8, is a bad line: reported with its file and line (or record) and skipped, up to
`max_bad_lines` for the whole build, then the build fails. A text file that is not UTF-8 is skipped and named (as
it always was). A JSONL object without the text field (or with a non-string one), a Parquet file without the
column and a file that cannot be opened at all fail at once, naming the file (and line).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from typing import Iterator

from diffgemma_jax import storage
from diffgemma_jax.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
RECORD_FORMATS = (*JSONL_SUFFIXES, ".parquet", ".array_record")
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}  # JSONL streams: read from their start, one span a file
PARQUET_BATCH_ROWS = 1024
_READ_BYTES = 8 << 20  # read at a time past a JSONL chunk whose line goes on
_ZSTD_BUFFER = 1 << 20  # decompressed bytes read at a time from a .jsonl.zst stream
_FIND_BYTES = 64 << 10  # the first read for a JSONL chunk's first line start when its lines are not counted


def file_format(path: str) -> str:
  """'jsonl', 'parquet', 'array_record' or 'text', from the file name."""
  name = path.lower()
  if name.endswith(JSONL_SUFFIXES):
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
  lines: int = 0  # JSONL lines gone through, blank and bad ones too (a span's count numbers the next span's lines)

  def add(self, other: "ReadStats") -> None:
    self.documents += other.documents
    self.empty += other.empty
    self.lines += other.lines
    self.bad_lines += other.bad_lines
    self.non_utf8_files += other.non_utf8_files


@dataclasses.dataclass(frozen=True)
class Span:
  """A part of a source file read on its own: records from `start` to `stop` (None: the file's end), counted in
  bytes of a JSONL file, row groups of a Parquet file or records of an ArrayRecord file; `first`: the number of
  its first record (JSONL line, Parquet row, ArrayRecord record), None for a JSONL span cut without counting the
  lines before it (`read_span_part(count_lines=False)`: data/build.py numbers them from the lines its scan goes
  through); `size`: its share of the file's bytes."""
  rel: str
  start: int = 0
  stop: int | None = None
  first: int | None = 0
  size: int = 0


def span_parts(rel: str, size: int, span_bytes: int) -> list[tuple[int, int]]:
  """What cutting `rel` (`size` bytes) into spans of about `span_bytes` reads, as parts read apart (`read_span_part`,
  in parallel by data/build.py): none where the file is one span; a JSONL file's chunks of `span_bytes` (each part
  one ranged read: of the chunk where its lines are counted, so the whole file is read once, spread over the parts,
  else of the line its start falls in); a Parquet or ArrayRecord file's metadata, one part."""
  if size <= span_bytes or file_format(rel) == "text" or _compression(rel):
    return []
  if file_format(rel) == "jsonl":
    return [(start, min(start + span_bytes, size)) for start in range(0, size, span_bytes)]
  return [(0, size)]


def read_span_part(root: str, rel: str, part: tuple[int, int], span_bytes: int, *, count_lines: bool = True) -> list:
  """What part `part` of `span_parts` found (JSON-safe): a JSONL chunk's (where its first line starts, the newlines
  before that in the chunk, the newlines in the chunk; with `count_lines=False` the line start alone, read from the
  chunk's start to the end of the line it falls in, the counts None); a Parquet or ArrayRecord file's spans."""
  path = storage.join(root, rel)
  try:
    if file_format(rel) == "jsonl":
      return list(_jsonl_chunk(path, *part)) if count_lines else [_line_start(path, part[0]), None, None]
    size = part[1]
    if file_format(rel) == "parquet":
      return [dataclasses.astuple(span) for span in _parquet_spans(path, rel, span_bytes, size)]
    return [dataclasses.astuple(span) for span in _array_record_spans(path, rel, span_bytes, size)]
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def spans_from_parts(rel: str, size: int, found: list) -> list[Span]:
  """`rel`'s spans from what each of its `span_parts` found (`read_span_part`, in their order), in file order."""
  if not found:
    return [Span(rel, size=size)]
  if file_format(rel) != "jsonl":
    return [Span(*span) for span in found[0]]
  starts, newlines = {}, 0  # {line start: its line's number (None: not counted)}; newlines before the current chunk
  for line_start, before, count in found:
    if line_start < size:  # (a line longer than a chunk: the next one's again)
      starts.setdefault(line_start, 1 if line_start == 0 else None if count is None else 1 + newlines + before)
    newlines += count or 0
  cuts = sorted(starts)
  return [Span(rel, cut, stop, starts[cut], (stop or size) - cut)
          for cut, stop in zip(cuts, cuts[1:] + [None])]


def file_spans(root: str, rel: str, span_bytes: int) -> list[Span]:
  """`root/rel` as spans of about `span_bytes` each, in file order (one span: the whole file), its parts read one
  after the other."""
  size = storage.file_size(storage.join(root, rel)) or 0
  return spans_from_parts(rel, size, [read_span_part(root, rel, part, span_bytes)
                                      for part in span_parts(rel, size, span_bytes)])


def _jsonl_chunk(path, start: int, stop: int) -> tuple[int, int, int]:
  """The bytes [start, stop) of a JSONL file (one ranged read, the byte before them included): (the first line start
  at or after `start`, or the file's end; the newlines in [start, that line start), 0 or 1; the newlines in [start,
  stop)). A chunk with no newline (a line longer than it) reads on until one, or the file's end."""
  if start == 0:
    return 0, 0, storage.read_range(path, 0, stop).count(b"\n")
  data = storage.read_range(path, start - 1, stop)
  count = data.count(b"\n", 1)
  if data[:1] == b"\n":  # a line starts at `start`
    return start, 0, count
  end = data.find(b"\n", 1)
  position = stop
  while end < 0:  # a line longer than the chunk: its end is further on
    data = storage.read_range(path, position, position + _READ_BYTES)
    if not data:
      return position, 0, count  # the file ends in this line: no line starts in this chunk or after it
    end = data.find(b"\n")
    if end >= 0:
      return position + end + 1, 1, count
    position += len(data)
  return start + end, 1, count


def _line_start(path, start: int) -> int:
  """The first line start at or after `start` of a JSONL file, or the file's end: read from `start - 1` to the end
  of the line it falls in (a first read of _FIND_BYTES, then larger ones), not the whole chunk."""
  if start == 0:
    return 0
  position, want = start - 1, _FIND_BYTES
  while True:
    data = storage.read_range(path, position, position + want)
    if not data:
      return position
    end = data.find(b"\n")
    if end >= 0:
      return position + end + 1
    position, want = position + len(data), min(4 * want, _READ_BYTES)


def _parquet_spans(path, rel, span_bytes, size):
  """Runs of whole row groups; `first`: the first row's number (0-based)."""
  with _open_parquet(path) as parquet:
    metadata = parquet.metadata
  spans, start, first, rows, group_bytes = [], 0, 0, 0, 0
  total = sum(metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)) or 1
  for group in range(metadata.num_row_groups):
    rows += metadata.row_group(group).num_rows
    group_bytes += metadata.row_group(group).total_byte_size
    if group_bytes * size >= span_bytes * total or group == metadata.num_row_groups - 1:
      spans.append(Span(rel, start, group + 1, first, group_bytes * size // total))
      start, first, rows, group_bytes = group + 1, first + rows, 0, 0
  return spans or [Span(rel, size=size)]


def _array_record_spans(path, rel, span_bytes, size):
  """Equal ranges of records (record sizes are not known before reading them)."""
  reader = _open_array_record(path)
  count = reader.num_records()
  reader.close()
  parts = min(max(count, 1), -(-size // span_bytes))
  bounds = [count * k // parts for k in range(parts + 1)]
  return [Span(rel, a, b, a, size * (b - a) // max(count, 1)) for a, b in zip(bounds[:-1], bounds[1:])]


def read_documents(root: str, rel: str, *, text_field: str = "text", max_bad_lines: int = 10,
                   stats: ReadStats | None = None, span: Span | None = None) -> Iterator[tuple[str, str]]:
  """(identity, text) of every non-empty document of `root/rel` (or of one `span` of it), in file order. Skips
  are counted in `stats`; more than `max_bad_lines` bad lines in `stats` fail."""
  stats = stats if stats is not None else ReadStats()
  span = span or Span(rel)
  path = storage.join(root, rel)
  kind = file_format(rel)
  if kind == "text":
    records = _text_file(path, rel, stats)
  elif kind == "jsonl":
    records = _jsonl(path, rel, text_field, stats, span)
  elif kind == "parquet":
    records = _parquet(path, rel, text_field, span)
  else:
    records = _array_record(path, rel, stats, span)
  for identity, text in records:
    check_bad_lines(stats, max_bad_lines)
    if text is None:
      continue
    if not text or text.isspace():  # not strip(): that copies every document
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
    with io.TextIOWrapper(storage.open_binary(path), encoding="utf-8") as f:  # text mode's newlines
      text = f.read()
  except UnicodeDecodeError:
    stats.non_utf8_files.append(path)
    return
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from None
  yield rel, text


def _compression(path: str) -> str | None:
  """A compressed JSONL file's codec (gzip, zstd), from its name; None for a plain one."""
  return next((codec for suffix, codec in COMPRESSED.items() if path.lower().endswith(suffix)), None)


def _jsonl_file(path, span):
  """The JSONL file of `span`, positioned at the span's start: a compressed file streamed (one span, read in
  order), a local file seeked there, or an uncompressed object's span as bytes (whole lines: data/build.py plans
  spans at line ends) fetched in one ranged request for exactly them; a buffered object file fetched its client's
  block (s3fs: 50 MB) for each span of 1-16 MB, several times the corpus over a build."""
  codec = _compression(path)
  if codec == "gzip":
    return gzip.open(storage.open_binary(path))
  if codec == "zstd":  # pyarrow's Zstandard stream (frames of any size, one after another, as zstd -T writes them)
    import pyarrow as pa
    stream = pa.CompressedInputStream(pa.PythonFile(storage.open_binary(path), mode="r"), "zstd")
    return io.BufferedReader(stream, _ZSTD_BUFFER)
  if storage.is_url(path):
    return io.BytesIO(storage.read_range(path, span.start, span.stop))
  f = open(path, "rb")
  f.seek(span.start)
  return f


def _jsonl(path, rel, text_field, stats, span):
  # A span whose first line's number is not known (Span.first None) numbers its lines from 1 (the build makes its
  # documents' identities global once every span's lines are counted) and names a line by its byte offset
  numbered = span.first is not None
  number = (span.first or 1) if numbered else 1

  def where(line: int, at: int) -> str:
    return f"{path}:{line}" if numbered else f"{path} (the line at byte {at})"

  try:
    with _jsonl_file(path, span) as f:
      position = span.start
      for number, raw in enumerate(f, number):
        if span.stop is not None and position >= span.stop:
          break
        at = position
        position += len(raw)
        stats.lines += 1
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          name = f"line {number}" if numbered else f"the line at byte {at}"
          raise DataError(f"cannot read {path}: {name} is not UTF-8 ({e.reason} at byte {e.start})") from None
        if not line or line.isspace():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          stats.bad_lines.append(f"{where(number, at)}: not JSON ({e.msg})")
          yield None, None
          continue
        if not isinstance(record, dict) or text_field not in record:
          got = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
          raise DataError(f"{where(number, at)}: no {text_field!r} field (data.text_field); the record has {got}")
        text = record[text_field]
        if text is None:
          text = ""
        if not isinstance(text, str):
          raise DataError(f"{where(number, at)}: field {text_field!r} (data.text_field) holds "
                          f"{json.dumps(text)[:40]} ({type(text).__name__}), not a string")
        yield f"{rel}:{number}", text
  except (EOFError, gzip.BadGzipFile, OSError) as e:
    raise DataError(f"cannot read {path}: {e}") from None


def _open_parquet(path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(storage.open_binary(path, exact_reads=True) if storage.is_url(path) else path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"cannot read {path} as Parquet: {str(e).splitlines()[0][:200]}") from None


def _parquet(path, rel, text_field, span):
  import pyarrow as pa
  parquet = _open_parquet(path)
  names = parquet.schema_arrow.names
  if text_field not in names:
    raise DataError(f"{path}: no column {text_field!r} (data.text_field); its columns are {names[:20]}")
  column_type = parquet.schema_arrow.field(text_field).type
  if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
    raise DataError(f"{path}: column {text_field!r} (data.text_field) holds {column_type}, not strings")
  groups = range(span.start, parquet.metadata.num_row_groups if span.stop is None else span.stop)
  row = span.first
  try:
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field], row_groups=list(groups)):
      for text in batch.column(0).to_pylist():
        yield f"{rel}:{row}", text or ""
        row += 1
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: unreadable after row {row}: {str(e).splitlines()[0][:200]}") from None


def _open_array_record(path):
  from array_record.python.array_record_module import ArrayRecordReader
  size = storage.file_size(path)
  if size is None:
    raise DataError(f"cannot read {path}: no such file")
  try:
    reader = ArrayRecordReader(storage.local_file(path))
    count = reader.num_records()
  except (RuntimeError, ValueError, OSError) as e:
    raise DataError(f"cannot read {path} as ArrayRecord: {str(e).splitlines()[0][:200]}") from None
  if count == 0 and size > 0 and not reader.ok():
    raise DataError(f"cannot read {path} as ArrayRecord: not an ArrayRecord file")
  return reader


def _array_record(path, rel, stats, span, chunk: int = 1024):
  reader = _open_array_record(path)
  stop = reader.num_records() if span.stop is None else span.stop
  try:
    for start in range(span.start, stop, chunk):
      try:
        records = reader.read(start, min(start + chunk, stop))
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

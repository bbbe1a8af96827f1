"""Pretraining sources by extension: JSONL (plain and gzip), Parquet and ArrayRecord round-trip documents exactly
(non-ASCII text; empty records skipped and counted), through the reader and through a built token store; bad
input names its file (and line)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_recipes import build_dataset
from diffgemma_jax.data import Tokenizer, sources, train_tokenizer
from diffgemma_jax.data.build import number_spans
from diffgemma_jax.data.sources import ReadStats, file_spans, read_documents
from diffgemma_jax.errors import DataError

TEXTS = ["def f(x):\n    return x  # caf\u00e9\n", "\u4e2d\u6587 \U0001F600 na\u00efve\n\ttabbed", "  leading spaces",
         "plain ascii line\nsecond line\n", "\u00bfqu\u00e9? \u00a1s\u00ed!"]


def _write_corpus(root):
  root.mkdir(parents=True, exist_ok=True)
  with open(root / "a.jsonl", "w", encoding="utf-8") as f:
    for text in TEXTS[:3]:
      f.write(json.dumps({"text": text, "id": 1}, ensure_ascii=False) + "\n")
    f.write(json.dumps({"text": ""}) + "\n\n")  # an empty record, then a blank line (not a record)
    f.write("{broken json\n")
  with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write(json.dumps({"text": TEXTS[3]}) + "\n" + json.dumps({"text": "   "}) + "\n")
  pq.write_table(pa.table({"text": [TEXTS[4], None, "", TEXTS[0] + "!"], "n": [1, 2, 3, 4]}), root / "c.parquet",
                 row_group_size=2)
  writer = ArrayRecordWriter(str(root / "d.array_record"), "group_size:1")
  for data in (TEXTS[1].encode() + b"?", b"", b"\xff\xfe not utf-8", TEXTS[2].encode() + b"!"):
    writer.write(data)
  writer.close()
  (root / "e.txt").write_text(TEXTS[3] + "?", encoding="utf-8")
  expected = TEXTS[:3] + [TEXTS[3], TEXTS[4], TEXTS[0] + "!", TEXTS[1] + "?", TEXTS[2] + "!", TEXTS[3] + "?"]
  return expected, {"empty": 5, "bad": 2}  # empty: jsonl "", gz "   ", parquet None and "", array_record b""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("tok") / "tokenizer")
  return train_tokenizer(TEXTS * 20, prefix, 300).path


def test_every_format_reads_its_documents_exactly(tmp_path):
  expected, skipped = _write_corpus(tmp_path)
  stats, got = ReadStats(), []
  for name in sorted(os.listdir(tmp_path)):
    got += list(read_documents(str(tmp_path), name, max_bad_lines=5, stats=stats))
  assert [text for _, text in got] == expected
  assert [identity for identity, _ in got][:3] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]
  assert "c.parquet:3" in dict(got) and "d.array_record:3" in dict(got) and "e.txt" in dict(got)
  assert (stats.documents, stats.empty, len(stats.bad_lines)) == (len(expected), skipped["empty"], skipped["bad"])
  assert any("a.jsonl:6: not JSON" in line for line in stats.bad_lines)
  assert any("d.array_record: record 2 is not UTF-8" in line for line in stats.bad_lines)


def test_spans_of_a_file_read_as_the_whole_file(tmp_path, monkeypatch):
  """A file cut into spans (JSONL line ranges, Parquet row groups, ArrayRecord record ranges) gives the documents,
  identities and skips of reading it whole; JSONL spans start at line starts, whatever the read chunk."""
  _write_corpus(tmp_path)
  with open(tmp_path / "f.jsonl", "wb") as f:  # CRLF line ends, a blank line, lines longer than a span
    for i in range(40):
      f.write(json.dumps({"text": TEXTS[i % 5] * (1 + i % 7)}).encode() + (b"\r\n\r\n" if i == 9 else b"\r\n"))
  lines = [json.dumps({"text": TEXTS[i % 5] * (1 + 3 * i)}) for i in range(6)]
  (tmp_path / "g.jsonl").write_text("\n".join(lines))  # no newline at its end, its last line over many chunks
  monkeypatch.setattr(sources, "_READ_BYTES", 7)  # line ends found past a chunk, several reads on
  for name in ("a.jsonl", "c.parquet", "d.array_record", "f.jsonl", "g.jsonl"):
    whole_stats, span_stats = ReadStats(), ReadStats()
    whole = list(read_documents(str(tmp_path), name, max_bad_lines=50, stats=whole_stats))
    spans = file_spans(str(tmp_path), name, 16)
    assert len(spans) > 1, name
    got = [doc for span in spans
           for doc in read_documents(str(tmp_path), name, max_bad_lines=50, stats=span_stats, span=span)]
    assert got == whole and dataclasses.asdict(span_stats) == dataclasses.asdict(whole_stats), name
  data = (tmp_path / "f.jsonl").read_bytes()
  spans = file_spans(str(tmp_path), "f.jsonl", 100)
  assert [s.start for s in spans[1:]] == [s.stop for s in spans[:-1]] and spans[-1].stop in (None, len(data))
  assert all(data[s.start - 1:s.start] == b"\n" for s in spans[1:]) and sum(s.size for s in spans) == len(data)
  assert [s.first for s in spans] == [1 + data[:s.start].count(b"\n") for s in spans]
  assert file_spans(str(tmp_path), "b.jsonl.gz", 16) == [sources.Span("b.jsonl.gz", size=os.path.getsize(
      tmp_path / "b.jsonl.gz"))]
  # Cut without counting (a build given its tokenizer): the same spans, each read from a line of its start alone;
  # numbered from the lines each span's read goes through (data/build.py's scan), the same first line numbers
  monkeypatch.setattr(sources, "_FIND_BYTES", 5)
  for name in ("f.jsonl", "g.jsonl"):
    size = os.path.getsize(tmp_path / name)
    counted = file_spans(str(tmp_path), name, 16)
    cut = sources.spans_from_parts(name, size, [
        sources.read_span_part(str(tmp_path), name, part, 16, count_lines=False)
        for part in sources.span_parts(name, size, 16)])
    assert cut == [dataclasses.replace(span, first=None if k else 1) for k, span in enumerate(counted)], name
    lines = []
    for span in cut:
      stats = ReadStats()
      documents = sum(1 for _ in read_documents(str(tmp_path), name, max_bad_lines=50, stats=stats, span=span))
      lines.append((stats.lines, documents))
    assert number_spans([tuple(cut)], [lines]) == [[span.first for span in counted]], name


def test_compressed_jsonl_files_read_as_the_plain_one(tmp_path):
  """A .jsonl.zst file (The Pile's and SlimPajama's format; here two frames one after the other, as a parallel
  compressor writes them) and a .json.gz file (C4's, Dolma's: JSON lines in spite of the name) give the plain
  file's documents, identities and skips and are one span; a Zstandard file fails naming it when its stream is cut
  short or is not Zstandard."""
  _write_corpus(tmp_path)
  data = (tmp_path / "a.jsonl").read_bytes()
  cut = data.index(b"\n", len(data) // 2) + 1
  (tmp_path / "z.jsonl.zst").write_bytes(b"".join(pa.compress(part, "zstd", asbytes=True)
                                                  for part in (data[:cut], data[cut:])))
  (tmp_path / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(data))
  plain = ReadStats()
  want = list(read_documents(str(tmp_path), "a.jsonl", stats=plain))
  assert len(want) == 3 and plain.bad_lines
  for name in ("z.jsonl.zst", "c4-train.00000-of-01024.json.gz"):
    packed = ReadStats()
    got = list(read_documents(str(tmp_path), name, stats=packed))
    assert [(identity.replace(name, "a.jsonl"), text) for identity, text in got] == want, name
    assert [line.replace(name, "a.jsonl") for line in packed.bad_lines] == plain.bad_lines, name
    assert (packed.documents, packed.empty, packed.lines) == (plain.documents, plain.empty, plain.lines), name
    assert file_spans(str(tmp_path), name, 8) == [sources.Span(name, size=os.path.getsize(tmp_path / name))]
  for name, blob in (("cut.jsonl.zst", (tmp_path / "z.jsonl.zst").read_bytes()[:-9]), ("not.jsonl.zst", data)):
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match=f"cannot read {tmp_path / name}: "):
      list(read_documents(str(tmp_path), name))


def test_a_built_store_holds_every_document(tmp_path, tokenizer, capsys):
  expected, skipped = _write_corpus(tmp_path / "src")
  manifest = build_dataset("text_files", str(tmp_path / "ds"), None, source=str(tmp_path / "src"),
                           tokenizer=tokenizer, build_workers=1)
  assert manifest["skipped_empty"] == skipped["empty"] and manifest["skipped_bad_lines"] == skipped["bad"]
  assert "a.jsonl:6: not JSON" in capsys.readouterr().err
  tok = Tokenizer(tokenizer)
  texts = []
  for split in ("train", "heldout"):
    for shard in manifest["store"]["splits"][split]["shards"]:
      tokens = np.fromfile(tmp_path / "ds" / (shard["name"] + ".tokens"), manifest["store"]["dtype"])
      starts = np.fromfile(tmp_path / "ds" / (shard["name"] + ".starts"), "<i8")
      texts += [tok.decode(doc) for doc in np.split(tokens, starts[1:])]
  assert sorted(texts) == sorted(expected)
  with pytest.raises(DataError, match="more than data.max_bad_lines=1"):
    build_dataset("text_files", str(tmp_path / "strict"), None, source=str(tmp_path / "src"), tokenizer=tokenizer,
                  max_bad_lines=1)
  assert not os.path.exists(tmp_path / "strict") and not os.path.exists(tmp_path / "strict.partial")


def test_sources_are_globs_folders_and_comma_lists(tmp_path):
  from data_recipes.text_files import source_files
  _write_corpus(tmp_path / "x")
  _write_corpus(tmp_path / "y")
  both = source_files(f"{tmp_path / 'x'}, {tmp_path / 'y' / '*.jsonl*'}")
  assert [os.path.relpath(p, tmp_path) for p in both] == [
      "x/a.jsonl", "x/b.jsonl.gz", "x/c.parquet", "x/d.array_record", "x/e.txt", "y/a.jsonl", "y/b.jsonl.gz"]
  with pytest.raises(DataError, match="data.source .*nope.* does not exist"):
    source_files(f"{tmp_path / 'x'},{tmp_path / 'nope'}")


def test_the_text_field_option_and_bad_records_name_the_file(tmp_path):
  path = tmp_path / "f.jsonl"
  path.write_text(json.dumps({"content": "hello"}) + "\n" + json.dumps({"text": "x"}) + "\n")
  assert next(read_documents(str(tmp_path), "f.jsonl", text_field="content", stats=ReadStats()))[1] == "hello"
  with pytest.raises(DataError, match=rf"{path}:2: no 'content' field \(data.text_field\)"):
    list(read_documents(str(tmp_path), "f.jsonl", text_field="content"))
  path.write_text(json.dumps({"text": 3}) + "\n")
  with pytest.raises(DataError, match=rf"{path}:1: field 'text' \(data.text_field\) holds 3 \(int\), not a string"):
    list(read_documents(str(tmp_path), "f.jsonl"))
  pq.write_table(pa.table({"body": ["a"]}), tmp_path / "g.parquet")
  with pytest.raises(DataError, match=rf"{tmp_path / 'g.parquet'}: no column 'text' \(data.text_field\); its "
                                      r"columns are \['body'\]"):
    list(read_documents(str(tmp_path), "g.parquet"))
  (tmp_path / "h.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(DataError, match=f"cannot read {tmp_path / 'h.parquet'} as Parquet"):
    list(read_documents(str(tmp_path), "h.parquet"))
  with gzip.open(tmp_path / "i.jsonl.gz", "wb") as f:
    f.write(b'{"text": "ok"}\n' * 100)
  (tmp_path / "i.jsonl.gz").write_bytes((tmp_path / "i.jsonl.gz").read_bytes()[:-12])
  with pytest.raises(DataError, match=f"cannot read {tmp_path / 'i.jsonl.gz'}"):
    list(read_documents(str(tmp_path), "i.jsonl.gz"))


def test_a_sample_too_small_for_the_vocabulary_names_the_sample_option(tmp_path):
  with pytest.raises(DataError, match=r"Vocabulary size too high.*more than 150 lines \(data.tokenizer_sample_lines\)"):
    train_tokenizer(TEXTS * 40, str(tmp_path / "tok"), 2000, max_sentences=150)

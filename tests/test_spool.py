"""A generation job's prompts and their ids spooled to disk (diffgemma_jax/sampling/spool.py, launch/generate.py):
what memory holds per prompt, that every record reads back, and that the batching reads the spooled ids as it read
lists. No model: cheap."""

from __future__ import annotations

import argparse
import os
import tracemalloc

import numpy as np
import pytest

from diffgemma_jax.sampling import spool


def test_records_read_back_alone_and_in_order_across_read_ahead_blocks(monkeypatch, tmp_path):
  """Records of 0 bytes to over a read-ahead block read back the same by index (negative too) and iterated in
  order (a block at a time); an index past the end is an IndexError, not a read of another record."""
  monkeypatch.setattr(spool, "_READ_AHEAD", 64)
  rng = np.random.default_rng(0)
  data = [bytes(rng.integers(0, 256, size, dtype=np.uint8)) for size in (0, 5, 64, 0, 1, 200, 63, 64, 65, 3)]
  records = spool.Records(str(tmp_path))
  for record in data:
    records.append(record)
  assert list(records) == data and [records[i] for i in range(len(data))] == data
  assert records[-1] == data[-1] and records[np.int64(5)] == data[5] and len(records) == len(data)
  assert records.lengths().tolist() == [len(d) for d in data]
  with pytest.raises(IndexError):
    records[len(data)]
  assert os.listdir(tmp_path) == []  # the spool file has no name
  texts = spool.Texts(str(tmp_path))
  for text in ("caf\u00e9", "", "a\nb"):
    texts.append(text)
  assert list(texts) == ["caf\u00e9", "", "a\nb"] and texts[0] == "caf\u00e9"


def test_token_rows_and_a_view_give_rows_and_lengths_without_reading_them(tmp_path):
  rows = spool.TokenRows(str(tmp_path))
  given = [[2, 70000, 3], [2], [2, 5, 6, 7, 262143]]
  for ids in given:
    rows.append(ids)
  assert list(rows) == given and rows.row(2).dtype == np.int32 and rows.lengths().tolist() == [3, 1, 5]
  view = spool.Take(rows, np.asarray([2, 0]))
  assert list(view) == [given[2], given[0]] and view.lengths().tolist() == [5, 3]
  assert spool.lengths([[1], [1, 2, 3]]).tolist() == [1, 3]


def test_a_full_disk_is_an_os_error_naming_the_spool_folder(monkeypatch, tmp_path):
  records = spool.Records(str(tmp_path), "prompt spool")
  monkeypatch.setattr(os, "pwrite", lambda fd, data, at: len(data) - 1)
  with pytest.raises(OSError, match=f"the prompt spool file in {tmp_path} could not take 3 more bytes: is the disk "
                     "full"):
    records.append(b"abc")


def test_a_prompts_file_is_held_on_disk_a_few_bytes_a_prompt(tmp_path):
  """`_read_requests` of 3,000 prompts of 400 characters allocates under 48 bytes a prompt (their text, a string
  naming each one's line and its gen_length in lists took about 650), and reads back every prompt, its own
  gen_length and its line; the ids spooled per prompt take under 16 bytes each (an int32 array and the list of
  ints the batches were cut from took about 12 kB)."""
  from launch.generate import _read_requests
  path = tmp_path / "p.jsonl"
  with open(path, "w") as f:
    for i in range(3000):
      f.write(f'{{"prompt": "{i:04d}{"x" * 396}"' + (', "gen_length": 8}\n' if i % 3 == 0 else "}\n"))
      if i == 7:
        f.write("\n")  # a blank line: skipped, the next request names its own line
  tracemalloc.start()
  try:
    prompts, gen_lengths, sources = _read_requests(argparse.Namespace(prompt=None, prompts=str(path)))
    held = tracemalloc.get_traced_memory()[0]
    rows = spool.TokenRows(str(tmp_path))
    before = tracemalloc.get_traced_memory()[0]
    for i in range(3000):
      rows.append(np.arange(100, 400, dtype=np.int32))
    ids_held = tracemalloc.get_traced_memory()[0] - before
  finally:
    tracemalloc.stop()
  assert held < 3000 * 48, held
  assert ids_held < 3000 * 16, ids_held
  assert len(prompts) == len(gen_lengths) == len(sources) == 3000
  assert prompts[1234] == "1234" + "x" * 396 and list(prompts)[2999] == "2999" + "x" * 396
  assert (gen_lengths[0], gen_lengths[1], gen_lengths[2997]) == (8, None, 8)
  assert (sources[7], sources[8]) == (f"--prompts {path}:8", f"--prompts {path}:10")
  # --chat: each prompt wrapped as it is read back, a ChatText that still knows where its content lies
  from diffgemma_jax.data.sft.templates import chat_prompt
  wrap = lambda text: chat_prompt(text, "gemma")  # noqa: E731
  chats = _read_requests(argparse.Namespace(prompt=None, prompts=str(path)), wrap)[0]
  assert chats[5] == wrap(prompts[5]) and chats[5].content_spans == wrap(prompts[5]).content_spans


def test_static_batches_read_spooled_ids_as_they_read_lists(monkeypatch, tmp_path):
  """`run_batches` over a spooled view batches the prompts as over lists (sorted by length, stable), reading each
  batch's rows only."""
  from diffgemma_jax.sampling.requests import Generator
  from diffgemma_jax.sampling.samplers import GenerationOptions
  given = [[2] * n for n in (5, 3, 5, 1, 3, 4, 2)]
  rows = spool.TokenRows(str(tmp_path))
  for ids in given:
    rows.append(ids)
  generator = object.__new__(Generator)
  seen = []
  monkeypatch.setattr(generator, "run", lambda batch, options, seeds, seen=seen: seen.append((batch, seeds)) or [
      {"n": len(p)} for p in batch], raising=False)
  options = GenerationOptions(seed=4)
  listed = generator.run_batches(given, options, 3)
  from_lists, seen[:] = list(seen), []
  spooled = generator.run_batches(spool.Take(rows, range(len(given))), options, 3)
  assert seen == from_lists and spooled == listed and [r["n"] for r in listed] == [5, 3, 5, 1, 3, 4, 2]
  assert [len(p) for batch, _ in seen for p in batch] == sorted(map(len, given))


def test_a_records_file_to_score_is_held_on_disk(tmp_path):
  """`scoring.read_pairs` of 3,000 records spools them (under 40 bytes a record in memory; as Pair objects with a
  string naming each one's line they took about 1.1 kB); each reads back as the same Pair, blank lines skipped."""
  import json

  from diffgemma_jax.scoring import Pair, read_pairs
  path = tmp_path / "pairs.jsonl"
  with open(path, "w") as f:
    for i in range(3000):
      f.write(json.dumps({"prompt": f"{i} caf\u00e9 " + "p" * 300, "continuation": f" {i}" + "c" * 200}) + "\n")
      if i == 0:
        f.write("\n")
  tracemalloc.start()
  try:
    pairs = read_pairs(str(path))
    held = tracemalloc.get_traced_memory()[0]
  finally:
    tracemalloc.stop()
  assert held < 3000 * 40, held
  assert len(pairs) == 3000 and pairs[0] == Pair("0 caf\u00e9 " + "p" * 300, " 0" + "c" * 200, f"{path}:1")
  assert pairs[2999] == Pair("2999 caf\u00e9 " + "p" * 300, " 2999" + "c" * 200, f"{path}:3001")


def test_a_job_spools_beside_its_local_results_file(tmp_path):
  """The disk chosen for a job's results file takes its spools too (the temporary folder may be a small tmpfs);
  a bucket's results file, or none, spools in the temporary folder."""
  from diffgemma_jax.sampling.results_file import spool_folder
  assert spool_folder(str(tmp_path / "out.jsonl")) == str(tmp_path)
  assert spool_folder("s3://bucket/out.jsonl") is None and spool_folder(None) is None
  assert spool_folder(str(tmp_path / "missing" / "out.jsonl")) is None

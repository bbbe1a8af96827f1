"""The token store against the in-memory pipeline it replaced: same rows and batches for the same tokenizer and
documents, for any task, worker and process layout; the streamed split; the uniform tokenizer sample; resume."""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import threading

import grain
import numpy as np
import pytest

from data_recipes import build_dataset
from data_recipes.common import split_by_hash
from diffgemma_jax.data import Tokenizer, make_eval_batches, make_train_iterator, unigram_ppl
from diffgemma_jax.data import build as build_module
from diffgemma_jax.data import sources
from diffgemma_jax.data.split import heldout_threshold, key_digest, write_digest_table
from diffgemma_jax.data.store import ShardWriter, SplitStore, open_split
from diffgemma_jax.errors import DataError

MODULES = ("textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "string.py", "colorsys.py",
           "keyword.py", "queue.py", "sched.py", "calendar.py", "copy.py", "numbers.py")
SEQ_LEN = 32


# The pipeline before the token store, kept as the reference: tokenise every document of a split in memory,
# concatenate, and cut rows with numpy over the whole stream.
def reference_pack_rows(tokens, starts, seq_len, *, keep_partial):
  n_full = len(tokens) // seq_len
  n_rows = n_full + (1 if keep_partial and len(tokens) % seq_len else 0)
  total = n_rows * seq_len
  padded = np.zeros((total,), np.int32)
  used = min(total, len(tokens))
  padded[:used] = tokens[:used]
  is_start = np.zeros((total,), bool)
  is_start[starts[starts < total]] = True
  is_start[::seq_len] = True
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


def reference_rows(texts, tokenizer, seq_len, *, keep_partial):
  docs = [np.asarray([tokenizer.bos_id] + ids + [tokenizer.eos_id], np.int32) for ids in tokenizer.encode(texts)]
  tokens = np.concatenate(docs)
  starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]])
  return reference_pack_rows(tokens, starts, seq_len, keep_partial=keep_partial)


def reference_batches(rows, *, batch_size, seed, steps):
  ids = grain.MapDataset.range(len(rows["tokens"])).shuffle(seed=seed).repeat(None).batch(batch_size)
  return [{k: v[ids[step]] for k, v in rows.items()} for step in range(steps)]


def _corpus(directory):
  root = sysconfig.get_paths()["stdlib"]
  directory.mkdir(parents=True, exist_ok=True)
  for name in MODULES:
    shutil.copy(os.path.join(root, name), directory / name)
  (directory / "mask.txt").write_text("x = '<mask>' + \u00e9t\u00e9 \u4e2d\n", encoding="utf-8")
  (directory / "empty.txt").write_text("  \n", encoding="utf-8")
  return directory


def _texts(directory):
  """Today's documents and split of a folder of text files: (relative path, text), split as split_by_hash."""
  docs = []
  for name in sorted(os.listdir(directory)):
    text = (directory / name).read_text(encoding="utf-8")
    if text.strip():
      docs.append((name, text))
  return split_by_hash(docs, 0.04)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A corpus built in small tasks (several shards per split, rows across shard boundaries)."""
  src = _corpus(tmp_path_factory.mktemp("src") / "corpus")
  out = str(tmp_path_factory.mktemp("store") / "ds")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(build_module, "TASK_BYTES", 40_000)
    manifest = build_dataset("text_files", out, 400, source=str(src), build_workers=1)
  return out, manifest, src


def _assert_rows_equal(got, want):
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_rows_and_batches_equal_the_in_memory_pipeline(store):
  out, manifest, src = store
  assert len(manifest["store"]["splits"]["train"]["shards"]) > 3 and manifest["skipped_empty"] == 1
  tok = Tokenizer(os.path.join(out, "tokenizer.model"))
  splits = _texts(src)
  for split, keep_partial in (("train", False), ("heldout", True)):
    want = reference_rows([t for _, t in splits[split]], tok, SEQ_LEN, keep_partial=keep_partial)
    store_split = SplitStore(out, split, manifest["store"]["splits"][split]["shards"], manifest["store"]["dtype"])
    assert store_split.num_rows(SEQ_LEN, keep_partial) == len(want["tokens"])
    _assert_rows_equal(store_split.rows(range(len(want["tokens"])), SEQ_LEN), want)
  want = reference_rows([t for _, t in splits["train"]], tok, SEQ_LEN, keep_partial=False)
  it = make_train_iterator(out, seq_len=SEQ_LEN, batch_size=8, seed=5)
  for expected in reference_batches(want, batch_size=8, seed=5, steps=12):  # past one epoch
    _assert_rows_equal(next(it), expected)
  held = reference_rows([t for _, t in splits["heldout"]], tok, SEQ_LEN, keep_partial=True)
  batches = make_eval_batches(out, seq_len=SEQ_LEN, batch_size=8)
  assert len(batches) == -(-len(held["tokens"]) // 8)
  _assert_rows_equal({k: np.concatenate([b[k] for b in batches])[:len(held["tokens"])] for k in held}, held)
  # the unigram baseline from the build's counts equals the one fitted on every token
  train_tokens = want["tokens"].reshape(-1)
  heldout_tokens = held["tokens"][held["segment_ids"] > 0]
  extra = reference_rows([t for _, t in splits["train"]], tok, 1, keep_partial=True)["tokens"].reshape(-1)
  assert len(extra) >= len(train_tokens)
  counts = np.bincount(extra, minlength=tok.vocab_size) + 1.0
  expected = np.exp(-np.mean(np.log(counts / counts.sum())[heldout_tokens]))
  np.testing.assert_allclose(unigram_ppl(out), expected, rtol=1e-12)


def test_streamed_split_is_split_by_hash():
  rng = np.random.default_rng(0)
  items = [(f"pkg{i % 37}/mod{i}.py", "x" * int(rng.integers(1, 20_000))) for i in range(600)]
  for key, fraction in ((lambda s: s, 0.04), (lambda s: s.split("/")[0], 0.1)):
    want = split_by_hash(items, fraction, key=key)
    held = {s for s, _ in want["heldout"]}
    path = "/tmp/_digests_unused"

    def threshold_for(table_items):
      write_digest_table(path, [key_digest(key(s)) for s, _ in table_items], [len(t) for _, t in table_items])
      try:
        return heldout_threshold([path], fraction)[0]
      finally:
        os.remove(path)

    threshold = threshold_for(items)
    assert {s for s, _ in items if key_digest(key(s)) <= threshold} == held
    assert threshold_for(items[::-1]) == threshold  # order does not matter


def _build(tmp_path, name, src, tokenizer, vocab_size=None, **options):
  return build_dataset("text_files", str(tmp_path / name), vocab_size, source=str(src), tokenizer=tokenizer,
                       **options)


def _build_by_two_processes(tmp_path, name, src, tokenizer, **options) -> dict[int, dict]:
  """`_build` as processes 0 and 1 of one build (threads meeting at a barrier), into `name.format(process)`: each
  one's manifest; none may fail."""
  barrier, results, errors = threading.Barrier(2), {}, []

  def process(index):
    try:
      results[index] = _build(tmp_path, name.format(index), src, tokenizer, build_workers=1, process_index=index,
                              process_count=2, barrier=lambda _: barrier.wait(timeout=60), **options)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  return results


def test_worker_and_process_count_do_not_change_the_dataset(store, tmp_path, monkeypatch):
  out, manifest, src = store
  tok = os.path.join(out, "tokenizer.model")
  monkeypatch.setattr(build_module, "TASK_BYTES", 40_000)
  decided = []  # (threshold, held-out bytes, total bytes) of each build: process 0 read every task's table
  threshold = build_module.heldout_threshold
  monkeypatch.setattr(build_module, "heldout_threshold", lambda *a: decided.append(threshold(*a)) or decided[-1])
  one = _build(tmp_path, "one", src, tok, build_workers=1)
  spawned = _build(tmp_path, "spawned", src, tok, build_workers=2)
  results = _build_by_two_processes(tmp_path, "two", src, tok)
  # Each process in a folder of its own, passing files through an exchange folder (a bucket build's processes,
  # which share no disk): process 1's folder ends with its own tasks' shards alone, process 0's with the dataset
  # but for process 1's shards
  from diffgemma_jax.data.exchange import Exchange
  apart = _build_by_two_processes(tmp_path, "apart-{}", src, tok, exchange=Exchange(str(tmp_path / "exchange")))
  assert one["sha256"] == manifest["sha256"] and one["store"] == manifest["store"]  # the fixture trained it
  assert len(decided) == 4 and len(set(decided)) == 1, decided
  for other in (spawned, results[0], results[1], apart[0], apart[1]):
    assert other["sha256"] == one["sha256"] and other["store"] == one["store"] and other["splits"] == one["splits"]
  for split in ("train", "heldout"):
    for name in ("spawned", "two", "apart-0"):
      assert (np.fromfile(tmp_path / name / f"{split}.unigram", np.int64)
              == np.fromfile(tmp_path / "one" / f"{split}.unigram", np.int64)).all()
  files = {name: {os.path.relpath(os.path.join(d, f), tmp_path / name) for d, _, fs in os.walk(tmp_path / name)
                  for f in fs} for name in ("one", "apart-0", "apart-1")}
  shards = {f"{e['name']}{suffix}": int(e["name"].split("/")[1]) % 2 for split in ("train", "heldout")
            for e in one["store"]["splits"][split]["shards"] for suffix in (".tokens", ".starts")}
  assert set(shards.values()) == {0, 1} and set(shards) <= files["one"]
  assert files["apart-1"] == {rel for rel, p in shards.items() if p == 1}
  assert files["apart-0"] == files["one"] - files["apart-1"]
  for rel in files["one"] - {"manifest.json"}:
    with open(tmp_path / "one" / rel, "rb") as f, open(tmp_path / f"apart-{shards.get(rel, 0)}" / rel, "rb") as g:
      assert f.read() == g.read(), rel
  assert not os.path.exists(tmp_path / "apart-0.partial") and not os.path.exists(tmp_path / "apart-1.partial")


def _jsonl_of(src, path, separator: str) -> None:
  """One JSONL file of the corpus folder `src`'s files cut at `separator`, a record per part."""
  with open(path, "w", encoding="utf-8") as f:
    for name in sorted(os.listdir(src)):
      for part in (src / name).read_text(encoding="utf-8").split(separator):
        f.write(json.dumps({"text": part}, ensure_ascii=False) + "\n")


def test_one_large_file_is_built_in_several_tasks_to_the_same_dataset(store, tmp_path, monkeypatch):
  """A JSONL file cut into spans over several tasks and workers gives the dataset of one task reading it whole."""
  out, _, src = store
  _jsonl_of(src, tmp_path / "corpus.jsonl", "\n\n\n")
  tok = os.path.join(out, "tokenizer.model")
  monkeypatch.setattr(build_module, "TASK_BYTES", 1 << 30)
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 1 << 30)
  whole = _build(tmp_path, "whole", tmp_path / "corpus.jsonl", tok, build_workers=1)
  monkeypatch.setattr(build_module, "TASK_BYTES", 20_000)
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 0)
  assert len(build_module.plan_tasks(build_module.Corpus(str(tmp_path), ("corpus.jsonl",), "c"))) > 5
  spread = _build(tmp_path, "spread", tmp_path / "corpus.jsonl", tok, build_workers=2)
  assert len(whole["store"]["splits"]["train"]["shards"]) == 1
  assert len(spread["store"]["splits"]["train"]["shards"]) > 5
  for split in ("train", "heldout"):
    assert spread["splits"][split] == whole["splits"][split] and spread["splits"][split]["documents"] > 0
    a, b = (open_split(str(tmp_path / name), m, split) for name, m in (("spread", spread), ("whole", whole)))
    for got, want in zip(a.span(0, a.num_tokens), b.span(0, b.num_tokens)):  # tokens, document starts
      np.testing.assert_array_equal(got, want)
    assert (np.fromfile(tmp_path / "spread" / f"{split}.unigram", np.int64)
            == np.fromfile(tmp_path / "whole" / f"{split}.unigram", np.int64)).all()


def test_a_build_reads_its_plan_once_spread_over_its_processes(store, tmp_path, monkeypatch):
  """A large JSONL file's line ends (what cuts it into tasks) are read once per build, each process reading its share
  of the file's chunks (every process read the whole of every file for them, one after the other, before); a build
  resumed after an interruption reads none (its plan is kept); the dataset is the one-process build's."""
  out, _, src = store
  _jsonl_of(src, tmp_path / "corpus.jsonl", "\n\n")
  tok = os.path.join(out, "tokenizer.model")
  monkeypatch.setattr(build_module, "TASK_BYTES", 20_000)
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 0)
  corpus = build_module.Corpus(str(tmp_path), ("corpus.jsonl",), "c")
  parts = build_module.plan_parts(corpus, build_module.file_sizes(corpus))
  read, read_part = [], build_module._read_part
  monkeypatch.setattr(build_module, "_read_part", lambda j, *a: read.append(j) or read_part(j, *a))
  one = _build(tmp_path, "one", tmp_path / "corpus.jsonl", tok, build_workers=1)
  assert len(parts) > 5 and sorted(read) == list(range(len(parts)))
  read.clear()
  results = _build_by_two_processes(tmp_path, "two", tmp_path / "corpus.jsonl", tok)
  assert sorted(read) == list(range(len(parts)))  # each part once, by the process it fell to (j mod 2)
  read.clear()
  tokenize, calls = build_module._tokenize_task, []

  def interrupted(*args):
    if len(calls) == 2:
      raise KeyboardInterrupt
    calls.append(1)
    return tokenize(*args)

  monkeypatch.setattr(build_module, "_tokenize_task", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path, "resumed", tmp_path / "corpus.jsonl", tok, build_workers=1)
  assert sorted(read) == list(range(len(parts)))
  read.clear()
  monkeypatch.setattr(build_module, "_tokenize_task", tokenize)
  resumed = _build(tmp_path, "resumed", tmp_path / "corpus.jsonl", tok, build_workers=1)
  assert read == []
  for other in (results[0], results[1], resumed):
    assert other["sha256"] == one["sha256"] and other["store"] == one["store"]


def test_a_build_plans_from_line_starts_alone(store, tmp_path, monkeypatch, capsys):
  """A large JSONL file's plan reads each chunk's first line start only (not the chunk: the corpus was read once
  more for its line counts); the scan counts each span's lines and process 0 numbers the spans and the documents'
  digests from them. The dataset is the one of a plan that counts,
  in one process and in two that share no folder; a bad line in a span not yet numbered is named by its byte."""
  out, _, src = store
  _jsonl_of(src, tmp_path / "corpus.jsonl", "\n\n")
  data = (tmp_path / "corpus.jsonl").read_bytes()
  middle = data.index(b"\n", len(data) // 2) + 1  # a line start in a later span
  (tmp_path / "corpus.jsonl").write_bytes(data[:middle] + b"{not json\n" + data[middle:])
  tok = os.path.join(out, "tokenizer.model")
  monkeypatch.setattr(build_module, "TASK_BYTES", 20_000)
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 20_000)  # chunks of 20 kB
  monkeypatch.setattr(sources, "_FIND_BYTES", 256)
  read, read_range = [], sources.storage.read_range

  def counted_read(path, start, end):
    read.append(len(read_range(path, start, end)))
    return read_range(path, start, end)

  monkeypatch.setattr(sources.storage, "read_range", counted_read)
  one = _build(tmp_path, "one", tmp_path / "corpus.jsonl", tok, build_workers=1)
  assert len(read) > 5 and sum(read) < len(data) / 4, (read, len(data))  # counting reads all of it
  report = capsys.readouterr().err
  assert f"skipped bad line: {tmp_path / 'corpus.jsonl'} (the line at byte {middle}): not JSON" in report, report
  from diffgemma_jax.data.exchange import Exchange
  apart = _build_by_two_processes(tmp_path, "apart-{}", tmp_path / "corpus.jsonl", tok,
                                  exchange=Exchange(str(tmp_path / "exchange")))
  read_part = build_module._read_part
  monkeypatch.setattr(build_module, "_read_part", lambda *a: read_part(*a[:-1], True))  # the plan counts lines
  counted = _build(tmp_path, "counted", tmp_path / "corpus.jsonl", tok, build_workers=1)
  assert sum(read) > len(data)
  assert f"skipped bad line: {tmp_path / 'corpus.jsonl'}:" in capsys.readouterr().err
  assert counted["splits"]["train"]["documents"] > 0 and counted["splits"]["heldout"]["documents"] > 0
  for other in (one, apart[0], apart[1]):
    assert other["sha256"] == counted["sha256"] and other["store"] == counted["store"]
    assert other["splits"] == counted["splits"]


def test_a_tokenizer_sample_from_spans_the_plan_did_not_number(store, tmp_path, monkeypatch):
  """A build that trains its tokenizer plans from line starts too: a document of a span not yet numbered is sampled
  by a digest of its place, and left out of the sample by its own key digest once the spans are numbered. The
  sample holds `sample_lines` lines of training documents only, and the dataset (its tokenizer) is the same built
  by one process and by two that share no folder."""
  _, _, src = store
  _jsonl_of(src, tmp_path / "corpus.jsonl", "\n\n")
  monkeypatch.setattr(build_module, "TASK_BYTES", 20_000)
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 20_000)
  seen, texts = [], build_module.Sample.texts

  def checked(self, heldout):
    seen.append((list(self.heap), heldout, texts(self, heldout)))
    return seen[-1][2]

  monkeypatch.setattr(build_module.Sample, "texts", checked)
  options = dict(vocab_size=400, tokenizer_sample_lines=600)
  one = _build(tmp_path, "one", tmp_path / "corpus.jsonl", None, build_workers=1, **options)
  from diffgemma_jax.data.exchange import Exchange
  apart = _build_by_two_processes(tmp_path, "apart-{}", tmp_path / "corpus.jsonl", None, **options,
                                  exchange=Exchange(str(tmp_path / "exchange")))
  for other in apart.values():
    assert other["sha256"] == one["sha256"] and other["store"] == one["store"]
  assert (tmp_path / "apart-0" / "tokenizer.model").read_bytes() == (tmp_path / "one" / "tokenizer.model").read_bytes()
  identities = {}  # a document's non-empty lines -> the key digests of the documents with those lines
  for identity, text in sources.read_documents(str(tmp_path), "corpus.jsonl"):
    lines = tuple(line for line in text.split("\n") if line.strip())
    identities.setdefault(lines, set()).add(key_digest(identity))
  assert len(seen) == 2 and [text for _, _, text in seen] == [seen[0][2]] * 2
  heap, heldout, sampled = seen[0]
  places = [entry for entry in heap if entry[3] is not None]  # sampled by place: the spans after each file's first
  assert len(places) > len(heap) // 2
  for key, _, lines, digest in heap:
    assert (key if digest is None else digest) in identities[tuple(lines)]
  assert any(heldout(digest) for _, _, _, digest in places)  # some left out by their own digests
  kept = [entry for entry in sorted(heap, reverse=True) if not heldout(entry[0] if entry[3] is None else entry[3])]
  assert sampled == ["\n".join(lines) for _, _, lines, _ in kept][:len(sampled)]
  assert sum(len(text.split("\n")) for text in sampled) >= 600


def test_the_sample_floor_leaves_out_of_each_task_what_cannot_be_sampled(store, tmp_path, monkeypatch):
  """Tasks scanned once the process's merged sample holds its lines drop the documents under its least (its floor,
  `Sample.floor_now`): they send back under half the candidate lines (a task of long lines sent its whole text),
  the merged sample is the one without floors, and a build's tokenizer is the same with tasks reading no floor."""
  _, _, src = store
  _jsonl_of(src, tmp_path / "corpus.jsonl", "\n\n")
  monkeypatch.setattr(build_module, "TASK_BYTES", 10_000)
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 10_000)
  corpus = build_module.Corpus(root=str(tmp_path), files=("corpus.jsonl",), name="corpus")
  tasks = build_module.plan_tasks(corpus)
  os.makedirs(tmp_path / "staging" / "scan")
  floor_file, merged, sent = str(tmp_path / "floor.json"), {}, {}
  for floors in (False, True):
    sample, floor, lines = build_module.Sample(300), None, 0
    for i, spans in enumerate(tasks):
      scan = build_module._scan_task  # pylint: disable=protected-access
      _, _, heap, _ = scan(corpus, i, spans, str(tmp_path / "staging"), 300, floor_file if floors else None)
      lines += sum(len(entry[2]) for entry in heap)
      for entry in heap:
        sample.offer(*entry)
      if floors and sample.floor_now() != floor:  # as the build's scan writes it
        floor = sample.floor_now()
        build_module._write_json(floor_file, floor)  # pylint: disable=protected-access
    merged[floors], sent[floors] = sorted(sample.heap), lines
  assert len(tasks) > 10 and merged[True] == merged[False] and sent[True] < sent[False] / 2, (len(tasks), sent)
  options = dict(vocab_size=400, tokenizer_sample_lines=300, build_workers=1)
  floored = _build(tmp_path, "floored", tmp_path / "corpus.jsonl", None, **options)
  monkeypatch.setattr(build_module, "_read_floor", lambda path: None)
  unfloored = _build(tmp_path, "unfloored", tmp_path / "corpus.jsonl", None, **options)
  assert floored["sha256"] == unfloored["sha256"]
  assert (tmp_path / "floored" / "tokenizer.model").read_bytes() == \
      (tmp_path / "unfloored" / "tokenizer.model").read_bytes()


def test_build_workers_hold_no_result_once_it_is_handed_over():
  """A scan's results hold its tokenizer-sample candidates (all of a task's lines when the sample is larger than
  the task): the build must not keep every task's until the phase ends."""
  import gc
  import weakref
  workers = build_module._Workers(2)
  try:
    refs = []
    for result in workers.run(set, [(range(i, i + 1000),) for i in range(6)]):
      gc.collect()
      assert all(ref() is None for ref in refs)  # every earlier result is gone
      refs.append(weakref.ref(result))
      del result
    assert len(refs) == 6
  finally:
    workers.close()


def test_tokenizer_sample_is_uniform_over_documents(tmp_path, monkeypatch):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(60):
    (src / f"doc{i:02d}.txt").write_text("".join(f"line {j} of document {i}\n" for j in range(10)))
  seen = {}

  def spy(texts, prefix, vocab_size, max_sentences):
    seen["texts"], seen["max_sentences"] = list(texts), max_sentences
    raise DataError("stop here")

  monkeypatch.setattr(build_module, "train_tokenizer", spy)
  with pytest.raises(DataError, match="stop here"):
    build_dataset("text_files", str(tmp_path / "ds"), 400, source=str(src), tokenizer_sample_lines=95)
  splits = split_by_hash([(f"doc{i:02d}.txt", "x") for i in range(60)], 0.04)
  train = sorted((s for s, _ in splits["train"]), key=lambda s: key_digest(s), reverse=True)
  expected = {f"document {int(s[3:5])}" for s in train[:10]}  # 10 lines each: 10 documents reach 95 lines
  got = {text.split("\n")[0].split(" of ")[1] for text in seen["texts"]}
  assert got == expected and seen["max_sentences"] == 95
  assert got != {f"document {i}" for i in range(10)}  # not the first files in sorted order
  assert not os.path.exists(tmp_path / "ds.partial")


def test_resume_mid_epoch_with_another_process_count(store):
  out = store[0]
  first = make_train_iterator(out, seq_len=SEQ_LEN, batch_size=8, seed=1)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  want = [next(first) for _ in range(3)]
  halves = [make_train_iterator(out, seq_len=SEQ_LEN, batch_size=4, seed=1, process_index=p, process_count=2)
            for p in range(2)]
  for it in halves:
    it.set_state(state)
  for expected in want:
    parts = [next(it) for it in halves]
    _assert_rows_equal({k: np.concatenate([p[k] for p in parts]) for k in expected}, expected)


def test_each_process_reads_only_its_rows(store, monkeypatch):
  out = store[0]
  read = {0: [], 1: []}
  current = {}
  original = SplitStore.rows

  def spy(self, indices, seq_len):
    read[current["p"]].extend(np.asarray(indices).tolist())
    return original(self, indices, seq_len)

  monkeypatch.setattr(SplitStore, "rows", spy)
  its = [make_train_iterator(out, seq_len=SEQ_LEN, batch_size=3, seed=2, process_index=p, process_count=2)
         for p in range(2)]
  whole = make_train_iterator(out, seq_len=SEQ_LEN, batch_size=6, seed=2)
  for _ in range(4):
    parts = []
    for p, it in enumerate(its):
      current["p"] = p
      parts.append(next(it))
    current["p"] = 0
    before = len(read[0])
    _assert_rows_equal({k: np.concatenate([q[k] for q in parts]) for k in parts[0]}, next(whole))
    del read[0][before:]
  assert len(read[0]) == len(read[1]) == 12 and not set(read[0]) & set(read[1])


def test_truncated_shard_names_the_file(store, tmp_path):
  copy = tmp_path / "ds"
  shutil.copytree(store[0], copy)
  shard = copy / "train" / "00001.tokens"
  shard.write_bytes(shard.read_bytes()[:-2])
  with pytest.raises(DataError, match=f"{shard}.*truncated"):
    make_train_iterator(str(copy), seq_len=SEQ_LEN, batch_size=4, seed=0)


def test_reading_a_large_store_keeps_memory_flat(tmp_path):
  """A 256 MB store read row by row across its whole length: private memory stays within a few MB."""
  vocab, per_shard, shards = 50_000, 32 << 20, 4
  entries = []
  rng = np.random.default_rng(0)
  for s in range(shards):
    writer = ShardWriter(str(tmp_path / "train"), f"{s:05d}", vocab)
    lengths = rng.integers(100, 3_000, size=per_shard // 2_000)
    lengths[-1] += per_shard - lengths.sum()
    for chunk in np.array_split(lengths, 64):
      ids = [rng.integers(0, vocab, size=n, dtype=np.int32) for n in chunk]
      writer.add([("d", "")] * len(ids), ids)
    entries.append(writer.close())
  split = SplitStore(str(tmp_path), "train", entries, "<u2")
  assert split.num_tokens == shards * per_shard and os.path.getsize(tmp_path / "train" / "00000.tokens") == 64 << 20

  def private_kb():
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

  seq_len = 2048
  rows = np.linspace(0, split.num_rows(seq_len, False) - 1, 3_000).astype(int)
  split.rows(rows[:10], seq_len)
  before = private_kb()
  for start in range(0, len(rows), 100):
    split.rows(rows[start:start + 100], seq_len)
  assert private_kb() - before < 16_000


def test_a_build_says_what_it_does_in_a_log(store, tmp_path, monkeypatch, capsys):
  """A first run's build can take many minutes: stderr, a terminal or not (a cluster job's log), gets what it builds
  and what it built; between them a line per finished task only once PROGRESS_EVERY_S has passed since the last
  line (here 0 s: every task of both phases; at the default, a build of a second prints its two lines alone)."""
  out, manifest, src = store
  tok = os.path.join(out, "tokenizer.model")
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
  built = _build(tmp_path, "told", src, tok, build_workers=1)
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 2, lines
  assert lines[0].startswith("building a dataset of ") and f"in {tmp_path / 'told'}: " in lines[0], lines
  assert lines[1].startswith(f"built {tmp_path / 'told'} in ") and (
      f"{built['splits']['train']['tokens']:,} train and {built['splits']['heldout']['tokens']:,} held-out tokens"
      in lines[1]), lines
  monkeypatch.setattr(build_module, "TASK_BYTES", 40_000)
  monkeypatch.setattr(build_module, "PROGRESS_EVERY_S", 0.0)
  tasks = len(build_module.plan_tasks(build_module.Corpus(str(src), tuple(sorted(os.listdir(src))), "c")))
  assert tasks > 3
  _build(tmp_path, "each", src, tok, build_workers=1)
  lines = capsys.readouterr().err.splitlines()
  prefix = f"building {tmp_path / 'each'}: "
  steps = [line[len(prefix):].split(" task(s)")[0] for line in lines[1:-1]]
  assert steps == [f"{phase} {k}/{tasks}" for phase in ("scan", "tokenise") for k in range(1, tasks + 1)], lines
  assert all(line.startswith(prefix) and " MB/s" in line for line in lines[1:-1]), lines


def test_build_progress_lines_come_at_most_every_interval(capsys):
  """A fake clock: task lines and notes only once `every_s` has passed since the last line printed."""
  now = [0.0]
  progress = build_module._Progress("DIR", enabled=True, every_s=30.0, clock=lambda: now[0])
  progress.phase("scan", {i: 10_000_000 for i in range(10)})
  for i, t in enumerate((5, 20, 29.9, 31, 45, 60, 61, 95, 96, 100)):
    now[0] = t
    progress.done(i)
  now[0] = 120
  progress.note("not yet: 25 s since the last line")
  now[0] = 126
  progress.note("training the tokenizer")
  assert capsys.readouterr().err.splitlines() == [
      "building DIR: scan 4/10 task(s), 40.0 of 100.0 MB, 1.29 MB/s, 0.8 min left",  # at 31 s
      "building DIR: scan 7/10 task(s), 70.0 of 100.0 MB, 1.15 MB/s, 0.4 min left",  # 61
      "building DIR: scan 8/10 task(s), 80.0 of 100.0 MB, 0.84 MB/s, 0.4 min left",  # 95
      "building DIR: training the tokenizer"]  # 126
  quiet = build_module._Progress("DIR", enabled=False, every_s=0.0)  # processes other than 0
  quiet.say("x")
  quiet.note("y")
  assert capsys.readouterr().err == ""

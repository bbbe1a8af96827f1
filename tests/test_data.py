"""Data recipes and grain pipelines: packing, iterator state, sharding, held-out split, errors."""

import json
import os
import sysconfig

import numpy as np
import pytest

from conftest import free_port, write_stand_in_dataset

from data_recipes import build_dataset
from data_recipes.common import split_by_hash
from data_recipes.python_stdlib import documents as stdlib_documents
from data_recipes.shakespeare import play_and_edition
from diffgemma_jax.data import Tokenizer, make_eval_batches, make_train_iterator, unigram_ppl
from diffgemma_jax.data.store import ShardWriter, SplitStore
from diffgemma_jax.errors import DataError


def test_packing_keeps_every_token_once_in_order_and_never_mixes_documents(tmp_path):
  rng = np.random.default_rng(0)
  docs = [rng.integers(5, 50, size=n).astype(np.int32) for n in (3, 17, 1, 40, 9, 2, 25)]
  tokens = np.concatenate(docs)
  entries = []
  for shard, part in enumerate((docs[:3], docs[3:4], docs[4:])):  # documents in three shards
    writer = ShardWriter(str(tmp_path / "train"), f"{shard:05d}", 64)
    writer.add([("d", "")] * len(part), part)
    entries.append(writer.close())
  store = SplitStore(str(tmp_path), "train", entries, "<u2")
  rows = store.rows(range(store.num_rows(8, keep_partial=True)), 8)
  flat = rows["tokens"].reshape(-1)
  seg = rows["segment_ids"]
  real = seg.reshape(-1) > 0
  np.testing.assert_array_equal(flat[real], tokens)
  assert real.sum() == len(tokens)
  # rebuild the document pieces from (row, segment) and check each is a contiguous slice of one document
  doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
  offset_in_doc = np.concatenate([np.arange(len(d)) for d in docs])
  pos = rows["positions"].reshape(-1)[real]
  row_seg = (np.arange(real.size) // 8 * 1000 + seg.reshape(-1))[real]
  for key in np.unique(row_seg):
    idx = np.where(row_seg == key)[0]
    assert len(set(doc_of[idx])) == 1, "a segment mixes documents"
    np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
    assert np.all(np.diff(offset_in_doc[idx]) == 1)
  assert np.all(rows["positions"][seg == 0] == 0)


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  root = sysconfig.get_paths()["stdlib"]
  for name in ("textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "string.py",
               "colorsys.py", "keyword.py", "queue.py", "sched.py", "calendar.py"):
    with open(os.path.join(root, name), encoding="utf-8") as f:
      (src / name).write_text(f.read(), encoding="utf-8")
  (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 10)
  out = str(tmp_path_factory.mktemp("ds") / "text")
  manifest = build_dataset("text_files", out, 400, source=str(src))
  return out, manifest, str(src)


def test_text_files_dataset_and_manifest(text_dataset, capsys):
  out, manifest, src = text_dataset
  assert manifest["skipped_non_utf8"] == 1
  assert manifest["splits"]["train"]["documents"] + manifest["splits"]["heldout"]["documents"] == 12
  tok = Tokenizer(os.path.join(out, "tokenizer.model"))
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4) and tok.vocab_size == 400
  assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
  # idempotent and stable
  again = build_dataset("text_files", out, 400, source=src)
  assert again["sha256"] == manifest["sha256"] and again["created"] == manifest["created"]


def test_a_build_waits_for_another_process_building_the_same_folder(text_dataset, tmp_path, capsys):
  """Two runs asking for one dataset folder at once (a sweep on one machine): while one holds the folder's build
  lock the other neither writes nor fails, says it waits, and once the lock is released reuses what the first
  built. (Without the lock two builds shared one staging folder and crashed each other.)"""
  import threading
  import time

  from data_recipes import build_lock
  out, manifest, src = text_dataset
  results = []
  with build_lock(out):  # the other run, mid-build
    waiting = threading.Thread(target=lambda: results.append(build_dataset("text_files", out, 400, source=src)))
    waiting.start()
    time.sleep(1.0)
    assert waiting.is_alive() and not results and not os.path.exists(out.rstrip("/") + ".partial")
  waiting.join(60)
  assert results[0]["sha256"] == manifest["sha256"] and results[0]["created"] == manifest["created"]
  assert f"data: another process is building {out}" in capsys.readouterr().err


def test_build_workers_exit_when_the_build_is_killed(tmp_path):
  """A build killed outright (SIGKILL: the OOM killer, `kill -9`) takes its worker processes with it: they waited on
  their pool's queue for good, holding the build's stdout and stderr (a caller reading those never saw their end).
  Seen to fail without the workers' watch on their parent."""
  import signal
  import subprocess
  import sys
  import time

  script = ("import os, time\nfrom diffgemma_jax.data.build import _Workers\nworkers = _Workers(2)\n"
            "list(workers.run(os.getpid, [(), (), (), ()]))\nprint('ready', flush=True)\ntime.sleep(600)\n")
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    assert proc.stdout.readline().strip() == "ready"

    def alive_children():
      found = []
      for entry in os.listdir("/proc"):
        try:
          with open(f"/proc/{entry}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
          continue
        if fields[0] != "Z" and int(fields[1]) == proc.pid:
          found.append(int(entry))
      return found

    workers = alive_children()
    assert len(workers) >= 2, workers  # the two workers (and multiprocessing's resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def gone(pid):
      try:
        with open(f"/proc/{pid}/stat") as f:
          return f.read().rsplit(")", 1)[1].split()[0] == "Z"
      except OSError:
        return True

    deadline = time.time() + 30
    while not all(gone(pid) for pid in workers) and time.time() < deadline:
      time.sleep(0.1)
    assert all(gone(pid) for pid in workers), [pid for pid in workers if not gone(pid)]
    assert proc.stdout.read() == ""  # the pipe's end: no worker holds it any more
  finally:
    proc.kill()


def test_scratch_folders_of_killed_builds_together_are_swept_and_no_other(tmp_path):
  """A process of a build done together, killed outright (SIGKILL) with its scratch folder, staging and lock in the
  cache, leaves an owner file no one holds: the next sweep of that cache folder deletes what it left, and keeps a
  live build's folder (its owner locked), a folder whose owner has not locked it yet (an empty owner file) and the
  single-process build's resumable folder (no owner). Seen to fail with the sweep deleting every build folder."""
  import signal
  import subprocess
  import sys

  from diffgemma_jax.data import remote_dataset
  parent = tmp_path / "cache" / "0123456789abcdef"
  dead, live, starting = (str(parent / f"build-{c * 12}") for c in "abc")
  script = (f"import os, time\nfrom diffgemma_jax.data import remote_dataset\nscratch = {dead!r}\n"
            "assert remote_dataset._own(scratch)\nos.makedirs(scratch + '/train')\nos.makedirs(scratch + '.partial')\n"
            "open(scratch + '.lock', 'w').close()\nprint('ready', flush=True)\ntime.sleep(600)\n")
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    assert proc.stdout.readline().strip() == "ready"
    assert remote_dataset._sweep(str(parent)) == []  # its owner is alive
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    proc.kill()
  assert remote_dataset._own(live)
  os.makedirs(live)
  os.makedirs(starting)
  open(starting + remote_dataset.OWNER_SUFFIX, "w").close()
  resumable = parent / "build-host-0123456789ab"
  os.makedirs(str(resumable) + ".partial")
  try:
    assert remote_dataset._sweep(str(parent)) == [dead]
    assert sorted(os.listdir(parent)) == sorted(os.path.basename(p) for p in (
        live, live + ".owner", starting, starting + ".owner", str(resumable) + ".partial"))
  finally:
    remote_dataset._discard(live)
  assert not os.path.exists(live) and not os.path.exists(live + ".owner")


def test_a_filesystem_without_locks_builds_unlocked(text_dataset, monkeypatch, capsys):
  import errno
  import fcntl

  def no_locks(*_):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  out, manifest, src = text_dataset
  assert build_dataset("text_files", out, 400, source=src)["sha256"] == manifest["sha256"]
  assert f"cannot be locked (No locks available); building {out} without the lock" in capsys.readouterr().err


@pytest.fixture
def runtime_clients():
  """Two clients of a JAX distributed runtime (its coordination service on localhost, what `jax.distributed`
  starts for a job: barriers and the job's key-value store), for two threads that stand in for a job's
  processes."""
  import threading

  from jax._src.lib import _jax
  address = f"127.0.0.1:{free_port()}"
  service = _jax.get_distributed_runtime_service(address, 2)
  clients = [_jax.get_distributed_runtime_client(address, p) for p in range(2)]

  def each(method):
    threads = [threading.Thread(target=getattr(client, method)) for client in clients]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()

  each("connect")
  yield clients
  each("shutdown")
  service.shutdown()


def _job(client, process_index: int, out: str, barrier=None):
  """A job's reported build as prepare_dataset makes it, on the runtime's real barriers and key-value store, with
  times cut 100-fold: a 1 s barrier timeout (an hour in a job), beats every 0.1 s, stale after 0.5 s."""
  from diffgemma_jax.data.build_status import JobBuild, KeyValueBoard
  return JobBuild(KeyValueBoard(client, "status"), process_index=process_index, what=f"data.dir {out}",
                  barrier=barrier or (lambda name: client.wait_at_barrier(name, 1000)), start="start", poll_s=0.05,
                  heartbeat_s=0.1, stale_s=0.5)


def test_a_job_waits_while_its_process_0_waits_for_another_jobs_build_lock(text_dataset, runtime_clients):
  """Another job holds the folder's build lock past the barrier timeout and five times the staleness limit:
  process 0 of this job waits for it, beating, and its other process waits as long as the beats come (before, it
  waited at a barrier whose timeout killed the job); then both reuse what the other job built."""
  import concurrent.futures
  import time

  from data_recipes import build_lock
  out, manifest, src = text_dataset
  with concurrent.futures.ThreadPoolExecutor(2) as pool, build_lock(out):  # the other job, mid-build
    futures = [pool.submit(build_dataset, "text_files", out, 400, source=src, process_index=p, process_count=2,
                           job=_job(client, p, out)) for p, client in enumerate(runtime_clients)]
    time.sleep(2.5)  # the barrier times out within 2 s (the runtime checks its deadlines about once a second)
    assert not any(f.done() for f in futures), [f.exception() for f in futures if f.done()]
  for future in futures:
    assert future.result(timeout=60)["created"] == manifest["created"]


def test_a_job_fails_with_process_0s_error_or_once_its_beats_stop(text_dataset, runtime_clients, tmp_path):
  """The other process fails within a poll with process 0's message when its build fails (an SFT dataset, which
  process 0 writes alone), and with a message naming the last beat when process 0 stops beating."""
  import concurrent.futures
  import time

  out, _, _ = text_dataset
  target = str(tmp_path / "sft")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    start = time.monotonic()
    futures = [pool.submit(build_dataset, "jsonl", target, None, source=str(tmp_path / "none.jsonl"),
                           tokenizer=os.path.join(out, "tokenizer.model"), process_index=p, process_count=2,
                           job=_job(client, p, target)) for p, client in enumerate(runtime_clients)]
    errors = [f.exception(timeout=60) for f in futures]
  assert time.monotonic() - start < 10
  assert isinstance(errors[0], DataError) and str(errors[0]).startswith("data.source")
  assert str(errors[1]) == f"data.dir {target}: the dataset build failed on process 0: {errors[0]}"

  runtime_clients[0].key_value_set("status", '{"building": true, "beat": 7, "stage": "start"}', True)  # then died
  with pytest.raises(DataError) as info:
    build_dataset("text_files", out, 400, source="unused", process_index=1, process_count=2,
                  job=_job(runtime_clients[1], 1, out, barrier=lambda name: None))
  assert str(info.value).startswith(f"data.dir {out}: process 0 has stopped reporting on the dataset build: its last "
                                    f"beat (7) in the job's key-value store (key status), nothing new for 0.5 s")


def test_a_bucket_build_reports_in_the_jobs_own_store(s3_endpoint, runtime_clients, tmp_path):
  """A job's bucket build reports on its key-value store, not in the bucket: another job building the same folder
  at the same time never reads this one's beats or outcome (a sweep started together). A stale status object left
  in the bucket by a failed job is not read either."""
  import concurrent.futures

  from etils import epath

  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.data.build_status import KeyValueBoard
  url = "s3://runs/kv-job"
  epath.Path(f"{url}/{remote_dataset.STATUS_FILE}").write_text('{"error": "another job failed"}')

  def build(folder):
    write_stand_in_dataset(folder, bytes(range(16)), "kv")

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(remote_dataset.build_shared, url, str(tmp_path / f"cache-{p}"), build, process_index=p,
                           barrier=lambda name, c=client: c.wait_at_barrier(name, 30_000), poll_s=0.05,
                           board=KeyValueBoard(client, f"status:{url}"))
               for p, client in enumerate(runtime_clients)]
    locals_ = [f.result(timeout=60) for f in futures]
  for local in locals_:
    assert open(os.path.join(local, "train", "00000.tokens"), "rb").read() == bytes(range(16))
  assert runtime_clients[1].key_value_try_get(f"status:{url}") == '{"ok": true}'
  assert epath.Path(f"{url}/{remote_dataset.STATUS_FILE}").read_text() == '{"error": "another job failed"}'


def test_iterator_state_restores_the_same_batches(text_dataset):
  out = text_dataset[0]
  it = make_train_iterator(out, seq_len=32, batch_size=4, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = make_train_iterator(out, seq_len=32, batch_size=4, seed=3)
  fresh.set_state(json.loads(json.dumps(state)))
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_get_disjoint_rows_and_seeds_shuffle(text_dataset):
  out = text_dataset[0]
  a = next(make_train_iterator(out, seq_len=32, batch_size=8, seed=0, process_index=0, process_count=2))
  b = next(make_train_iterator(out, seq_len=32, batch_size=8, seed=0, process_index=1, process_count=2))
  rows_a = {r.tobytes() for r in a["tokens"]}
  rows_b = {r.tobytes() for r in b["tokens"]}
  assert not rows_a & rows_b
  c = next(make_train_iterator(out, seq_len=32, batch_size=8, seed=1))
  d = next(make_train_iterator(out, seq_len=32, batch_size=8, seed=0))
  assert not np.array_equal(c["tokens"], d["tokens"])


def test_eval_batches_are_deterministic_and_padded(text_dataset):
  out = text_dataset[0]
  first = make_eval_batches(out, seq_len=32, batch_size=8, max_sequences=13)
  second = make_eval_batches(out, seq_len=32, batch_size=8, max_sequences=13)
  assert len(first) == 2
  for x, y in zip(first, second):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert np.all(first[1]["segment_ids"][5:] == 0)
  assert unigram_ppl(out) > 1.0


def test_eval_batches_read_each_batch_when_asked(text_dataset, monkeypatch):
  """Held-out batches are read from the store one at a time, when used: a whole held-out split is never in memory."""
  from diffgemma_jax.data.pipeline import StoreRows
  reads = []
  take = StoreRows.take
  monkeypatch.setattr(StoreRows, "take", lambda self, indices: reads.append(list(indices)) or take(self, indices))
  batches = make_eval_batches(text_dataset[0], seq_len=32, batch_size=8, max_sequences=13)
  assert len(batches) == 2 and batches.num_rows == 13 and not reads
  last = batches[-1]
  assert reads == [list(range(8, 13))] and last["tokens"].shape == (8, 32) and last["tokens"].dtype == np.int32
  with pytest.raises(IndexError):
    batches[2]


def test_eval_batch_slices_together_are_the_one_process_batches(text_dataset):
  """Processes of a mesh load slices of every held-out batch: slice p of batch b is rows [4p, 4p + 4) of the
  one-process batch b, every slice has as many batches, and a slice past the last row is all padding."""
  whole = make_eval_batches(text_dataset[0], seq_len=32, batch_size=8, max_sequences=12)
  slices = [make_eval_batches(text_dataset[0], seq_len=32, batch_size=8, max_sequences=12, process_index=p,
                              process_count=2) for p in range(2)]
  assert len(whole) == len(slices[0]) == len(slices[1]) == 2 and slices[1].num_rows == 12
  for b in range(2):
    for key in whole[b]:
      np.testing.assert_array_equal(np.concatenate([s[b][key] for s in slices]), whole[b][key])
  assert slices[1][1]["tokens"].shape == (4, 32) and np.all(slices[1][1]["segment_ids"] == 0)
  assert np.all(slices[0][1]["segment_ids"][:, 0] > 0)  # rows 8..11
  with pytest.raises(ValueError, match="the slice count must divide the batch size"):
    make_eval_batches(text_dataset[0], seq_len=32, batch_size=8, process_index=0, process_count=3)


def test_bad_sources_fail_clearly(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    build_dataset("text_files", str(tmp_path / "x"), 400, source=str(tmp_path / "missing"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="no non-empty documents"):
    build_dataset("text_files", str(tmp_path / "y"), 400, source=str(empty))
  (empty / "bad.bin").write_bytes(b"\xff\xfe\x00garbage\xff")
  with pytest.raises(DataError, match="1 not UTF-8"):
    build_dataset("text_files", str(tmp_path / "z"), 400, source=str(empty))
  with pytest.raises(DataError, match="valid recipes"):
    build_dataset("wikipedia", str(tmp_path / "w"), 400)
  assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "z")


def test_stdlib_split_is_by_module_with_enough_heldout():
  docs = stdlib_documents()
  splits = split_by_hash(docs, 0.04)
  train = {s for s, _ in splits["train"]}
  held = {s for s, _ in splits["heldout"]}
  assert not train & held
  assert not any("/test/" in s or s.startswith("test/") for s in train | held)
  size = lambda items: sum(len(t.encode()) for _, t in items)
  assert size(splits["heldout"]) >= 0.03 * (size(splits["train"]) + size(splits["heldout"]))
  assert split_by_hash(docs, 0.04) == splits


def test_shakespeare_keeps_one_edition_per_play():
  assert play_and_edition("comedy_of_errours_gut_f.txt") == ("comedy_of_errors", "folio")
  assert play_and_edition("hamlet_gut.txt") == ("hamlet", "gutenberg")
  assert play_and_edition("comus_gut.txt") is None  # Milton
  assert play_and_edition("metadata.txt") is None


def test_a_run_keeps_its_tokenizer_and_refuses_a_changed_one(tmp_path):
  from diffgemma_jax.errors import ConfigError
  from diffgemma_jax.train.dataset import pin_tokenizer
  data, workdir = tmp_path / "data", tmp_path / "run"
  data.mkdir()
  (data / "tokenizer.model").write_bytes(b"first")
  pin_tokenizer(str(data), str(workdir), write=False)
  assert not (workdir / "tokenizer.model").exists()
  pin_tokenizer(str(data), str(workdir), write=True)
  assert (workdir / "tokenizer.model").read_bytes() == b"first"
  pin_tokenizer(str(data), str(workdir), write=True)  # same tokenizer: fine
  (data / "tokenizer.model").write_bytes(b"rebuilt")
  with pytest.raises(ConfigError, match="differs"):
    pin_tokenizer(str(data), str(workdir), write=False)


def test_the_same_files_in_another_folder_give_the_same_dataset(text_dataset, tmp_path):
  _, manifest, src = text_dataset
  moved = tmp_path / "elsewhere" / "corpus"
  import shutil
  shutil.copytree(src, moved)
  again = build_dataset("text_files", str(tmp_path / "ds2"), 400, source=str(moved))
  assert again["sha256"] == manifest["sha256"]
  assert [f for f in again["splits"]["heldout"]] == [f for f in manifest["splits"]["heldout"]]
  assert again["splits"]["heldout"]["documents"] == manifest["splits"]["heldout"]["documents"]
  with open(os.path.join(text_dataset[0], "tokenizer.model"), "rb") as a, \
      open(tmp_path / "ds2" / "tokenizer.model", "rb") as b:
    assert a.read() == b.read()  # no build path recorded in the tokenizer


def test_an_interrupted_build_resumes_where_its_tokenise_phase_stopped(text_dataset, tmp_path, monkeypatch, capsys):
  """A build stopped in its tokenise phase (an interrupt after 3 tasks: a preemption) keeps its staging folder; the
  same build again keeps its held-out split and tokenizer (no scan, no tokenizer training) and encodes only the
  tasks that had not finished, and the dataset is the uninterrupted build's (manifest digest, tokenizer, unigram
  counts). After a source file changes, the same interruption is followed by a build from the start. Stopped in its
  scan, it scans only the tasks not scanned and makes the same dataset and tokenizer."""
  import shutil

  from diffgemma_jax.data import build
  _, _, corpus = text_dataset
  src = str(tmp_path / "src")
  shutil.copytree(corpus, src)
  monkeypatch.setattr(build, "TASK_BYTES", 8000)
  monkeypatch.setattr(build, "MIN_TASK_BYTES", 8000)
  reference = build_dataset("text_files", str(tmp_path / "reference"), 400, source=src, build_workers=1)
  calls = {"scan": 0, "tokenize": 0, "train": 0}
  scan, tokenize, train = build._scan_task, build._tokenize_task, build.train_tokenizer

  def counted(name, fn, stop_after=None):
    def run(*args, **kwargs):
      if stop_after is not None and calls[name] == stop_after:
        raise KeyboardInterrupt
      calls[name] += 1
      return fn(*args, **kwargs)
    return run

  out = str(tmp_path / "ds")
  for changed in (False, True):
    calls.update(scan=0, tokenize=0, train=0)
    monkeypatch.setattr(build, "_tokenize_task", counted("tokenize", tokenize, stop_after=3))
    with pytest.raises(KeyboardInterrupt):
      build_dataset("text_files", out, 400, source=src, build_workers=1)
    assert os.path.isfile(os.path.join(out + ".partial", build.BUILD_FILE)) and not os.path.exists(out)
    assert "its staging folder" in capsys.readouterr().err
    if changed:  # the same size (the same task plan): only its version tells
      with open(os.path.join(src, "heapq.py")) as f:
        original = f.read()
      with open(os.path.join(src, "heapq.py"), "w") as f:
        f.write(original.replace("heap", "HEAP", 1))
    calls.update(scan=0, tokenize=0, train=0)
    monkeypatch.setattr(build, "_scan_task", counted("scan", scan))
    monkeypatch.setattr(build, "_tokenize_task", counted("tokenize", tokenize))
    monkeypatch.setattr(build, "train_tokenizer", counted("train", train))
    manifest = build_dataset("text_files", out, 400, source=src, build_workers=1)
    tasks = len(build.plan_tasks(build.Corpus(src, tuple(sorted(os.listdir(src))), "corpus")))
    err = capsys.readouterr().err
    if changed:
      assert calls == {"scan": tasks, "tokenize": tasks, "train": 1} and "resuming" not in err
      assert manifest["sha256"] != reference["sha256"]
      shutil.rmtree(out)
      continue
    assert tasks > 6 and calls == {"scan": 0, "tokenize": tasks - 3, "train": 0}, calls
    assert f"held-out split and tokenizer kept, 3 of {tasks} task(s) already tokenised" in err
    assert manifest["sha256"] == reference["sha256"] and manifest["splits"] == reference["splits"]
    for name in ("tokenizer.model", "train.unigram", "heldout.unigram"):
      with open(os.path.join(out, name), "rb") as a, open(tmp_path / "reference" / name, "rb") as b:
        assert a.read() == b.read(), name
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "reference"))
    shutil.rmtree(out)
  # stopped in its scan (after 3 tasks): the same build again scans only the others, and trains the same tokenizer
  # from the kept tasks' sample candidates and the new ones'
  with open(os.path.join(src, "heapq.py"), "w") as f:
    f.write(original)
  calls.update(scan=0, tokenize=0, train=0)
  monkeypatch.setattr(build, "_scan_task", counted("scan", scan, stop_after=3))
  with pytest.raises(KeyboardInterrupt):
    build_dataset("text_files", out, 400, source=src, build_workers=1)
  capsys.readouterr()
  calls.update(scan=0, tokenize=0, train=0)
  monkeypatch.setattr(build, "_scan_task", counted("scan", scan))
  manifest = build_dataset("text_files", out, 400, source=src, build_workers=1)
  assert calls == {"scan": tasks - 3, "tokenize": tasks, "train": 1}, calls
  assert f"it stopped in its scan: 3 of {tasks} task(s) already scanned" in capsys.readouterr().err
  assert manifest["sha256"] == reference["sha256"] and manifest["splits"] == reference["splits"]
  with open(os.path.join(out, "tokenizer.model"), "rb") as a, \
      open(tmp_path / "reference" / "tokenizer.model", "rb") as b:
    assert a.read() == b.read()

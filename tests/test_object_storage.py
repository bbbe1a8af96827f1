"""A workdir in a bucket: train, checkpoint, resume and evaluate with `--workdir s3://bucket/run` against a real
S3-compatible server (moto's server mode, started here on localhost), and a clear error for a bucket that cannot
be reached. The server is conftest's `s3_endpoint`; the tests that take conftest's `bucket` run on a local GCS
server too (`gcs_endpoint`), and test_gcs_run.py trains and resumes a run in it."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import (bucket_endpoint, compilation_cache_entries, stop_tokenising_after, upload_files, write_corpus,
                      write_stand_in_dataset)

# A resumed run and an evaluation read the programs the run before them compiled from JAX's cache.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_train_resume_and_evaluate_with_the_workdir_and_data_in_a_bucket(s3_endpoint, load_tiny, tmp_path,
                                                                          monkeypatch):
  """Workdir, data.source and data.dir all in the bucket: the build streams the same documents a local build of
  the same files reads (same content digest, same tokenizer); train, resume, and evaluate from a fresh dataset
  cache, reading the held-out rows in the bucket, on the same held-out set. The resumed run's logs never close (as
  under a SIGKILL after its last save): its saves uploaded its metrics."""
  from etils import epath
  from diffgemma_jax.train import logging as run_logging

  from diffgemma_jax.evaluate import evaluate
  from diffgemma_jax.train import train
  from diffgemma_jax.train.dataset import prepare_dataset
  from diffgemma_jax.train.history import read_history
  from diffgemma_jax.train.listing import list_run
  from diffgemma_jax.train.rollback import roll_back
  local_dir, _ = prepare_dataset(load_tiny())  # the session's local build of the tiny corpus
  sources = upload_files(str(load_tiny().data.source), "s3://runs/corpus")
  workdir = "s3://runs/tiny"
  # one schedule horizon for the run and its resumption: one train step program, compiled once (compilation_cache)
  overrides = {"train.num_steps": "4", "train.schedule_steps": "6", "checkpoint.every_steps": "2",
               "eval.every_steps": "0", "data.source": "s3://runs/corpus", "data.dir": "s3://runs/data",
               "data.cache_dir": str(tmp_path / "cache")}
  first = train(load_tiny(overrides), workdir, show_progress=False)
  assert first["final_step"] == 4 and first["checkpoint_dir"] == "s3://runs/tiny/checkpoints"
  root = epath.Path(workdir)
  assert sorted(p.name for p in (root / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert (root / "tokenizer.model").is_file() and (root / "checkpoints" / "4" / "file_sizes.json").is_file()
  manifest = json.loads(epath.Path("s3://runs/data/manifest.json").read_text())
  with open(os.path.join(local_dir, "manifest.json")) as f:
    local_manifest = json.load(f)
  assert sorted(manifest["files"]) == sources
  assert manifest["sha256"] == local_manifest["sha256"] and manifest["splits"] == local_manifest["splits"]
  with open(os.path.join(local_dir, "tokenizer.model"), "rb") as f:
    assert epath.Path("s3://runs/data/tokenizer.model").read_bytes() == f.read()
  with monkeypatch.context() as m:
    m.setattr(run_logging._StagedLogs, "close", lambda self: None)  # what a kill after the last save leaves
    resumed = train(load_tiny(dict(overrides, **{"train.num_steps": "6", "train.profile_steps": "(5, 5)"})),
                    workdir, show_progress=False)
  assert resumed["start_step"] == 4 and resumed["final_step"] == 6
  # The profile of step 5, written locally by the profiler, is uploaded beside the TensorBoard scalars.
  traces = [p for p in (root / "tb" / "plugins" / "profile").iterdir()]
  assert len(traces) == 1 and any(p.name.endswith(".xplane.pb") for p in traces[0].iterdir())
  assert not os.path.exists("s3:")  # nothing written to a local folder named after the URL
  records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert sorted(r["step"] for r in records if "train/loss" in r) == list(range(1, 7))
  assert [r["start_step"] for r in read_history(workdir)] == [0, 4]
  listing = list_run(workdir)  # diffgemma-inspect --workdir: listings and small files, read in the bucket
  assert [s["step"] for s in listing["steps"]] == [2, 4, 6] and listing["latest_step"] == 6
  assert all(s["damage"] is None and s["bytes"] > 10_000 for s in listing["steps"])
  assert ["bits_per_token" in s for s in listing["steps"]] == [False, True, True]  # each run's last step evaluated
  assert [s["start_step"] for s in listing["starts"]] == [0, 4] and listing["tokenizer_pinned"]
  # evaluated from a fresh cache, the token shards read in the bucket (data.stream_tokens): none copied
  fresh_cache = {"train.num_steps": "6", "data.cache_dir": str(tmp_path / "fresh-cache"), "data.stream_tokens": "True"}
  result = evaluate(load_tiny(dict(overrides, **fresh_cache)), workdir)
  assert result["step"] == 6 and result["bits_per_token"] == pytest.approx(resumed["eval"]["bits_per_token"],
                                                                           rel=1e-6)
  assert os.listdir(tmp_path / "fresh-cache") == os.listdir(tmp_path / "cache")  # one folder per URL
  copied = [f for d, _, files in os.walk(tmp_path / "fresh-cache") for f in files]
  assert "remote.json" in copied and "tokenizer.model" in copied and not any(f.endswith(".tokens") for f in copied)
  roll_back(workdir, 4, skip_batches=2)  # diffgemma-rollback renames in the bucket
  listing = list_run(workdir)
  assert [s["step"] for s in listing["steps"]] == [2, 4] and [o["name"] for o in listing["other"]] == ["6.rolled-back"]
  assert listing["rollback"]["skip_batches"] == 2 and (root / "checkpoints" / "6.rolled-back" / "params").is_dir()


def test_a_folder_moves_within_a_bucket(bucket, tmp_path):
  """`storage.rename_folder` (a step set aside as damaged or rolled back) in each store: every object, nested ones
  too, under the new prefix with its bytes, none left under the old (checked with a client of the store's own)."""
  import fsspec
  from diffgemma_jax.storage import rename_folder
  local = tmp_path / "step"
  (local / "params" / "d").mkdir(parents=True)
  files = {"_CHECKPOINT_METADATA": b"m", "params/manifest.ocdbt": b"x" * 100, "params/d/0": b"y" * 7}
  for name, data in files.items():
    (local / name).write_bytes(data)
  fs, prefix = fsspec.core.url_to_fs(f"{bucket}/moves", skip_instance_cache=True)
  for name in files:
    fs.put_file(str(local / name), f"{prefix}/24/{name}")
  rename_folder(f"{bucket}/moves/24", f"{bucket}/moves/24.rolled-back")
  fs.invalidate_cache()
  assert sorted(name[len(prefix) + 1:] for name in fs.find(prefix)) == sorted(f"24.rolled-back/{n}" for n in files)
  for name, data in files.items():
    assert fs.cat_file(f"{prefix}/24.rolled-back/{name}") == data


def test_an_unreachable_bucket_fails_in_one_line(bucket, tiny_config_file, capsys, tmp_path):
  from launch.evaluate import main as eval_main
  from launch.train import main as train_main
  missing = bucket.replace("://runs", "://no-such-bucket")
  unreachable = f"the bucket {missing} cannot be reached (endpoint {bucket_endpoint(bucket)})"
  for main in (train_main, eval_main):
    assert main(["--config", tiny_config_file, "--workdir", f"{missing}/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --workdir {missing}/run: {unreachable}") and err.count("\n") == 1, err
  local = ["--workdir", str(tmp_path / "run"), "--config.data.dir", str(tmp_path / "data")]
  for key, value, message in (
      ("data.dir", f"{missing}/data", f"data.dir {missing}/data: {unreachable}"),
      ("data.source", f"{missing}/corpus", f"data.source {missing}/corpus: {unreachable}"),
      ("data.source", f"{bucket}/no-such-corpus", f"data.source '{bucket}/no-such-corpus' does not exist")):
    assert train_main(["--config", tiny_config_file, *local, f"--config.{key}", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_import_and_export_outputs_in_a_bucket(bucket, tmp_path, capsys):
  """diffgemma-export into a bucket writes the files a local export writes; diffgemma-import from that bucket folder
  into the bucket gives a workdir whose checkpoint restores to the same parameters, pins the folder's tokenizer and
  writes a config file (into the bucket too) that names it."""
  import jax
  import numpy as np
  from etils import epath

  from diffgemma_jax.hf.export_hf import export_hf, restore_pure_params
  from test_hf import CONTEXT, TINY, _pure, _random_model
  pure = _pure(_random_model(TINY))
  export_hf(TINY, pure, str(tmp_path / "hf"), context=CONTEXT, canvas_length=16, log=lambda _: None)
  export_hf(TINY, pure, f"{bucket}/hf", context=CONTEXT, canvas_length=16, log=lambda _: None)
  local = sorted(os.listdir(tmp_path / "hf"))
  assert sorted(p.name for p in epath.Path(f"{bucket}/hf").iterdir()) == local
  for name in local:
    assert epath.Path(f"{bucket}/hf", name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
  epath.Path(f"{bucket}/hf/tokenizer.model").write_bytes(b"the checkpoint's tokenizer")
  from launch.import_hf import main as import_main
  assert import_main(["--hf", f"{bucket}/hf", "--output", f"{bucket}/imported", "--config-out",
                      f"{bucket}/configs/imported.py"]) == 0, capsys.readouterr().err
  assert epath.Path(f"{bucket}/imported/tokenizer.model").read_bytes() == b"the checkpoint's tokenizer"
  config_text = epath.Path(f"{bucket}/configs/imported.py").read_text()
  assert f"c.data.tokenizer = '{bucket}/hf/tokenizer.model'" in config_text
  assert config_text.startswith(f'"""DiffusionGemma imported from {bucket}/hf by diffgemma-import."""')
  step, restored = restore_pure_params(f"{bucket}/imported", TINY)
  assert step == 0
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(pure), jax.tree_util.tree_leaves_with_path(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_dataset_cache_fetches_once_and_refetches_a_damaged_copy(bucket, tmp_path, monkeypatch):
  from diffgemma_jax import storage
  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.errors import ConfigError
  local = tmp_path / "dataset"
  (local / "train").mkdir(parents=True)
  (local / "train" / "00000.tokens").write_bytes(bytes(range(256)) * 3)
  (local / "tokenizer.model").write_bytes(b"not really a model")
  (local / "manifest.json").write_text('{"recipe": "test"}')
  remote_dataset.upload(str(local), f"{bucket}/cached")
  fetched = []
  real_download = storage.download
  monkeypatch.setattr(storage, "download", lambda url, *a, **k: fetched.append(url) or real_download(url, *a, **k))
  cache = str(tmp_path / "cache")
  copy = remote_dataset.fetch(f"{bucket}/cached", cache)
  assert sorted(fetched) == [f"{bucket}/cached/tokenizer.model", f"{bucket}/cached/train/00000.tokens"]
  for rel in ("train/00000.tokens", "tokenizer.model", "manifest.json"):
    assert open(os.path.join(copy, rel), "rb").read() == (local / rel).read_bytes(), rel
  fetched.clear()
  assert remote_dataset.fetch(f"{bucket}/cached", cache) == copy and fetched == []
  with open(os.path.join(copy, "train", "00000.tokens"), "r+b") as f:
    f.truncate(100)  # a copy cut short
  assert remote_dataset.fetch(f"{bucket}/cached", cache) == copy
  assert fetched == [f"{bucket}/cached/train/00000.tokens"]
  tokens = (local / "train" / "00000.tokens").read_bytes()
  assert open(os.path.join(copy, "train", "00000.tokens"), "rb").read() == tokens
  import concurrent.futures  # processes sharing a host fetch into one cache at once: each file lands whole
  shared = str(tmp_path / "shared-cache")
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    copies = list(pool.map(lambda _: remote_dataset.fetch(f"{bucket}/cached", shared), range(4)))
  assert len(set(copies)) == 1 and sorted(os.listdir(os.path.join(copies[0], "train"))) == ["00000.tokens"]
  assert open(os.path.join(copies[0], "train", "00000.tokens"), "rb").read() == tokens
  from etils import epath
  epath.Path(f"{bucket}/cached/tokenizer.model").write_bytes(b"NOT really a model")  # same size, other bytes
  with pytest.raises(ConfigError, match="does not match its recorded sha256"):
    remote_dataset.fetch(f"{bucket}/cached", str(tmp_path / "other-cache"))


def test_init_checkpoint_in_a_bucket_from_a_fresh_process(bucket, load_tiny):
  """init.checkpoint in a bucket: its parameters restore in a process where no Checkpointer has set Orbax up for
  object storage (diffgemma-eval --checkpoint, or a fine-tune's first start), and an SFT recipe reads its run's
  tokenizer from there."""
  import subprocess
  import sys
  import textwrap

  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath

  from diffgemma_jax import storage
  from diffgemma_jax.train.dataset import checked_data_tokenizer, prepare_dataset, tokenizer_source
  # a step committed in the bucket as the trainer's Checkpointer commits one (an Orbax manager, commit markers)
  options = ocp.CheckpointManagerOptions(temporary_path_class=storage.temporary_path_class(f"{bucket}/init"))
  with ocp.CheckpointManager(f"{bucket}/init/checkpoints", options=options, item_names=("params",)) as saver:
    saver.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.arange(6, dtype=np.float32)})))
    saver.wait_until_finished()
  read = textwrap.dedent("""
      import sys, jax, numpy as np
      from diffgemma_jax.train.reading import INIT, open_run
      run = open_run(sys.argv[1], key=INIT)
      params = run.restore_pure_params({"w": jax.ShapeDtypeStruct((6,), np.float32)})
      print(run.step_dir, run.step, run.run_dir, sorted(run.saved_params()), np.asarray(params["w"]).tolist())
  """)
  done = subprocess.run([sys.executable, "-c", read, f"{bucket}/init"], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert done.stdout.strip().splitlines()[-1:] == [f"{bucket}/init/checkpoints/3 3 {bucket}/init ['w'] "
                                                   "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]"], done.stderr[-2000:]
  tokenizer = os.path.join(prepare_dataset(load_tiny())[0], "tokenizer.model")  # built once per session
  epath.Path(f"{bucket}/init/tokenizer.model").write_bytes(open(tokenizer, "rb").read())
  local = tokenizer_source(load_tiny({"data.recipe": "jsonl", "data.source": "unused.jsonl",
                                      "init.checkpoint": f"{bucket}/init"}))
  assert open(local, "rb").read() == open(tokenizer, "rb").read()
  data_tokenizer = checked_data_tokenizer(f"{bucket}/init/tokenizer.model")  # data.tokenizer in a bucket
  assert open(data_tokenizer, "rb").read() == open(tokenizer, "rb").read()


def test_a_mixture_of_datasets_in_buckets(bucket, load_tiny, tmp_path):
  """data.mixture of bucket URLs reads each dataset through the cache (its token shards in the bucket:
  data.stream_tokens) and names its held-out set by its URL."""
  import numpy as np

  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.train.dataset import eval_batches, eval_sets, prepare_dataset
  local_dir, _ = prepare_dataset(load_tiny())  # built once per session
  for name in ("mix-a", "mix-b"):
    remote_dataset.upload(local_dir, f"{bucket}/{name}")
  config = load_tiny({"data.source": "", "data.dir": "", "data.cache_dir": str(tmp_path / "cache"),
                      "data.mixture": f"{bucket}/mix-a:0.7,{bucket}/mix-b:0.3", "data.stream_tokens": "True"})
  directory, tokenizer = prepare_dataset(config)
  assert directory.startswith(str(tmp_path / "cache")) and tokenizer.vocab_size == config.model.vocab_size
  assert directory.endswith("-stream") and os.path.isfile(os.path.join(local_dir, "train", "00000.tokens"))
  assert not [f for _, _, files in os.walk(directory) for f in files if f.endswith(".tokens")]
  sets = eval_sets(config, directory)
  assert [(name, weight) for name, weight, _ in sets] == [(f"{bucket}/mix-a", 0.7), (f"{bucket}/mix-b", 0.3)]
  expected = eval_batches(config, local_dir)
  for _, _, batches in sets:
    for got, want in zip(batches, expected, strict=True):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_sft_jsonl_source_in_a_bucket(bucket, load_tiny, tmp_path):
  """The jsonl recipe reads data.source objects (a folder of them) as it reads local files; records are named by
  their URL and line."""
  from data_recipes import jsonl
  from diffgemma_jax.data.manifest import read_records
  from diffgemma_jax.train.dataset import prepare_dataset
  tokenizer = os.path.join(prepare_dataset(load_tiny())[0], "tokenizer.model")  # built once per session
  folder = tmp_path / "sft"
  folder.mkdir()
  with open(folder / "chats.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"prompt": f"what is {i} + {i}?", "response": f"{2 * i}"}) + "\n")
  sources = upload_files(str(folder), f"{bucket}/sft")
  jsonl.build(str(tmp_path / "local"), source=str(folder), tokenizer=tokenizer)
  manifest = jsonl.build(str(tmp_path / "remote"), source=f"{bucket}/sft", tokenizer=tokenizer)
  assert sorted(manifest["files"]) == sources

  def records(directory):
    return [r for split in ("train", "heldout") for r in read_records(directory, split)]

  def by_line(rows):
    return sorted((r["source"].rsplit(":", 1)[1], json.dumps({k: v for k, v in r.items() if k != "source"},
                                                              sort_keys=True)) for r in rows)

  local, remote = records(str(tmp_path / "local")), records(str(tmp_path / "remote"))
  assert by_line(remote) == by_line(local) and len(remote) == 40
  assert all(r["source"].startswith(f"{bucket}/sft/chats.jsonl:") for r in remote)


def test_storage_helpers_on_objects_another_process_wrote(bucket, tmp_path, monkeypatch):
  """What data and entry points reach buckets through (diffgemma_jax.storage), on objects another client wrote after
  this process had listed the bucket: found, listed, sized, read whole, by seek and by exact byte range, stamped
  (a rewrite of the same size changes the stamp and the local copy), and a folder refused as an output file."""
  import hashlib

  from diffgemma_jax import storage
  from diffgemma_jax.errors import ConfigError
  data = bytes(range(256)) * 40
  (tmp_path / "objects" / "sub").mkdir(parents=True)
  (tmp_path / "objects" / "a.bin").write_bytes(data)
  (tmp_path / "objects" / "b.txt").write_text("bee")
  (tmp_path / "objects" / "sub" / "c.txt").write_text("sea")
  storage.check_reachable(f"{bucket}/helpers", "--workdir")  # lists the bucket before the folder exists
  url = f"{bucket}/helpers"
  upload_files(str(tmp_path / "objects"), url)
  upload_files(str(tmp_path / "objects" / "sub"), f"{url}/sub")
  a = f"{url}/a.bin"
  assert storage.find_files(url, "data.source") == [a, f"{url}/b.txt", f"{url}/sub/c.txt"]
  assert storage.find_files(f"{url}/*.txt", "data.source") == [f"{url}/b.txt"]
  assert storage.find_files(a, "data.source") == [a]
  with pytest.raises(ConfigError, match=f"data.source '{url}/nothing' does not exist"):
    storage.find_files(f"{url}/nothing", "data.source")
  assert storage.folder_sizes(url) == {"a.bin": len(data), "b.txt": 3, "sub/c.txt": 3}
  # Within remembered_listings (a build's planning) what find_files listed answers file_size and stamp, the same
  # values the store gives one object at a time, without a request each
  want = {u: (storage.stamp(u), storage.file_size(u)) for u in storage.find_files(url, "data.source")}
  fs, asked = storage.filesystem(url)[0], []
  info = fs.info
  monkeypatch.setattr(fs, "info", lambda *args, **kwargs: asked.append(args) or info(*args, **kwargs))
  find, listings = fs.find, []
  monkeypatch.setattr(fs, "find", lambda *args, **kwargs: listings.append(args) or find(*args, **kwargs))
  with storage.remembered_listings():
    for source in (url, f"{url}/*.txt", url):  # the folder asked twice (a check, then the build): listed once
      found = storage.find_files(source, "data.source")
      assert {u: (storage.stamp(u), storage.file_size(u)) for u in found} == {u: want[u] for u in found}
    assert asked == [] and len(listings) == 1
  assert storage.stamp(a) == want[a][0] and len(asked) == 1  # outside it, the store is asked
  monkeypatch.setattr(fs, "info", info)
  assert (storage.file_size(a), storage.file_size(f"{url}/missing.bin"), storage.file_size(url)) == (len(data), None,
                                                                                                  None)
  assert storage.file_sha256(a) == hashlib.sha256(data).hexdigest()
  assert storage.read_range(a, 100, 300) == data[100:300] and storage.read_range(a, 5, 5) == b""
  assert storage.read_range(a, len(data) - 40, len(data) + 100) == data[-40:]
  with storage.open_binary(a) as f:
    f.seek(5000)
    assert f.read(10) == data[5000:5010]
  size, version = storage.stamp(a)
  assert size == len(data) and version
  with open(storage.local_file(a), "rb") as f:
    assert f.read() == data
  (tmp_path / "objects" / "a.bin").write_bytes(data[::-1])  # rewritten, same size
  upload_files(str(tmp_path / "objects"), url)
  assert storage.stamp(a)[0] == size and storage.stamp(a)[1] != version
  with open(storage.local_file(a), "rb") as f:
    assert f.read() == data[::-1]
  with pytest.raises(ConfigError, match=f"--output {url} is a directory; give a file path"):
    storage.check_writable(url, "--output")


def test_record_files_stream_from_a_bucket_as_they_read_locally(bucket, tmp_path):
  """JSONL (in byte-range spans), JSONL.gz and Parquet objects give the documents, identities and spans the same
  local files give."""
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq

  from diffgemma_jax.data.sources import file_spans, read_documents
  folder = tmp_path / "records"
  folder.mkdir()
  lines = [json.dumps({"text": f"document {i} " + "word " * (i % 7)}) for i in range(200)]
  (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
  with gzip.open(folder / "b.jsonl.gz", "wt") as f:
    f.write("\n".join(lines[:50]) + "\n")
  pq.write_table(pa.table({"text": [f"row {i}" for i in range(300)]}), folder / "c.parquet", row_group_size=64)
  upload_files(str(folder), f"{bucket}/records")
  for name in ("a.jsonl", "b.jsonl.gz", "c.parquet"):
    local_spans = file_spans(str(folder), name, 1024)
    assert file_spans(f"{bucket}/records", name, 1024) == local_spans
    assert len(local_spans) == 1 if name.endswith(".gz") else len(local_spans) > 1
    for span in local_spans:
      assert (list(read_documents(f"{bucket}/records", name, span=span))
              == list(read_documents(str(folder), name, span=span))), (name, span)


def test_spans_of_objects_fetch_their_own_bytes(s3_endpoint, tmp_path):
  """Reading a JSONL object span by span fetches each byte once (one ranged request per span); a Parquet object's
  row groups fetch their own bytes (their column chunks, exactly) and the 64 KB pyarrow reads at the file's end as
  it opens it. Reading through the store
  client's buffered files fetched its 50 MB block from every span's start: 200x the JSONL object here, 12x a
  corpus over a real build. Counted at s3fs's two fetches (a buffered file's range, a ranged `cat_file`)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  from diffgemma_jax.data.sources import file_spans, read_documents
  folder = tmp_path / "records"
  folder.mkdir()
  text = open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read()
  (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(60)))
  pq.write_table(pa.table({"text": [f"{i} {text}" for i in range(60)]}), folder / "b.parquet", row_group_size=6,
                 compression="none")
  upload_files(str(folder), "s3://runs/spans")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
  from benchlib import counted_s3_fetches  # (bench/bucket_reads.py counts with it too)
  with counted_s3_fetches() as fetched:
    for name, footer in (("a.jsonl", 0), ("b.parquet", 1 << 16)):  # pyarrow reads a file's last 64 KB as it opens
      size = os.path.getsize(folder / name)
      spans = file_spans(str(folder), name, size // 10)
      fetched.clear()
      documents = [doc for span in spans for doc in read_documents("s3://runs/spans", name, span=span)]
      assert len(spans) >= 8 and len(documents) == 60
      assert size * 0.9 < sum(fetched) <= size + len(spans) * footer, (name, sum(fetched), size)
      assert name.endswith(".parquet") or len(fetched) == len(spans)


def test_lines_of_an_object_are_read_through_a_buffer(s3_endpoint, tmp_path, monkeypatch):
  """Iterating the lines of an object (a --records or --prompts file, a JSONL source's plan) asks the store client's
  file for about the object's bytes once: an fsspec file's own readline reads a whole block out of its cache per
  line and seeks back (here 2,000 lines: the rest of the object each, 1,000x its size)."""
  import fsspec.spec

  from diffgemma_jax import storage
  lines = [json.dumps({"prompt": f"def f{i}(x):", "continuation": " return x"}) + "\n" for i in range(2000)]
  (tmp_path / "records.jsonl").write_text("".join(lines))
  upload_files(str(tmp_path), "s3://runs/lines")
  size, handed = os.path.getsize(tmp_path / "records.jsonl"), []
  read = fsspec.spec.AbstractBufferedFile.read
  monkeypatch.setattr(fsspec.spec.AbstractBufferedFile, "read", lambda self, *a: handed.append(len(r := read(
      self, *a))) or r)
  with storage.open_binary("s3://runs/lines/records.jsonl") as f:
    assert [line.decode() for line in f] == lines
  assert size <= sum(handed) <= size + (1 << 20), (sum(handed), size)


def test_eval_generate_and_score_read_and_write_files_in_a_bucket(s3_endpoint, trained_run, tiny_config_file,
                                                                   capsys, no_compilation_cache, monkeypatch):
  """--prompts and --records objects are read as local files are; each --output object holds the JSON printed.
  (On S3 only, for CI time: in GCS, test_gcs_run.py writes eval's --output, and the objects these flags name are
  read and written through the storage helpers that test_storage_helpers_on_objects_another_process_wrote[gs]
  checks.) Each entry point puts what it compiles into the compilation cache its config names, here a bucket
  folder (the cache is turned off before each, as in a new process)."""
  from etils import epath

  from launch.evaluate import main as eval_main
  from launch.generate import main as generate_main
  from launch.score import main as score_main
  _, workdir, _ = trained_run
  bucket = "s3://runs"
  cache = f"{bucket}/jax-cache-readers"
  run = ["--config", tiny_config_file, "--workdir", workdir, "--config.train.num_steps=24",
         f"--config.compilation.cache_dir={cache}", "--config.compilation.min_compile_time_s=0"]
  cached = [set()]

  def cache_grew() -> bool:
    cached.append(compilation_cache_entries(cache))
    no_compilation_cache()
    return cached[-1] > cached[-2]

  assert eval_main(run + ["--output", f"{bucket}/out/bound.json"]) == 0 and cache_grew()
  printed = json.loads(capsys.readouterr().out)
  assert printed["step"] == 24 and json.loads(epath.Path(f"{bucket}/out/bound.json").read_text()) == printed
  epath.Path(f"{bucket}/in/prompts.txt").write_text("def main(\nx = 1\\nprint(\n\n")
  assert generate_main(run + ["--prompts", f"{bucket}/in/prompts.txt", "--gen_length", "8", "--block_length", "8",
                              "--batch_size", "2", "--json", "--output", f"{bucket}/out/completions.json"]) == 0
  assert cache_grew()
  printed = json.loads(capsys.readouterr().out)
  assert [r["prompt"] for r in printed] == ["def main(", "x = 1\nprint("]
  assert json.loads(epath.Path(f"{bucket}/out/completions.json").read_text()) == printed
  # Two copies of a launch with a results file in the bucket: copy 1's share goes up as chunks (one per batch
  # here) into its part, process 0 gathers it; the object ends whole, in order, with the one-process results, and
  # no part or chunk is left
  import launch.common
  from diffgemma_jax.sampling import results_file
  monkeypatch.setattr(results_file, "UPLOAD_EVERY_S", 0.0)
  uploads = []
  upload = results_file.ResultsFile._upload
  monkeypatch.setattr(results_file.ResultsFile, "_upload", lambda self: uploads.append(self.path) or upload(self))
  split = f"{bucket}/out/split.jsonl"
  for copy in (1, 0):
    monkeypatch.setattr(launch.common, "launch_process", lambda config=None, copy=copy: (copy, 2))
    assert generate_main(run + ["--prompts", f"{bucket}/in/prompts.txt", "--gen_length", "8", "--block_length",
                                "8", "--batch_size", "2", "--json", "--output", split]) == 0
  assert uploads[0] == results_file.part_path(split, 1, 2)  # copy 1 uploaded a chunk of its part
  joined = json.loads(capsys.readouterr().out)
  keys = ("index", "prompt", "ids", "completion", "gen_length")
  assert [{k: r[k] for k in keys} for r in joined] == [{k: r[k] for k in keys} for r in printed]
  assert [json.loads(line)["index"] for line in epath.Path(split).read_text().splitlines()] == [0, 1]
  assert sorted(p.name for p in epath.Path(f"{bucket}/out").iterdir()) == ["bound.json", "completions.json",
                                                                            "split.jsonl"]
  pairs = (("def f(", "x):"), ("import", " os"))
  epath.Path(f"{bucket}/in/pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n"
                                                            for p, c in pairs))
  assert score_main(run + ["--records", f"{bucket}/in/pairs.jsonl", "--output", f"{bucket}/out/scores.json"]) == 0
  assert cache_grew()
  written = json.loads(epath.Path(f"{bucket}/out/scores.json").read_text())
  assert [r["source"] for r in written["records"]] == [f"{bucket}/in/pairs.jsonl:1", f"{bucket}/in/pairs.jsonl:2"]
  assert capsys.readouterr().out.splitlines()[-1].startswith(f"total: {written['summary']['nll']:.3f} nats")


def test_bucket_paths_of_the_entry_points_fail_in_one_line(bucket, tiny_config_file, tmp_path, capsys):
  """A missing bucket or object named by a user path fails naming the flag, in one line, before any work."""
  from etils import epath

  from launch.evaluate import main as eval_main
  from launch.export_hf import main as export_main
  from launch.generate import main as generate_main
  from launch.import_hf import main as import_main
  from launch.score import main as score_main
  epath.Path(f"{bucket}/folder/file.json").write_text("{}")
  run = ["--config", tiny_config_file, "--workdir", str(tmp_path / "no-run")]
  missing = bucket.replace("://runs", "://no-such-bucket")
  unreachable = f"the bucket {missing} cannot be reached (endpoint {bucket_endpoint(bucket)})"
  cases = (
      (eval_main, run + ["--output", f"{missing}/x.json"], f"--output {missing}/x.json: {unreachable}"),
      (eval_main, run + ["--output", f"{bucket}/folder"], f"--output {bucket}/folder is a directory; give a file path"),
      (generate_main, run + ["--prompts", f"{bucket}/no-such-prompts.txt"],
       f"--prompts {bucket}/no-such-prompts.txt cannot be read: no such object"),
      (generate_main, run + ["--prompt", "x", "--output", f"{missing}/g.json"],
       f"--output {missing}/g.json: {unreachable}"),
      (score_main, run + ["--records", f"{missing}/r.jsonl"], f"--records {missing}/r.jsonl: {unreachable}"),
      (import_main, ["--hf", f"{missing}/hf", "--output", str(tmp_path / "w")], f"--hf {missing}/hf: {unreachable}"),
      (import_main, ["--hf", f"{bucket}/folder", "--output", str(tmp_path / "w")],
       f"--hf {bucket}/folder: no config.json"),
      (import_main, ["--hf", f"{bucket}/folder", "--output", str(tmp_path / "w"), "--config-out", f"{missing}/c.py"],
       f"--config-out {missing}/c.py: {unreachable}"),
      (export_main, run + ["--output", f"{missing}/hf"], f"--output {missing}/hf: {unreachable}"))
  for main, argv, message in cases:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, (argv, err)


def test_a_failed_process_0_bucket_build_fails_the_waiting_processes_at_once(bucket, tmp_path):
  """Two processes as two threads meeting at a real barrier: the waiting one fails with process 0's message
  within a poll, not at a timeout; a failure left by an earlier run does not fail the next one, which fetches
  what process 0 built."""
  import concurrent.futures
  import threading
  import time

  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.errors import DataError

  def build(folder):
    write_stand_in_dataset(folder, bytes(range(64)), "test")

  def broken(folder):
    raise DataError("data.source corpus/: no files\nmatch")

  def run(process_build, folder="shared", stream=False):
    meet = threading.Barrier(2, timeout=60).wait
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      futures = [pool.submit(remote_dataset.build_shared, f"{bucket}/{folder}", str(tmp_path / f"cache-{p}"),
                             process_build, process_index=p, barrier=lambda _: meet(), stale_s=30, poll_s=0.05,
                             stream=stream)
                 for p in (0, 1)]
      return [f.exception() or f.result() for f in futures]

  start = time.monotonic()
  failed_0, failed_1 = run(broken)
  assert time.monotonic() - start < 10
  assert isinstance(failed_0, DataError) and str(failed_0) == "data.source corpus/: no files\nmatch"
  assert isinstance(failed_1, DataError) and str(failed_1) == (f"data.dir {bucket}/shared: the dataset build failed "
                                                               "on process 0: data.source corpus/: no files match")
  local_0, local_1 = run(build)  # the failure of the run before is not this run's
  assert local_0 != local_1 and local_1.startswith(str(tmp_path / "cache-1"))
  for local in (local_0, local_1):
    assert open(os.path.join(local, "train", "00000.tokens"), "rb").read() == bytes(range(64))
    assert sorted(os.listdir(local)) == ["manifest.json", "train"]
  # data.stream_tokens: process 0 builds a token store and both read its rows in the bucket, none copied
  import numpy as np

  from diffgemma_jax.data.store import open_split
  want = _write_store(str(tmp_path / "reference"))
  for local in run(_write_store, "shared-stream", stream=True):
    assert local.endswith("-stream") and sorted(os.listdir(local)) == ["manifest.json", "remote.json"]
    store, reference = open_split(local, want, "train"), open_split(str(tmp_path / "reference"), want, "train")
    rows = range(reference.num_rows(32, False))
    assert store.tokens_url == f"{bucket}/shared-stream"
    np.testing.assert_array_equal(store.rows(rows, 32)["tokens"], reference.rows(rows, 32)["tokens"])


def test_waiting_processes_follow_process_0_heartbeats_and_fail_when_they_stop(s3_endpoint, tmp_path):
  """A build that takes longer than the staleness limit does not fail the waiting process while process 0 beats
  (every 0.1 s; the limit 1.5 s: a loaded CI machine once left a 0.5 s gap between two beats to moto); a process 0
  that died mid-build (its last beat left in the bucket, nothing after) fails it once the limit
  passes, naming the beat, not an hour later and not never."""
  import concurrent.futures
  import threading
  import time

  from etils import epath

  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.errors import DataError

  def slow_build(folder):
    time.sleep(4.5)  # three times stale_s: only the beats keep the other process waiting
    write_stand_in_dataset(folder, bytes(range(8)), "slow")

  meet = threading.Barrier(2, timeout=60).wait
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(remote_dataset.build_shared, "s3://runs/slow", str(tmp_path / f"cache-{p}"), slow_build,
                           process_index=p, barrier=lambda _: meet(), poll_s=0.05, heartbeat_s=0.1, stale_s=1.5)
               for p in (0, 1)]
    local_0, local_1 = [f.result() for f in futures]
  assert open(os.path.join(local_1, "train", "00000.tokens"), "rb").read() == bytes(range(8))

  status = epath.Path("s3://runs/dead/" + remote_dataset.STATUS_FILE)
  status.write_text('{"building": true, "beat": 7}')  # process 0's last word before it was killed
  start = time.monotonic()
  with pytest.raises(DataError, match=r"data\.dir s3://runs/dead: process 0 has stopped reporting on the dataset "
                                      r"build: its last beat \(7\) in build-status\.json, nothing new for 1 s"):
    remote_dataset.build_shared("s3://runs/dead", str(tmp_path / "cache-dead"), slow_build, process_index=1,
                                barrier=lambda _: None, poll_s=0.05, stale_s=1.0)
  assert time.monotonic() - start < 10


def test_dataset_cache_is_pruned_to_data_cache_max_gb(s3_endpoint, load_tiny, tmp_path, monkeypatch):
  """After a fetch the least recently used copies go until the cache fits, never one this process reads; a file
  two copies share (hard-linked by a rebuild) counts once."""
  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="data.cache_max_gb: must be >= 0, got -1"):
    load_tiny({"data.cache_max_gb": "-1"})
  for name in ("a", "b", "c"):
    local = tmp_path / "datasets" / name
    (local / "train").mkdir(parents=True)
    (local / "train" / "00000.tokens").write_bytes(bytes(1000))
    (local / "manifest.json").write_text(f'{{"recipe": "{name}"}}')  # 15 bytes
    remote_dataset.upload(str(local), f"s3://runs/lru-{name}")
  cache, one_copy = str(tmp_path / "cache"), 1015
  monkeypatch.setattr(remote_dataset, "_IN_USE", set())
  a, b = (remote_dataset.fetch(f"s3://runs/lru-{n}", cache) for n in "ab")
  os.utime(a, (1000, 1000))
  os.utime(b, (2000, 2000))
  monkeypatch.setattr(remote_dataset, "_IN_USE", set())  # a later run: it reads a, then c
  assert remote_dataset.fetch("s3://runs/lru-a", cache, max_bytes=2 * one_copy) == a  # used: now the newest
  c = remote_dataset.fetch("s3://runs/lru-c", cache, max_bytes=2 * one_copy)
  assert os.path.isdir(a) and not os.path.exists(b) and os.path.isdir(c)
  assert not os.path.exists(os.path.dirname(b))  # its URL's folder went with its last copy
  monkeypatch.setattr(remote_dataset, "_IN_USE", set())  # a run that reads c alone, with a cap below one copy
  assert remote_dataset.fetch("s3://runs/lru-c", cache, max_bytes=1) == c
  assert not os.path.exists(a) and os.path.isdir(c)
  shared = os.path.join(os.path.dirname(c), "0123456789abcdef")  # an older version sharing c's tokens file
  os.makedirs(os.path.join(shared, "train"))
  os.link(os.path.join(c, "train", "00000.tokens"), os.path.join(shared, "train", "00000.tokens"))
  with open(os.path.join(shared, "manifest.json"), "w") as f:
    f.write("{}")
  os.utime(shared, (1000, 1000))
  assert remote_dataset.prune(cache, one_copy + 2) == [] and os.path.isdir(shared)
  assert remote_dataset.prune(cache, one_copy + 1) == [shared] and os.path.isdir(c)


def test_a_split_fetched_when_opened_makes_room_under_data_cache_max_gb(s3_endpoint, tmp_path, monkeypatch):
  """A copy's splits come when they are opened, after the fetch's prune: opening one first deletes the least
  recently used other copies until the cache and the split's bytes fit data.cache_max_gb (the split landed over
  the cap before); a process that set no cap (a data loader's worker) deletes nothing."""
  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.data.store import open_split

  def size(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)

  manifests = {}
  for name, seed in (("a", 0), ("b", 1)):
    manifests[name] = _write_store(str(tmp_path / name), seed=seed)
    remote_dataset.upload(str(tmp_path / name), f"s3://runs/room-{name}")
  cache = str(tmp_path / "cache")
  monkeypatch.setattr(remote_dataset, "_IN_USE", set())
  monkeypatch.setattr(remote_dataset, "_CAPS", {})
  a = remote_dataset.fetch("s3://runs/room-a", cache)
  open_split(a, manifests["a"], "train")  # no cap: a's copy holds its training split
  monkeypatch.setattr(remote_dataset, "_IN_USE", set())  # a later run reads b under a cap
  b = remote_dataset.fetch("s3://runs/room-b", cache)
  monkeypatch.setattr(remote_dataset, "_IN_USE", set())
  open_split(b, manifests["b"], "heldout")  # a process that set no cap: nothing deleted
  assert os.path.isdir(a)
  cap = size(a) + size(b) + 100  # what the cache holds now fits; b's training split does not
  assert remote_dataset.fetch("s3://runs/room-b", cache, max_bytes=cap) == b and os.path.isdir(a)
  store = open_split(b, manifests["b"], "train")
  assert not os.path.exists(a) and size(cache) <= cap
  reference = open_split(str(tmp_path / "b"), manifests["b"], "train")
  rows = range(reference.num_rows(32, False))
  assert (store.rows(rows, 32)["tokens"] == reference.rows(rows, 32)["tokens"]).all()


def _write_store(folder: str, shards: int = 3, seed: int = 0) -> dict:
  """A token store of several shards of random documents (their lengths from 1 to 90 tokens, so rows cross
  documents and shards) and its manifest: what open_split reads."""
  import numpy as np

  from diffgemma_jax.data.store import ShardWriter
  rng = np.random.default_rng(seed)
  entries = {"train": [], "heldout": []}
  for split, count in (("train", shards), ("heldout", 1)):
    for s in range(count):
      writer = ShardWriter(os.path.join(folder, split), f"{s:05d}", 300)
      ids = [rng.integers(0, 300, size=int(n), dtype=np.int32) for n in rng.integers(1, 90, size=25)]
      writer.add([("d", "")] * len(ids), ids)
      entries[split].append(writer.close())
  manifest = {"recipe": "test", "kind": "text", "vocab_size": 300,
              "store": {"dtype": "<u2", "splits": {k: {"shards": v} for k, v in entries.items()}}}
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  return manifest


def _store_in_bucket(tmp_path, url: str) -> tuple[str, dict]:
  """(the local folder, its manifest) of a `_write_store` store uploaded to the bucket folder `url`."""
  from diffgemma_jax.data import remote_dataset
  local = str(tmp_path / "dataset")
  manifest = _write_store(local)
  remote_dataset.upload(local, url)
  return local, manifest


def test_a_streamed_dataset_reads_its_rows_in_the_bucket(bucket, tmp_path):
  """data.stream_tokens: the local copy holds no token shard, and every row (across documents, shards, and the
  held-out split's padded last row), read in one batch or one at a time, in this process, pickled, or in a grain
  worker, equals the local dataset's."""
  import pickle

  import numpy as np

  from diffgemma_jax.data import make_train_iterator, remote_dataset
  from diffgemma_jax.data.store import open_split
  local, manifest = _store_in_bucket(tmp_path, f"{bucket}/streamed")
  cache = str(tmp_path / "cache")
  streamed = remote_dataset.fetch(f"{bucket}/streamed", cache, stream=True)
  assert streamed.endswith("-stream") and remote_dataset.fetch(f"{bucket}/streamed", cache) != streamed
  open_split(streamed, manifest, "train")  # fetches the split's document starts
  files = sorted(os.path.relpath(os.path.join(d, f), streamed) for d, _, fs in os.walk(streamed) for f in fs)
  assert not any(f.endswith(".tokens") for f in files) and "remote.json" in files and "train/00002.starts" in files
  for split, keep_partial in (("train", False), ("heldout", True)):
    want_store, got_store = open_split(local, manifest, split), open_split(streamed, manifest, split)
    assert got_store.tokens_url == f"{bucket}/streamed" and got_store.num_tokens == want_store.num_tokens
    rows = np.random.default_rng(1).permutation(want_store.num_rows(32, keep_partial))
    want = want_store.rows(rows, 32)
    for got in (got_store.rows(rows, 32), pickle.loads(pickle.dumps(got_store)).rows(rows, 32)):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{split} {key}")
    one = got_store.rows(rows[:1], 32)
    np.testing.assert_array_equal(one["tokens"], want["tokens"][:1])
  # Rows that touch are read in one request per shard (a held-out batch, in order); others one per piece
  store, reference = open_split(streamed, manifest, "train"), open_split(local, manifest, "train")
  asked = []
  read = store._read_ranges
  store._read_ranges = lambda names, starts, ends: asked.append(len(names)) or read(names, starts, ends)
  for rows, requests in ((range(store.num_rows(32, False)), 3), ([8, 9, 10, 11, 11, 2], 3), ([0, 2, 4], 3)):
    got, want = store.rows(rows, 32), reference.rows(rows, 32)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{list(rows)[:12]} {key}")
    assert asked[-1] == requests, (list(rows)[:12], asked)
  a = make_train_iterator(local, seq_len=32, batch_size=4, seed=3)
  b = make_train_iterator(streamed, seq_len=32, batch_size=4, seed=3, num_workers=1)
  for _ in range(3):
    want, got = next(a), next(b)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_a_streamed_dataset_refuses_shards_cut_or_replaced_in_the_bucket(bucket, tmp_path, monkeypatch):
  """A shard cut after the fetch fails the read that reaches past its end, one cut before it (or missing) fails the
  split's open, a deleted one the read at once; a read that fails for a moment is tried again."""
  from diffgemma_jax import storage
  from diffgemma_jax.data import store as store_module
  from etils import epath

  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.data.store import open_split
  from diffgemma_jax.errors import DataError
  url = f"{bucket}/cut"
  _, manifest = _store_in_bucket(tmp_path, url)
  shard = epath.Path(f"{url}/train/00001.tokens")
  whole = shard.read_bytes()
  streamed = remote_dataset.fetch(url, str(tmp_path / "cache"), stream=True)
  store = open_split(streamed, manifest, "train")
  rows = range(store.num_rows(32, False))
  want = store.rows(rows, 32)
  fs = storage.filesystem(url)[0]
  real, failures, waits = fs.cat_ranges, [ConnectionResetError("reset by peer"), TimeoutError("timed out")], []
  monkeypatch.setattr(fs, "cat_ranges", lambda *a, **k: real(*a, **k) if not failures else (_ for _ in ()).throw(
      failures.pop(0)))
  monkeypatch.setattr(store_module.time, "sleep", waits.append)
  got = store.rows(rows, 32)
  assert waits == [1, 2] and all((got[k] == want[k]).all() for k in want)  # the third try read them
  failures[:] = [TimeoutError("timed out")] * store_module.READ_ATTEMPTS
  with pytest.raises(DataError, match=f"reading the token store in {url} failed \\(TimeoutError: timed out\\)"):
    store.rows(rows, 32)
  monkeypatch.undo()
  shard.write_bytes(whole[:-2])  # replaced after the fetch: the read that reaches its end says so
  with pytest.raises(DataError, match=f"{url}/train/00001.tokens returned .* bytes of .* asked for"):
    store.rows(rows, 32)
  streamed = remote_dataset.fetch(url, str(tmp_path / "cache"), stream=True)  # listed again: refused at the open
  with pytest.raises(DataError, match=f"{url}/train/00001.tokens has {len(whole) - 2} bytes, the manifest says "
                                      f"{len(whole)}"):
    open_split(streamed, manifest, "train")
  shard.unlink()
  with pytest.raises(DataError, match=f"reading the token store in {url} failed \\(FileNotFoundError"):
    store.rows(rows, 32)
  streamed = remote_dataset.fetch(url, str(tmp_path / "cache"), stream=True)
  with pytest.raises(DataError, match=f"{url}/train/00001.tokens is missing from the bucket"):
    open_split(streamed, manifest, "train")


def test_generation_results_in_a_bucket_go_up_as_chunks_of_what_is_new_and_are_read_back(bucket):
  """diffgemma-generate --output gs://.../FILE.jsonl: while the job runs, the results since the last upload go up
  at most every upload_every_s as one new object under FILE.jsonl.chunks/ (an upload never carries an older
  result again); a rerun reads the chunks to skip what is done; the job's end writes the object whole, in order,
  and deletes the chunks, and a kill between the two loses nothing."""
  from etils import epath

  from diffgemma_jax.errors import ConfigError
  from diffgemma_jax.sampling.results_file import ResultsFile, chunk_folder
  url, prompts = f"{bucket}/generated/out.jsonl", ["a", "b", "c", "d"]
  record = lambda prompt: {"prompt": prompt, "completion": "!", "step": 4, "weights": "params"}  # noqa: E731

  def chunks():
    folder = epath.Path(chunk_folder(url))
    return {p.name: [json.loads(line)["index"] for line in p.read_text().splitlines()]
            for p in sorted(folder.iterdir())} if folder.exists() else {}

  job = ResultsFile(url, prompts, {"seed": 0}, upload_every_s=3600)
  job.add(2, record("c"))
  assert chunks() == {} and not epath.Path(url).exists()  # within the interval: kept in memory
  job.upload_every_s = 0
  job.add(0, record("a"))
  job.add(1, record("b"))
  assert chunks() == {"00000000.jsonl": [2, 0], "00000001.jsonl": [1]} and not epath.Path(url).exists()
  again = ResultsFile(url, prompts, {"seed": 0}, upload_every_s=0)  # a rerun after a kill
  assert again.kept == 3 and list(again.pending(range(4))) == [3]
  again.add(3, record("d"))
  assert list(chunks()) == ["00000000.jsonl", "00000001.jsonl", "00000002.jsonl"]
  with pytest.raises(ConfigError, match=f"--output {url}.chunks/00000000.jsonl:1 was made with other settings"):
    ResultsFile(url, prompts, {"seed": 1})
  whole = [json.dumps(r) for r in again.finish()]
  assert [json.loads(line)["prompt"] for line in epath.Path(url).read_text().splitlines()] == prompts
  assert chunks() == {}
  # killed after writing the object and before deleting the chunks: both are read, nothing is lost or doubled
  epath.Path(chunk_folder(url), "00000007.jsonl").write_text(whole[1] + "\n")
  third = ResultsFile(url, prompts, {"seed": 0})
  assert third.kept == 4 and [r["index"] for r in third.finish()] == [0, 1, 2, 3] and chunks() == {}


def test_process_0_gathers_bucket_parts_reading_each_chunk_once(bucket, monkeypatch):
  """A launch that split a job with its --output in a bucket: process 0 reads another copy's part as its chunks
  come, each chunk once (not the whole part at every poll), and takes the part's final object when the copy ends;
  `delete_parts` leaves neither parts nor chunks."""
  import threading
  import time

  from etils import epath

  from diffgemma_jax.sampling.results_file import ResultsFile, chunk_folder, delete_parts, gather_parts, part_path
  url, prompts, settings = f"{bucket}/split/out.jsonl", ["a", "b", "c", "d", "e", "f"], {"sampler": "x"}
  record = lambda i: {"prompt": prompts[i], "step": 1, "weights": "params"}  # noqa: E731
  merged = ResultsFile(url, prompts, settings)
  part = ResultsFile(part_path(url, 1, 2), prompts, settings, upload_every_s=0)
  for i in (0, 2, 4):
    merged.add(i, record(i))
  part.add(1, record(1))
  reads, read_bytes = [], epath.Path.read_bytes

  def counted(path):
    reads.append(str(path).rsplit("/", 2)[-2:])
    return read_bytes(path)

  monkeypatch.setattr(epath.Path, "read_bytes", counted)

  def copy_1():
    time.sleep(0.3)
    part.add(3, record(3))
    time.sleep(0.3)
    part.add(5, record(5))
    part.finish()

  late = threading.Thread(target=copy_1)
  late.start()
  gather_parts(merged, prompts, settings, 2, poll_s=0.05, stale_s=10)
  late.join()
  assert [r["index"] for r in merged.finish()] == list(range(6))
  chunk_reads = [r for r in reads if r[0] == "out.part-1-of-2.jsonl.chunks"]
  assert sorted(map(tuple, chunk_reads)) == sorted(set(map(tuple, chunk_reads)))  # each chunk read once
  assert chunk_reads  # the first chunk, there before the wait began, at least
  delete_parts(url, 2)
  gone = part_path(url, 1, 2)
  assert not epath.Path(gone).exists() and not epath.Path(chunk_folder(gone)).exists()
  assert [json.loads(line)["index"] for line in epath.Path(url).read_text().splitlines()] == list(range(6))


def test_a_bucket_dataset_copy_fetches_each_split_when_it_opens(bucket, tmp_path, capsys):
  """The local copy holds the dataset's own files at once and a split's files once the token store opens it
  (diffgemma-eval, reading the held-out split, never copies the training split): its rows are the local
  store's; a shard cut short in the copy is fetched again, one deleted from the bucket is a one-line error."""
  import numpy as np
  from etils import epath

  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.data.store import open_split
  from diffgemma_jax.errors import DataError
  url = f"{bucket}/lazy"
  local, manifest = _store_in_bucket(tmp_path, url)
  copy = remote_dataset.fetch(url, str(tmp_path / "cache"))

  def held():
    return sorted(os.path.relpath(os.path.join(d, f), copy) for d, _, fs in os.walk(copy) for f in fs)

  assert held() == ["manifest.json", "remote.json"]  # this stand-in has no tokenizer or counts
  heldout = open_split(copy, manifest, "heldout")
  assert "fetching the heldout split of" in capsys.readouterr().err
  assert held() == ["heldout/00000.starts", "heldout/00000.tokens", "manifest.json", "remote.json"]
  want = open_split(local, manifest, "heldout")
  rows = range(want.num_rows(32, True))
  for key, value in want.rows(rows, 32).items():
    np.testing.assert_array_equal(heldout.rows(rows, 32)[key], value)
  open_split(copy, manifest, "train")
  assert len(held()) == 4 + 6 and capsys.readouterr().err.count("fetching the train split") == 1
  open_split(copy, manifest, "train")  # nothing left to fetch
  assert capsys.readouterr().err == ""
  shard = os.path.join(copy, "train", "00001.tokens")
  with open(shard, "r+b") as f:
    f.truncate(10)
  open_split(copy, manifest, "train")
  assert os.path.getsize(shard) == os.path.getsize(os.path.join(local, "train", "00001.tokens"))
  os.remove(shard)
  epath.Path(f"{url}/train/00001.tokens").unlink()
  with pytest.raises(DataError, match=f"token store file {url}/train/00001.tokens is missing from the bucket"):
    open_split(copy, manifest, "train")


def test_processes_build_a_bucket_dataset_together_each_uploading_its_own_shards(bucket, tmp_path, monkeypatch):
  """Two processes (threads meeting at a barrier) build a corpus into the bucket together, each its share of the
  tasks in a folder on its own disk (no shared filesystem), passing what the other needs through the bucket: the
  bucket then holds what one process's build publishes, file by file (sizes and sha256 in objects.json, the
  tokenizer trained on the merged sample included); each process uploaded its own tasks' shards and no other's;
  the exchange folder is gone; each copy reads the one-process build's rows, and what a killed build left in a
  cache is gone. Started again, they find the dataset current and upload nothing."""
  import concurrent.futures
  import functools
  import threading

  import numpy as np
  from etils import epath

  from data_recipes import build_dataset
  from diffgemma_jax import storage
  from diffgemma_jax.data import build as build_module
  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.data.store import open_split
  src = tmp_path / "corpus"
  write_corpus(str(src))
  monkeypatch.setattr(build_module, "TASK_BYTES", 10_000)  # several tasks for each process

  def build(folder, **job):
    return build_dataset("text_files", folder, 400, source=str(src), build_workers=1, **job)

  one = remote_dataset.build_in_bucket(f"{bucket}/one", str(tmp_path / "cache-one"), build)
  uploads, upload_many = [], storage.upload_many
  monkeypatch.setattr(storage, "upload_many", lambda items, *a: uploads.extend(items) or upload_many(items, *a))

  def joined(build_id, builds=(build, build)):
    """The two processes' build_shared calls, process p running builds[p]; their futures, both done."""
    meet = threading.Barrier(2, timeout=60).wait
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      return [pool.submit(remote_dataset.build_shared, f"{bucket}/two", str(tmp_path / f"cache-{p}"), builds[p],
                          process_index=p, barrier=lambda _: meet(), poll_s=0.05, process_count=2,
                          build_id=build_id) for p in (0, 1)]

  def together(build_id):
    return [f.result() for f in joined(build_id)]

  def errors_of(build_id, builds=(build, build)):
    return [str(f.exception()) for f in joined(build_id, builds)]

  # what a process killed outright in an earlier build left in its cache (its scratch folder and staging, its build
  # lock, its owner file no one holds): deleted by the next build of the URL there
  killed = os.path.join(tmp_path, "cache-1", remote_dataset._key(f"{bucket}/two"), "build-0123456789ab")
  os.makedirs(os.path.join(killed, "train"))
  os.makedirs(killed + ".partial")
  for suffix, text in ((".lock", ""), (remote_dataset.OWNER_SUFFIX, "4242 elsewhere\n")):
    with open(killed + suffix, "w") as f:
      f.write(text)
  copies = together("first")
  assert not [name for name in os.listdir(os.path.dirname(killed)) if name.startswith("build-")]
  objects = [json.loads(epath.Path(f"{bucket}/{name}/objects.json").read_text()) for name in ("one", "two")]
  assert objects[0] == objects[1]
  manifests = [json.loads(epath.Path(f"{bucket}/{name}/manifest.json").read_text()) for name in ("one", "two")]
  assert all(manifests[1][key] == manifests[0][key] for key in ("sha256", "store", "splits", "vocab_size"))
  published = {target[len(f"{bucket}/two/"):]: source for source, target in uploads
               if target.startswith(f"{bucket}/two/")}
  assert sorted(published) == sorted(objects[0])  # every file once
  shards = {f"{e['name']}{suffix}": int(e["name"].split("/")[1]) % 2 for split in ("train", "heldout")
            for e in manifests[0]["store"]["splits"][split]["shards"] for suffix in (".tokens", ".starts")}
  assert set(shards.values()) == {0, 1}
  for rel, source in published.items():
    assert source.startswith(str(tmp_path / f"cache-{shards.get(rel, 0)}")), (rel, source)
  assert storage.folder_sizes(f"{bucket}/two.partial") == {}
  for local in copies:
    for split in ("train", "heldout"):
      got, want = open_split(local, manifests[1], split), open_split(one, manifests[0], split)
      rows = range(want.num_rows(32, False))
      np.testing.assert_array_equal(got.rows(rows, 32)["tokens"], want.rows(rows, 32)["tokens"])
  uploads.clear()
  assert together("second") == copies and uploads == []
  assert storage.folder_sizes(f"{bucket}/two.partial") == {}  # their agreement that it is current deleted
  for local in copies:  # no scratch folder nor build lock left in the caches
    assert not [name for name in os.listdir(os.path.dirname(local)) if name.startswith("build-")]
  # Processes that find the dataset in different states (one reads it as another job's: its build asks for
  # another vocabulary) all fail in one line at once, and the bucket keeps its dataset
  other = functools.partial(build_dataset, "text_files", vocab_size=300, source=str(src), build_workers=1)
  for odd in (1, 0):
    errors = errors_of(f"split-{odd}", [other if p == odd else build for p in (0, 1)])
    assert all(e.startswith("the processes of this job disagree on whether the dataset is current (1 found it "
                            "current, 1 must build it)") for e in errors), (odd, errors)
    assert json.loads(epath.Path(f"{bucket}/two/manifest.json").read_text()) == manifests[1]
    assert storage.folder_sizes(f"{bucket}/two.partial") == {} and uploads == []
  # A process that cannot read the sources (a data.source on another host's disk) fails before the agreement: the
  # others learn it there and fail at once with its line, rather than wait at that barrier
  elsewhere = functools.partial(build_dataset, "text_files", vocab_size=400, source=str(tmp_path / "elsewhere"),
                                build_workers=1)
  for odd in (1, 0):
    errors = errors_of(f"missing-{odd}", [elsewhere if p == odd else build for p in (0, 1)])
    missing = f"data.source '{tmp_path / 'elsewhere'}' does not exist"
    # (process 0's line may be gone when process 1 reads it: process 0 clears the exchange as it stops)
    assert errors[odd] == missing and errors[1 - odd] in (f"the dataset build failed on process {odd}: {missing}",
                                                          "the dataset build failed on process 0: its line is in "
                                                          "process 0's log"), (odd, errors)
    assert storage.folder_sizes(f"{bucket}/two.partial") == {} and uploads == []
  # A rebuild (a new file) that fails on process 1 fails both processes with its line, and the bucket keeps the
  # dataset it had
  (src / "bisect_copy.txt").write_text((src / "bisect.py.txt").read_text())
  tokenize = build_module._tokenize_task

  def failing(corpus, index, *rest):
    if index % 2:
      raise build_module.DataError(f"task {index} cannot be read")
    return tokenize(corpus, index, *rest)

  monkeypatch.setattr(build_module, "_tokenize_task", failing)
  errors = errors_of("third")
  assert errors[0].startswith("the dataset build failed on process 1: task 1 cannot be read"), errors
  assert errors[1].startswith("task ") and errors[1].endswith(" cannot be read"), errors
  assert json.loads(epath.Path(f"{bucket}/two/manifest.json").read_text()) == manifests[1]
  assert storage.folder_sizes(f"{bucket}/two.partial") == {}


JOINED_BUILD = """
import json, os, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from diffgemma_jax.config import load_config
from diffgemma_jax.data import build
from diffgemma_jax.train.dataset import prepare_dataset
build.MIN_TASK_BYTES, build.TASK_BYTES = 0, 60_000  # the tiny corpus in several tasks: a share for each process
config = load_config(sys.argv[3], {"data.dir": sys.argv[4], "data.cache_dir": sys.argv[5], "data.build_workers": "1"})
directory, tokenizer = prepare_dataset(config)
with open(os.path.join(directory, "manifest.json")) as f:
  manifest = json.load(f)
print(json.dumps({"splits": manifest["splits"], "vocab": tokenizer.vocab_size, "store": manifest["store"]}), flush=True)
jax.distributed.shutdown()
"""


def test_a_joined_run_can_have_process_0_build_its_bucket_dataset_alone(s3_endpoint, load_tiny, tmp_path,
                                                                         monkeypatch):
  """data.build_on_every_process=False: a job's pretraining dataset in a bucket is built by process 0 alone (no
  build id: remote_dataset.build_shared's one-builder path) for sources on its disk only; by default every process
  builds its share (a build id drawn through the job's key-value store)."""
  from diffgemma_jax.data import remote_dataset
  from diffgemma_jax.train import dataset
  asked = []
  monkeypatch.setattr(dataset.jax, "process_count", lambda: 2)
  monkeypatch.setattr(dataset, "runtime_client", lambda: None)
  monkeypatch.setattr(dataset, "shared_token", lambda name: "drawn")
  monkeypatch.setattr(remote_dataset, "build_shared", lambda url, cache, build, **kw: asked.append(kw) or cache)
  for every in ("True", "False"):
    config = load_tiny({"data.dir": "s3://runs/alone", "data.cache_dir": str(tmp_path / "cache"),
                        "data.build_on_every_process": every})
    dataset._dataset_in_bucket(config, "s3://runs/alone", lambda local, **job: None)
  assert [(kw["process_count"], kw["build_id"]) for kw in asked] == [(2, "drawn"), (2, "")]


def test_a_joined_run_builds_its_bucket_dataset_on_every_process(s3_endpoint, tiny_config_file, load_tiny, tmp_path):
  """Two processes joined by jax.distributed on CPU, each with a dataset cache of its own (no shared disk), build
  the tiny corpus into the bucket together (the build id drawn by process 0 through the job's key-value store):
  the documents, split and tokenizer one process builds locally, each process's copy holds the shards it built,
  and the bucket keeps no exchange folder."""
  import subprocess
  import sys

  from conftest import free_port
  from diffgemma_jax import storage
  from diffgemma_jax.train.dataset import prepare_dataset
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo, XLA_FLAGS="")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  procs = [subprocess.Popen([sys.executable, "-c", JOINED_BUILD, address, str(rank), tiny_config_file,
                             "s3://runs/joined", str(tmp_path / f"cache-{rank}")], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  local_dir, _ = prepare_dataset(load_tiny())  # the session's local build of the tiny corpus (in one task)
  with open(os.path.join(local_dir, "manifest.json")) as f:
    want = json.load(f)
  got = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
  assert got[0] == got[1]
  assert got[0]["splits"] == want["splits"] and got[0]["vocab"] == want["vocab_size"]  # the same documents, split
  objects = json.loads(storage.open_path("s3://runs/joined/objects.json").read_text())  # and tokenizer
  assert objects["tokenizer.model"][1] == storage.file_sha256(os.path.join(local_dir, "tokenizer.model"))
  shards = {e["name"]: int(e["name"].split("/")[1]) % 2 for split in ("train", "heldout")
            for e in got[0]["store"]["splits"][split]["shards"]}
  assert set(shards.values()) == {0, 1}, shards
  for rank in range(2):  # each copy holds the shards its process built (the others' are fetched when read)
    held = {os.path.relpath(os.path.join(d, f), tmp_path / f"cache-{rank}").split(os.sep, 2)[2]
            for d, _, files in os.walk(tmp_path / f"cache-{rank}") for f in files if f.endswith(".tokens")}
    assert held == {f"{name}.tokens" for name, p in shards.items() if p == rank}, (rank, held)
  assert "manifest.json" in storage.folder_sizes("s3://runs/joined")
  assert storage.folder_sizes("s3://runs/joined.partial") == {}


def test_a_recipe_command_builds_into_a_bucket_and_the_trainer_finds_it_current(s3_endpoint, tmp_path, capsys):
  """`python -m data_recipes.text_files --output s3://...` builds in --cache_dir and uploads (it made a local
  folder named `s3:` before); the trainer's bucket build, with the same recipe and settings, finds it current and
  uploads nothing; a bucket that cannot be reached is a one-line error."""
  from etils import epath

  from data_recipes import build_dataset
  from data_recipes.text_files import main
  from diffgemma_jax.data import remote_dataset
  src = tmp_path / "corpus"
  write_corpus(str(src))
  cache = str(tmp_path / "cache")
  assert main(["--output", "s3://runs/cli", "--source", str(src), "--vocab_size", "400", "--workers", "1",
               "--cache_dir", cache]) == 0
  assert capsys.readouterr().out.startswith("text_files: s3://runs/cli (train: ")
  assert not os.path.exists("s3:") and not os.path.exists(tmp_path / "s3:")
  manifest = epath.Path("s3://runs/cli/manifest.json").read_text()
  local = remote_dataset.build_in_bucket(
      "s3://runs/cli", cache, lambda folder: build_dataset("text_files", folder, 400, source=str(src),
                                                           build_workers=1))
  assert epath.Path("s3://runs/cli/manifest.json").read_text() == manifest  # current: not rebuilt
  with open(os.path.join(local, "manifest.json")) as f:
    assert f.read() == manifest
  assert [name for name in os.listdir(os.path.dirname(local)) if not name.endswith(".job")] == [
      os.path.basename(local)]  # no scratch nor build lock left (the lock builds of it on this host take turns by)
  assert main(["--output", "s3://missing-bucket/cli", "--source", str(src), "--cache_dir", cache]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --output s3://missing-bucket/cli: the bucket s3://missing-bucket cannot be "
                        "reached") and err.count("\n") == 1, err


def test_an_interrupted_bucket_build_resumes_on_the_same_host(s3_endpoint, tmp_path, monkeypatch, capsys):
  """A dataset built into a bucket by one process (the recipe command, a one-process run) and interrupted in its
  tokenise phase (after 2 tasks: a preemption) keeps its staging folder in the cache; the same build again resumes
  it (only the other tasks tokenised) and publishes the dataset an uninterrupted build publishes; then nothing is
  left in the cache but the copy and the lock file. Seen to fail with a new scratch folder per build (as before).
  A build stopped in its upload is uploaded by the next run without being tokenised again (seen to fail with the
  scratch folder deleted as the upload failed)."""
  from etils import epath

  from data_recipes import build_dataset
  from diffgemma_jax.data import build as build_module
  from diffgemma_jax.data import remote_dataset
  src = tmp_path / "corpus"
  write_corpus(str(src))
  monkeypatch.setattr(build_module, "TASK_BYTES", 10_000)
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 10_000)

  def build(folder):
    return build_dataset("text_files", folder, 400, source=str(src), build_workers=1)

  remote_dataset.build_in_bucket("s3://runs/whole", str(tmp_path / "cache-whole"), build)
  calls, tokenize = stop_tokenising_after(monkeypatch, 2)
  cache = str(tmp_path / "cache")
  with pytest.raises(KeyboardInterrupt):
    remote_dataset.build_in_bucket("s3://runs/resumed", cache, build)
  scratch = remote_dataset.resumable_scratch("s3://runs/resumed", cache)
  assert os.path.isdir(scratch + ".partial") and "its staging folder" in capsys.readouterr().err
  assert not epath.Path("s3://runs/resumed/manifest.json").exists()
  again = []
  monkeypatch.setattr(build_module, "_tokenize_task", lambda *args: again.append(args[1]) or tokenize(*args))
  local = remote_dataset.build_in_bucket("s3://runs/resumed", cache, build)
  assert "resuming the interrupted build" in capsys.readouterr().err
  tasks = len(build_module.plan_tasks(build_module.Corpus(str(src), tuple(sorted(os.listdir(src))), "corpus")))
  assert tasks > 3 and sorted(again) == sorted(set(range(tasks)) - set(calls))
  manifests = [json.loads(epath.Path(f"s3://runs/{name}/manifest.json").read_text()) for name in ("whole", "resumed")]
  for key in ("sha256", "splits", "store"):
    assert manifests[0][key] == manifests[1][key], key
  assert sorted(os.listdir(os.path.dirname(local))) == sorted([os.path.basename(local),
                                                               os.path.basename(scratch) + ".job"])
  # stopped in its upload, after the build ended: the next run uploads the kept build without tokenising again
  upload = remote_dataset.upload

  def stopped(*_):
    raise KeyboardInterrupt

  monkeypatch.setattr(remote_dataset, "upload", stopped)
  with pytest.raises(KeyboardInterrupt):
    remote_dataset.build_in_bucket("s3://runs/uploaded", cache, build)
  again.clear()
  monkeypatch.setattr(remote_dataset, "upload", upload)
  remote_dataset.build_in_bucket("s3://runs/uploaded", cache, build)
  assert again == [] and "that was not uploaded; uploading it" in capsys.readouterr().err
  uploaded = json.loads(epath.Path("s3://runs/uploaded/manifest.json").read_text())
  assert all(uploaded[key] == manifests[0][key] for key in ("sha256", "splits", "store"))

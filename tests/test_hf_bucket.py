"""diffgemma-import --hf s3://... or gs://...: a Hugging Face folder in a bucket is read in place (real servers on
localhost: moto's S3, gcp-storage-emulator's GCS): the same parameters as a local import of the same folder, only
the headers' and the converted tensors' bytes fetched, nothing downloaded; a damaged upload fails in one line naming
the file and the tensor. The servers are conftest's `s3_endpoint` and `gcs_endpoint` (through its `bucket`)."""

from __future__ import annotations

import importlib
import json
import os
import struct

import jax
import numpy as np
import pytest
from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.hf.export_hf import export_hf, restore_pure_params
from diffgemma_jax.hf.import_hf import import_hf
from diffgemma_jax.hf.safetensors_io import INDEX_FILE, SafetensorsFile, write_file
from test_hf import CONTEXT, TINY, _pure, _random_model

IMPORT_HF = importlib.import_module("diffgemma_jax.hf.import_hf")  # the module: the package exports its function
VISION = "model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.weight"  # skipped by the import: never fetched


def _tensor_ranges(path: str) -> tuple[int, dict[str, tuple[int, int]]]:
  """(header length, {tensor: (start, end) in the file}) parsed here from the bytes, independently of the reader."""
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  header.pop("__metadata__", None)
  return length, {n: (8 + length + e["data_offsets"][0], 8 + length + e["data_offsets"][1]) for n, e in header.items()}


def _export(folder: str) -> dict:
  pure = _pure(_random_model(TINY))
  export_hf(TINY, pure, folder, context=CONTEXT, canvas_length=16, max_shard_bytes=20_000, log=lambda _: None)
  return pure


def test_a_bucket_folder_is_imported_in_place_as_the_local_folder_is(bucket, tmp_path, monkeypatch):
  local, url = str(tmp_path / "hf"), f"{bucket}/hf-in-place"
  pure = _export(local)
  vision = np.random.default_rng(0).normal(size=(64, 256)).astype(np.float32)  # 64 KB no read may touch
  write_file(os.path.join(local, "vision.safetensors"), [(VISION, vision)])
  index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
  index["weight_map"][VISION] = "vision.safetensors"
  (tmp_path / "hf" / INDEX_FILE).write_text(json.dumps(index))
  (tmp_path / "hf" / "tokenizer.model").write_bytes(b"the checkpoint's tokenizer")
  storage.upload_folder(local, url)

  reads, real_read = [], storage.read_range
  monkeypatch.setattr(storage, "read_range", lambda path, start, end: reads.append((str(path), start, end)) or
                      real_read(path, start, end))
  monkeypatch.setattr(storage, "download", lambda *a, **k: pytest.fail(f"downloaded {a[0]} whole"))
  scratch_files, real_save = [], IMPORT_HF.save_checkpoint

  def save_and_list_scratch(workdir, *args, **kwargs):  # the parameters are loaded: what does local disk hold?
    scratch_files.extend(os.listdir(os.path.join(workdir, ".import-scratch")))
    return real_save(workdir, *args, **kwargs)

  monkeypatch.setattr(IMPORT_HF, "save_checkpoint", save_and_list_scratch)
  import_hf(url, str(tmp_path / "from-bucket"), log=lambda _: None)
  assert scratch_files and all(name.endswith(".bin") for name in scratch_files)  # our memmaps, no shard
  bucket_reads = [r for r in reads if r[0].startswith(url)]
  import_hf(local, str(tmp_path / "from-folder"), log=lambda _: None)

  expected, vision_range = set(), None
  for name in sorted(os.listdir(local)):
    if name.endswith(".safetensors"):
      length, ranges = _tensor_ranges(os.path.join(local, name))
      expected |= {(f"{url}/{name}", 0, 8), (f"{url}/{name}", 8, 8 + length)}
      expected |= {(f"{url}/{name}", *r) for n, r in ranges.items() if n != VISION}
      vision_range = ranges.get(VISION, vision_range)
  # Each header and each converted tensor fetched once, by exactly its byte range; the vision tensor never.
  assert sorted(bucket_reads) == sorted(expected)
  assert (f"{url}/vision.safetensors", *vision_range) not in bucket_reads
  shards = [n for n in os.listdir(local) if n.endswith(".safetensors")]
  assert len(shards) > 2 and sum(e - s for _, s, e in bucket_reads) == (
      sum(os.path.getsize(os.path.join(local, n)) for n in shards) - vision.nbytes)

  assert epath.Path(tmp_path / "from-bucket" / "tokenizer.model").read_bytes() == b"the checkpoint's tokenizer"
  (step_a, from_bucket), (step_b, from_folder) = (restore_pure_params(str(tmp_path / w), TINY)
                                                  for w in ("from-bucket", "from-folder"))
  assert step_a == step_b == 0
  leaves = [jax.tree_util.tree_leaves_with_path(t) for t in (from_bucket, from_folder, pure)]
  assert len(leaves[0]) == len(leaves[1]) == len(leaves[2])
  for (path, a), (_, b), (_, c) in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c), err_msg=str(path))


def test_a_damaged_upload_fails_in_one_line_naming_the_file_and_the_tensor(bucket, tmp_path, capsys):
  from launch.import_hf import main as import_main
  local, url = str(tmp_path / "hf"), f"{bucket}/hf-damaged"
  _export(local)
  storage.upload_folder(local, url)
  shard = sorted(n for n in os.listdir(local) if n.endswith(".safetensors"))[-1]
  data = (tmp_path / "hf" / shard).read_bytes()
  _, ranges = _tensor_ranges(os.path.join(local, shard))
  last, (start, end) = max(ranges.items(), key=lambda item: item[1][1])
  cut = data[:(start + end) // 2]  # an upload interrupted in the middle of the last tensor

  intact = SafetensorsFile(f"{url}/{shard}")  # opened while the object was whole, then replaced by a cut copy
  epath.Path(f"{url}/{shard}").write_bytes(cut)
  with pytest.raises(ConfigError, match=rf"{url}/{shard}: tensor {last}: got {len(cut) - start} of its "
                                        rf"{end - start} bytes \({start}-{end}\); the file changed or was cut short"):
    intact.get(last)

  damaged_local = tmp_path / "damaged"
  damaged_local.mkdir()
  for name in os.listdir(local):
    (damaged_local / name).write_bytes(cut if name == shard else (tmp_path / "hf" / name).read_bytes())
  for source in (url, str(damaged_local)):
    assert import_main(["--hf", source, "--output", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {source}/{shard}: tensor {last} lies at bytes {start}-{end} but the file holds "
                   f"{len(cut)}; the file is damaged or cut short (an interrupted upload or copy?); replace it\n")
    assert not (tmp_path / "work" / "checkpoints").exists()  # failed before anything was written


def test_tensors_are_fetched_ahead_in_order_within_the_limits(s3_endpoint, tmp_path, monkeypatch):
  """From a bucket the next tensors are fetched while one is converted: never more than `workers` requests at
  once nor more than `max_bytes` ahead (besides the one being converted); the tensors come out in file order."""
  import threading
  import time

  from diffgemma_jax.hf.safetensors_io import tensors_in_order
  arrays = [(f"t{i}", np.full((256,), i, np.float32)) for i in range(10)]  # 1 KB each
  write_file(str(tmp_path / "a.safetensors"), arrays[:6])
  write_file(str(tmp_path / "b.safetensors"), arrays[6:])
  storage.upload_folder(str(tmp_path), "s3://runs/ahead")
  files = [SafetensorsFile(f"s3://runs/ahead/{name}.safetensors") for name in "ab"]
  state = {"now": 0, "most": 0}
  lock, real_read = threading.Lock(), storage.read_range

  def counting_read(path, start, end):
    with lock:
      state["now"] += 1
      state["most"] = max(state["most"], state["now"])
    time.sleep(0.05)  # long enough for the reader to queue everything it is allowed to
    try:
      return real_read(path, start, end)
    finally:
      with lock:
        state["now"] -= 1

  monkeypatch.setattr(storage, "read_range", counting_read)
  out = list(tensors_in_order(files, skip=lambda name: name == "t3", workers=4, max_bytes=2048))
  assert [name for name, _ in out] == [f"t{i}" for i in range(10) if i != 3]
  assert all(np.array_equal(array, np.full((256,), int(name[1:]), np.float32)) for name, array in out)
  assert state["most"] == 2  # 2 KB ahead at most: two requests of 1 KB in flight, not the 4 workers
  state["most"] = 0
  list(tensors_in_order(files, workers=3, max_bytes=1 << 30))
  assert state["most"] == 3

"""A dataset folder in a bucket (`data.dir = gs://bucket/data` or `s3://...`): built locally and uploaded, read
through a local cache.

The token store is memory-mapped and sentencepiece reads local files, so a dataset in object storage is used
through a local copy, `<cache>/<sha256 of the URL>/<sha256 of its manifest.json>/` (16 hex digits each): keyed by
the URL and the dataset's manifest, so an unchanged dataset is fetched once and a rebuilt one gets a folder of its
own. The bucket holds what a local dataset folder holds, plus `objects.json` ({path: [size, sha256]} of every
other file). A build uploads the files, then objects.json, then manifest.json, and first removes the old
manifest: a reader sees the previous dataset whole, the new one whole, or none (and is told to run again).

Fetching reuses a cached file of the recorded size (one cut short or missing is fetched again) and checks each
downloaded file's size and sha256. Every file is written under a temporary name and renamed, so processes that
share a host (and a cache) never read half a file, whichever of them fetches it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Callable

from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.errors import DataError

MANIFEST_FILE = "manifest.json"
OBJECTS_FILE = "objects.json"


def default_cache_root() -> str:
  """`$XDG_CACHE_HOME/diffgemma-jax/datasets` (`~/.cache/...` without it): where `data.cache_dir` defaults to."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "diffgemma-jax", "datasets")


def _key(data: bytes | str) -> str:
  return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _read(url: str) -> bytes | None:
  try:
    return epath.Path(url).read_bytes()
  except FileNotFoundError:
    return None


def _write_atomic(path: str, data: bytes) -> None:
  partial = f"{path}.partial-{uuid.uuid4().hex[:12]}"
  with open(partial, "wb") as f:
    f.write(data)
  os.replace(partial, path)


def _local_files(folder: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def _objects(url: str) -> dict[str, list]:
  """{path: [size, sha256 or None]} of the dataset's files: its objects.json, or (a folder copied into the bucket
  by other tools) a listing, sizes only."""
  recorded = _read(storage.join(url, OBJECTS_FILE))
  if recorded is not None:
    return json.loads(recorded)
  return {rel: [size, None] for rel, size in storage.folder_sizes(url).items()
          if rel not in (MANIFEST_FILE, OBJECTS_FILE)}


def fetch(url: str, cache_root: str, key: str = "data.dir") -> str:
  """The local copy of the dataset in the bucket folder `url`, fetched into `cache_root` where missing; `key`:
  the config key that names it (for the error when no dataset is there)."""
  manifest = _read(storage.join(url, MANIFEST_FILE))
  if manifest is None:
    raise DataError(f"{key} {url}: no dataset there (no {MANIFEST_FILE}); build it first (diffgemma-train "
                    f"builds data.recipe into data.dir)")
  local = os.path.join(cache_root, _key(url), _key(manifest))
  for rel, (size, sha256) in sorted(_objects(url).items()):
    path = os.path.join(local, rel)
    if not (os.path.isfile(path) and os.path.getsize(path) == size):
      storage.download(storage.join(url, rel), path, size=size, sha256=sha256)
  manifest_path = os.path.join(local, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    _write_atomic(manifest_path, manifest)  # last: a complete copy
  return local


def upload(local: str, url: str) -> None:
  """Replaces the dataset in the bucket folder `url` by the local dataset folder `local` (see the module doc)."""
  files = [rel for rel in _local_files(local) if rel not in (MANIFEST_FILE, OBJECTS_FILE)]
  target = epath.Path(url)
  (target / MANIFEST_FILE).unlink(missing_ok=True)
  objects = {}
  for rel in files:
    source = os.path.join(local, rel)
    objects[rel] = [os.path.getsize(source), storage.file_sha256(source)]
    epath.Path(source).copy(target / rel, overwrite=True)
  (target / OBJECTS_FILE).write_text(json.dumps(objects, indent=1, sort_keys=True))
  epath.Path(os.path.join(local, MANIFEST_FILE)).copy(target / MANIFEST_FILE, overwrite=True)
  for rel in set(storage.folder_sizes(url)) - set(objects) - {MANIFEST_FILE, OBJECTS_FILE}:
    (target / rel).unlink(missing_ok=True)  # files of the previous build that this one does not have


def _link_tree(source: str, target: str) -> None:
  """`target` as a copy of the folder `source` made of hard links (a build there replaces files, never edits
  them), or of copies where links cannot be made."""
  for rel in _local_files(source):
    os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
    try:
      os.link(os.path.join(source, rel), os.path.join(target, rel))
    except OSError:
      shutil.copyfile(os.path.join(source, rel), os.path.join(target, rel))


def build_in_bucket(url: str, cache_root: str, build: Callable[[str], object]) -> str:
  """Makes the dataset in the bucket folder `url` current and returns its local copy: `build(folder)` (a
  recipe's build, which keeps a dataset that is current) runs on a local copy of what the bucket holds, and what
  it changed is uploaded. Run by one process at a time (process 0 of a run; the others `fetch` after it)."""
  before = _read(storage.join(url, MANIFEST_FILE))
  folder = os.path.join(cache_root, _key(url))
  scratch = os.path.join(folder, f"build-{uuid.uuid4().hex[:12]}")
  try:
    if before is not None:
      _link_tree(fetch(url, cache_root), scratch)
    build(scratch)
    with open(os.path.join(scratch, MANIFEST_FILE), "rb") as f:
      after = f.read()
    if after != before:
      upload(scratch, url)
    local = os.path.join(folder, _key(after))
    if not os.path.isdir(local):
      try:
        os.replace(scratch, local)
      except OSError:  # another process's copy of the same dataset got there first
        pass
    return local
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

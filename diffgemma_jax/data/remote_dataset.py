"""A dataset folder in a bucket (`data.dir = gs://bucket/data` or `s3://...`): built locally and uploaded, read
through a local cache.

The token store is memory-mapped and sentencepiece reads local files, so a dataset in object storage is used
through a local copy, `<cache>/<sha256 of the URL>/<sha256 of its manifest.json>/` (16 hex digits each): keyed by
the URL and the dataset's manifest, so an unchanged dataset is fetched once and a rebuilt one gets a folder of its
own. The bucket holds what a local dataset folder holds, plus `objects.json` ({path: [size, sha256]} of every
other file). A build uploads the files, then objects.json, then manifest.json, and first removes the old
manifest: a reader sees the previous dataset whole, the new one whole, or none (and is told to run again).

A pretraining dataset's splits are fetched when the token store opens them (`store.open_split`), from the list
the copy keeps in `remote.json` ({"url", "stream", "objects": {path: [size, sha256]} of the split folders' files}):
a reader of the held-out split (`diffgemma-eval`) never copies the training split. With `data.stream_tokens` the
local copy (`<manifest key>-stream/`) never holds the token shards, nearly all of a pretraining dataset's bytes:
opening a split fetches its document starts only, `remote.json` also records each token shard's size as listed
at the fetch, and the token store reads each batch's rows from the bucket in ranged requests (data/store.py). A
host then needs no disk for the corpus and a run starts without copying it.

Fetching reuses a cached file of the recorded size (one cut short or missing is fetched again) and checks each
downloaded file's size and sha256. Every file is written under a temporary name and renamed, so processes that
share a host (and a cache) never read half a file, whichever of them fetches it.

In a multi-process run (`build_shared`) a pretraining dataset is built by every process together: each builds its
share of the corpus's tasks (data/build.py) in a folder on its own disk, passing the few files the others need
(digest tables, the tokenizer, shard entries) through a folder in the bucket (data/exchange.py), and uploads the
shards it built when the dataset is published; a host then needs disk for its share of the tokens only, and every
host's cores tokenise. An SFT dataset (small, one file per split) is built by process 0 while the others wait.
Either way process 0 reports on a board (data/build_status.py): the job's own key-value store when the JAX
runtime's is there (what the trainer passes: a status in the bucket would be read by every job building the same
folder at once, a sweep started together), else `build-status.json` in the bucket: a heartbeat every 30 s while
it builds, then {"ok": true} or {"error": its one-line message}. The other processes follow it from step to step
and fetch the dataset once it is published, fail at once with process 0's message (or, building together, any
process's), or fail, saying so, once its beats have stopped for 10 minutes; a build of a large corpus may take
hours, so they set no deadline on the build itself. The old status is deleted before a start barrier that every
process passes, so what they find after it is this run's. The manifest itself cannot tell them: a rebuild
replaces it only at the end, so an old one is there meanwhile.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import uuid
from typing import Callable

from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.data import build_status
from diffgemma_jax.data.build import BuildOptions, Phases, agree_to_build, agreed_current
from diffgemma_jax.data.exchange import Exchange
from diffgemma_jax.data.store import REMOTE_FILE, is_token_shard
from diffgemma_jax.errors import DataError

MANIFEST_FILE = "manifest.json"
OBJECTS_FILE = "objects.json"
STATUS_FILE = "build-status.json"
_NOT_DATA = (MANIFEST_FILE, OBJECTS_FILE, STATUS_FILE, REMOTE_FILE)  # bucket files that are not the dataset's
STREAM_SUFFIX = "-stream"  # a streamed copy's folder: `<manifest key>-stream`, without the token shards


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


def _local_files(folder: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def _objects(url: str, listed: dict[str, int] | None = None) -> dict[str, list]:
  """{path: [size, sha256 or None]} of the dataset's files: its objects.json, or (a folder copied into the bucket
  by other tools) a listing, sizes only (`listed`, when the caller has listed the folder already)."""
  recorded = _read(storage.join(url, OBJECTS_FILE))
  if recorded is not None:
    return json.loads(recorded)
  listed = storage.folder_sizes(url) if listed is None else listed
  return {rel: [size, None] for rel, size in listed.items() if rel not in _NOT_DATA}


def fetch(url: str, cache_root: str, key: str = "data.dir", *, max_bytes: int = 0, stream: bool = False) -> str:
  """The local copy of the dataset in the bucket folder `url`, fetched into `cache_root` where missing; `key`:
  the config key that names it (for the error when no dataset is there). With `max_bytes` > 0, the cache is then
  pruned to that size (`prune`). A token store's split folders are fetched when the split is opened
  (`store.open_split`, from the copy's `remote.json`). With `stream` (`data.stream_tokens`), the token shards
  (`*.tokens`, nearly all of a pretraining dataset's bytes) are never copied: their sizes, listed now, go to
  `remote.json`, and the token store reads their rows in the bucket."""
  return in_use(_copy(url, cache_root, key, stream=stream), cache_root, max_bytes)


def _deferred(manifest: bytes) -> Callable[[str], bool]:
  """Which files of a dataset wait for their split to be opened: those under a token store split's folder (an SFT
  dataset's records, read as files, are copied at once)."""
  try:
    parsed = json.loads(manifest)
  except ValueError:
    parsed = {}
  store = parsed.get("store") if isinstance(parsed, dict) and parsed.get("kind", "text") == "text" else None
  splits = set((store or {}).get("splits", {}))
  return lambda rel: "/" in rel and rel.split("/")[0] in splits


def _copy(url: str, cache_root: str, key: str = "data.dir", *, stream: bool = False) -> str:
  manifest = _read(storage.join(url, MANIFEST_FILE))
  if manifest is None:
    raise DataError(f"{key} {url}: no dataset there (no {MANIFEST_FILE}); build it first (diffgemma-train "
                    f"builds data.recipe into data.dir)")
  local = os.path.join(cache_root, _key(url), _key(manifest) + (STREAM_SUFFIX if stream else ""))
  listed = storage.folder_sizes(url) if stream else None  # what the bucket holds now (one listing)
  objects, deferred = _objects(url, listed), _deferred(manifest)
  storage.download_many([(storage.join(url, rel), os.path.join(local, rel), size, sha256)
                         for rel, (size, sha256) in sorted(objects.items())
                         if not deferred(rel) and not storage.has_file(os.path.join(local, rel), size)])
  later = {rel: entry for rel, entry in objects.items() if deferred(rel)}
  if later or stream:  # what the token store fetches (or streams) when it opens a split (store.open_split)
    record = {"url": url, "stream": stream, "objects": later}
    if stream:  # a shard cut or replaced since the build fails when the split opens
      record["sizes"] = {rel: listed[rel] for rel in later if is_token_shard(rel) and rel in listed}
    os.makedirs(local, exist_ok=True)
    storage.write_file_atomic(os.path.join(local, REMOTE_FILE), json.dumps(record, indent=1, sort_keys=True).encode())
  manifest_path = os.path.join(local, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    # last: a complete copy (but for the splits, fetched as they open)
    storage.write_file_atomic(manifest_path, manifest)
  return local


# dataset folders of the cache this process has fetched or built: it never evicts them
_IN_USE: set[str] = set()
# {cache root: its cap in bytes} of the caches this process fetched from with a cap (data.cache_max_gb)
_CAPS: dict[str, int] = {}


def in_use(local: str, cache_root: str, max_bytes: int) -> str:
  """Marks the folder `local` of the cache `cache_root` (a dataset's copy, an evaluation set) as used now by this
  process, which never evicts it, and with `max_bytes` > 0 prunes the cache to that size (`prune`); returns it."""
  os.utime(local)  # its last use: what eviction orders by
  _IN_USE.add(os.path.realpath(local))
  if max_bytes > 0:
    _CAPS[os.path.realpath(cache_root)] = max_bytes
    prune(cache_root, max_bytes)
  return local


def make_room(local: str, incoming: int) -> None:
  """Before `incoming` bytes are fetched into the copy `local` (a split opened, `store.open_split`): when this
  process fetched that copy under a cap, the least recently used other copies are deleted until the cache and the
  incoming bytes fit it (a copy's splits come when they are opened, so the cap's prune at the fetch did not count
  them). Nothing where this process set no cap on that cache (a data loader's worker process, say)."""
  cache_root = os.path.dirname(os.path.dirname(os.path.realpath(local)))
  cap = _CAPS.get(cache_root)
  if cap is not None and os.path.realpath(local) in _IN_USE:
    prune(cache_root, max(cap - incoming, 0))


def _dataset_folders(cache_root: str) -> list[str]:
  """`<cache>/<URL key>/<manifest key>` folders and `<cache>/eval-sets/<key>` (not the `build-*` scratch folders
  of builds nor the `*.partial` staging folders of builds in progress)."""
  found = []
  for url_key in sorted(os.listdir(cache_root)) if os.path.isdir(cache_root) else []:
    parent = os.path.join(cache_root, url_key)
    if os.path.isdir(parent):
      found += [os.path.join(parent, name) for name in sorted(os.listdir(parent))
                if not name.startswith("build-") and not name.endswith(".partial")
                and os.path.isdir(os.path.join(parent, name))]
  return found


def prune(cache_root: str, max_bytes: int) -> list[str]:
  """Deletes the least recently used dataset folders of the cache (copies and evaluation sets; `data.cache_max_gb`)
  until its files take at most `max_bytes`, never one this process uses (it may hold more then); returns the
  folders deleted. A file that folders share (versions hard-linked by a rebuild) counts once, and frees space with
  the last folder holding it."""
  files: dict[str, dict[tuple, int]] = {}  # folder -> {(device, inode): size}
  for folder in _dataset_folders(cache_root):
    files[folder] = {}
    for rel in _local_files(folder):
      try:
        st = os.stat(os.path.join(folder, rel))
      except FileNotFoundError:  # deleted meanwhile by another process
        continue
      files[folder][(st.st_dev, st.st_ino)] = st.st_size
  holders: dict[tuple, int] = {}
  sizes: dict[tuple, int] = {}
  for held in files.values():
    for inode, size in held.items():
      holders[inode] = holders.get(inode, 0) + 1
      sizes[inode] = size
  total = sum(sizes.values())
  deleted = []
  for folder in sorted(files, key=os.path.getmtime):
    if total <= max_bytes:
      break
    if os.path.realpath(folder) in _IN_USE:
      continue
    shutil.rmtree(folder, ignore_errors=True)
    deleted.append(folder)
    for inode in files[folder]:
      holders[inode] -= 1
      if not holders[inode]:
        total -= sizes[inode]
    parent = os.path.dirname(folder)
    if not os.listdir(parent):
      os.rmdir(parent)
  return deleted


def upload(local: str, url: str) -> None:
  """Replaces the dataset in the bucket folder `url` by the local dataset folder `local` (see the module doc)."""
  (epath.Path(url) / MANIFEST_FILE).unlink(missing_ok=True)
  _publish(local, url, _put_files(local, url))


def _put_files(local: str, url: str) -> dict[str, list]:
  """Uploads the dataset files of the local folder `local` into the bucket folder `url`, all but the manifest
  (several at once); returns their {path: [size, sha256]}."""
  files = [rel for rel in _local_files(local) if rel not in (MANIFEST_FILE, OBJECTS_FILE, REMOTE_FILE)]
  objects = {rel: [os.path.getsize(os.path.join(local, rel)), storage.file_sha256(os.path.join(local, rel))]
             for rel in files}
  storage.upload_many([(os.path.join(local, rel), storage.join(url, rel)) for rel in files])
  return objects


def _publish(local: str, url: str, objects: dict[str, list]) -> None:
  """Completes a dataset whose files `objects` are in the bucket folder `url`: objects.json, then `local`'s
  manifest, then deletes the previous build's files that this one does not have."""
  target = epath.Path(url)
  (target / OBJECTS_FILE).write_text(json.dumps(objects, indent=1, sort_keys=True))
  epath.Path(os.path.join(local, MANIFEST_FILE)).copy(target / MANIFEST_FILE, overwrite=True)
  for rel in set(storage.folder_sizes(url)) - set(objects) - set(_NOT_DATA):
    (target / rel).unlink(missing_ok=True)


def _link_tree(source: str, target: str) -> None:
  """`target` as a copy of the folder `source` made of hard links (a build there replaces files, never edits
  them), or of copies where links cannot be made; a file `target` holds already is kept."""
  for rel in _local_files(source):
    if rel == REMOTE_FILE:  # the local copy's own record, not the dataset's
      continue
    path = os.path.join(target, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
      os.link(os.path.join(source, rel), path)
    except FileExistsError:  # another process of this host put it there (the same file of the same dataset)
      pass
    except OSError:  # no links here: a copy, under a temporary name
      partial = f"{path}.partial-{uuid.uuid4().hex[:12]}"
      shutil.copyfile(os.path.join(source, rel), partial)
      os.replace(partial, path)


def _discard(scratch: str) -> None:
  """Deletes a build's scratch folder and the lock file the recipe's build took beside it (`data_recipes.
  build_lock`: one was left in the cache at every start of a run on a bucket dataset), and gives up the folder's
  ownership (`_own`)."""
  shutil.rmtree(scratch, ignore_errors=True)
  pathlib.Path(scratch.rstrip("/") + ".lock").unlink(missing_ok=True)
  owner = _OWNED.pop(scratch, None)
  if owner is not None:
    pathlib.Path(scratch + OWNER_SUFFIX).unlink(missing_ok=True)
    owner.close()


# The scratch folders of builds done together (`_build_together`: `build-<12 hex>`, one per process and build) are
# owned: `<scratch>.owner` holds its process's id under an exclusive flock from before the folder exists until it
# is deleted. A process killed outright (SIGKILL, the OOM killer, a node lost) leaves its folders (its share of
# the shards, its staging) and its lock is released with it; the next build of the same URL on that host or cache
# deletes every folder whose owner file it can lock (`_sweep`). Before, each such kill left them in the cache for
# good. The single-process build's resumable folder (`build-host-*`) has no owner and is kept for its resume.
OWNER_SUFFIX = ".owner"
_OWNED: dict[str, object] = {}  # scratch folder -> its open, locked owner file
_SWEPT = re.compile(r"build-[0-9a-f]{12}")


def _own(scratch: str) -> bool:
  """Takes the ownership of the scratch folder `scratch` before it is made; False where the filesystem has no locks
  (the folder is then made unowned, and a kill leaves it as before)."""
  os.makedirs(os.path.dirname(scratch), exist_ok=True)
  f = open(scratch + OWNER_SUFFIX, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.close()
    os.remove(scratch + OWNER_SUFFIX)
    return False
  f.write(f"{os.getpid()} {socket.gethostname()}\n")  # written once locked: an empty file's owner is still starting
  f.flush()
  _OWNED[scratch] = f
  return True


def _sweep(parent: str) -> list[str]:
  """Deletes the scratch folders under `parent` (a URL's folder of the cache) whose owners are gone (`_own`), with
  what lies beside them (staging, lock and owner files); returns those deleted."""
  deleted = []
  for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
    base = name[:-len(OWNER_SUFFIX)]
    if not name.endswith(OWNER_SUFFIX) or not _SWEPT.fullmatch(base):
      continue
    path = os.path.join(parent, name)
    try:
      f = open(path, "r")
    except FileNotFoundError:  # deleted meanwhile: its owner ended, or another sweep took it
      continue
    with f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:  # held: a build in progress (or no locks here: nothing can be told)
        continue
      if not f.read().strip():  # its owner took the file and has not locked it yet
        continue
      scratch = os.path.join(parent, base)
      for leftover in (scratch, scratch + ".partial"):
        shutil.rmtree(leftover, ignore_errors=True)
      for leftover in (scratch + ".lock", path):
        pathlib.Path(leftover).unlink(missing_ok=True)
      deleted.append(scratch)
  return deleted


def _build_on_copy(url: str, cache_root: str, build: Callable[..., object], scratch: str, *, stream: bool,
                   **job) -> tuple[str | None, bytes | None]:
  """Runs `build(scratch, **job)` on a hard-linked copy of what the bucket folder `url` holds (the files `fetch`
  copies at once: a recipe decides whether a dataset is current from its manifest and tokenizer, not its splits);
  returns (that copy, the bucket's manifest), both None where the bucket holds no dataset."""
  before = _read(storage.join(url, MANIFEST_FILE))
  copy = _copy(url, cache_root, stream=stream) if before is not None else None
  if copy is not None and not os.path.isfile(os.path.join(scratch, MANIFEST_FILE)):  # (not over a kept build)
    _link_tree(copy, scratch)
  build(scratch, **job)
  return copy, before


def _scratch(url: str, cache_root: str) -> str:
  """A new build's scratch folder in the cache, beside the copies of `url`."""
  return os.path.join(cache_root, _key(url), f"build-{uuid.uuid4().hex[:12]}")


def resumable_scratch(url: str, cache_root: str) -> str:
  """The scratch folder of `build_in_bucket`'s builds of `url` on this host: the same for every build, so the
  staging folder an interrupted build kept beside it (`<scratch>.partial`, data/build.py) is found and resumed by
  the next; one per host, so hosts sharing a cache (a home folder on NFS) never build into one folder."""
  return os.path.join(cache_root, _key(url), f"build-host-{_key(socket.gethostname())[:12]}")


def build_in_bucket(url: str, cache_root: str, build: Callable[[str], object], *, max_bytes: int = 0,
                    stream: bool = False) -> str:
  """Makes the dataset in the bucket folder `url` current and returns its local copy: `build(folder)` (a
  recipe's build, which keeps a dataset that is current) runs on a local copy of what the bucket holds, and what
  it changed is uploaded. Run by one process at a time (process 0 of a run; the others `fetch` after it). The build
  runs on the files `fetch` copies at once (a recipe decides whether a dataset is current from its manifest and
  tokenizer, not its splits), and what it returns is `fetch`'s copy, the splits fetched when they open; a rebuild's
  local files become that copy (with `stream`, they are deleted). Builds of `url` on this host take turns
  (`resumable_scratch`, locked by `<scratch>.job`), and one that an interruption stopped (a preemption, a kill) is
  resumed by the next where the recipe's build resumes (data/build.py: the same corpus, settings and tokenizer)."""
  scratch = resumable_scratch(url, cache_root)
  with storage.file_lock(scratch + ".job", f"building data.dir {url} on this host"):
    if _unpublished(scratch, url):
      # a build that ended but was stopped before its upload did (hours of tokenising for a large corpus): the
      # recipe finds it current, or rebuilds it, and what it holds is uploaded
      print(f"data: {scratch} holds a build of data.dir {url} that was not uploaded; uploading it",
            file=sys.stderr, flush=True)
    else:
      shutil.rmtree(scratch, ignore_errors=True)  # a killed build's copy (its staging, `.partial`, is kept)
    return _build_in_scratch(url, cache_root, build, scratch, max_bytes=max_bytes, stream=stream)


def _unpublished(scratch: str, url: str) -> bool:
  """Whether `scratch` holds a build that ended (its manifest) and is not the one in the bucket folder `url` (a
  bucket that cannot be read counts as not holding it: the build is kept)."""
  kept = _read(os.path.join(scratch, MANIFEST_FILE))
  if kept is None:
    return False
  try:
    return kept != _read(storage.join(url, MANIFEST_FILE))
  except Exception:  # pylint: disable=broad-except
    return True


def _build_in_scratch(url: str, cache_root: str, build: Callable[[str], object], scratch: str, *, max_bytes: int,
                      stream: bool) -> str:
  uploaded = False
  try:
    copy, before = _build_on_copy(url, cache_root, build, scratch, stream=stream)
    with open(os.path.join(scratch, MANIFEST_FILE), "rb") as f:
      after = f.read()
    if after == before:  # current: the copy made for the build is the one to read
      uploaded = True
      return in_use(copy, cache_root, max_bytes)
    upload(scratch, url)
    uploaded = True
    local = os.path.join(os.path.dirname(scratch), _key(after))
    if not stream and not os.path.isdir(local):  # the build's files: this version's copy, nothing to fetch
      try:
        os.replace(scratch, local)
      except OSError:  # another process's copy of the same dataset got there first
        pass
    return in_use(_copy(url, cache_root, stream=stream), cache_root, max_bytes)
  finally:
    if uploaded or not _unpublished(scratch, url):  # a build that ended but was not uploaded stays for the next
      _discard(scratch)


def build_shared(url: str, cache_root: str, build: Callable[..., object], *, process_index: int,
                 barrier: Callable[[str], None], poll_s: float = build_status.POLL_S,
                 heartbeat_s: float = build_status.HEARTBEAT_S, stale_s: float = build_status.STALE_S,
                 max_bytes: int = 0, board: build_status.Board | None = None, stream: bool = False,
                 process_count: int = 1, build_id: str = "") -> str:
  """`build_in_bucket` for a run of several processes; returns the local copy. Process 0 reports on `board`
  (default `STATUS_FILE` in the bucket; a build_status.JobBuild: see the module doc): a failure on process 0 is
  raised there as it was and on every other process as a DataError with its message, as soon as they poll; a
  process 0 that stops beating for `stale_s` fails them too. `barrier(name)`: the run's sync point.

  With `process_count` > 1 and a `build_id` (the same on every process of the job, another for every build), the
  processes build together (a pretraining recipe's build): `build(folder, process_index=, process_count=,
  barrier=, exchange=)` runs on every process, each building its share of the corpus in a folder on its own disk
  and uploading its own shards (`_build_together`). Else process 0 builds alone, `build(folder)`, while the others
  wait, then fetch."""
  board = board or build_status.FileBoard(storage.join(url, STATUS_FILE))
  job = build_status.JobBuild(board, process_index=process_index,
                              barrier=barrier, what=f"data.dir {url}", start="diffgemma_bucket_dataset_start",
                              poll_s=poll_s, heartbeat_s=heartbeat_s, stale_s=stale_s)
  together = process_count > 1 and bool(build_id)
  current = built = None
  with job:
    if together:
      current, built = _build_together(url, cache_root, build, job=job, process_index=process_index,
                                       process_count=process_count,
                                       exchange=Exchange(f"{url.rstrip('/')}.partial/{build_id}"), stream=stream)
    elif process_index == 0:
      return build_in_bucket(url, cache_root, build, max_bytes=max_bytes, stream=stream)
  try:
    if process_index != 0:
      job.wait_outcome()
    local = current or _copy(url, cache_root, stream=stream)
    if built is not None and not stream:  # the shards this process built: its copy never fetches them
      _link_tree(built, local)
    return in_use(local, cache_root, max_bytes)
  finally:
    if built is not None:
      _discard(built)


def _build_together(url: str, cache_root: str, build: Callable[..., object], *, job: build_status.JobBuild,
                    process_index: int, process_count: int, exchange: Exchange,
                    stream: bool) -> tuple[str | None, str | None]:
  """One process's part of a build that every process runs (`build_shared`): the build, on a local copy of what
  the bucket holds, each process building its tasks' shards into its own folder and passing what the others need
  through `exchange` (data/exchange.py); then process 0 removes the bucket's manifest, every process uploads what
  it built (process 0: its shards, the tokenizer and the counts; the others: their shards), and process 0
  publishes objects.json (every process's files) and the manifest. Returns (the copy the build ran on, when the
  dataset was current: every process finds that from the same manifest and tokenizer, and nothing is built; the
  folder of the files this process built, to delete once its copy holds them), one of them None."""
  p = process_index
  scratch = _scratch(url, cache_root)
  _own(scratch)
  swept = _sweep(os.path.dirname(scratch))
  if swept:
    print(f"data: deleted {len(swept)} scratch folder(s) of killed builds of data.dir {url} in "
          f"{os.path.dirname(scratch)}", file=sys.stderr, flush=True)
  options = BuildOptions(process_index=p, process_count=process_count, barrier=job.barrier, exchange=exchange)
  try:
    copy, before = _build_on_copy(url, cache_root, build, scratch, stream=stream, process_index=p,
                                  process_count=process_count, barrier=job.barrier, exchange=exchange)
    unchanged = before is not None and _read(os.path.join(scratch, MANIFEST_FILE)) == before
    if exchange.found is None:  # the recipe did not build (build_store agrees with the others as it starts)
      agree_to_build(options, current=unchanged)
    if unchanged and exchange.found == "current":
      agreed_current(options)
      _discard(scratch)
      return copy, None
    phases = Phases(scratch, options)

    def unpublish():  # before any file is replaced: readers find no dataset, never a mix of two
      if p == 0:
        (epath.Path(url) / MANIFEST_FILE).unlink(missing_ok=True)

    def upload_own():
      exchange.write_text(f"objects/{p}.json", json.dumps(_put_files(scratch, url)))

    phases.run("unpublish", unpublish)
    phases.run("upload", upload_own)
    if p == 0:
      objects = {}
      for rel in exchange.listing("objects"):
        objects.update(json.loads(exchange.read_text(rel)))
      _publish(scratch, url, objects)
      exchange.clear()
    return None, scratch
  except BaseException as e:
    _discard(scratch)
    try:
      if exchange.found is None and isinstance(e, Exception):
        # Failed before the processes agreed (the recipe could not read its sources here, say: a data.source on
        # another host's disk): the others wait at that agreement's barrier. Meet them there with the error, which
        # every process then raises (the others as `the dataset build failed on process <p>: ...`).
        Phases("", options).run("found", functools.partial(_reraise, e))
    finally:
      if p == 0:  # after the failed phase's barrier: the others have read the errors (a late one learns from
        try:      # process 0's outcome on the board instead)
          exchange.clear()
        except Exception:  # pylint: disable=broad-except (the build's own error is the one to raise)
          pass
    raise


def _reraise(error: Exception) -> None:
  raise error

"""Paths of a run: local paths and object-storage URLs (`gs://bucket/run`, `s3://bucket/run`) through one
abstraction, `etils.epath` (what Orbax itself uses), so a workdir can live in a bucket.

Local paths are made absolute; URLs are kept as written (`os.path.abspath("gs://b/run")` would make them
`/cwd/gs:/b/run`). Orbax writes checkpoints to object storage through tensorstore: `gs://` natively; for `s3://`
Orbax 0.12 builds no tensorstore spec (it normalises the URL to `s3:/...` and takes it for a local path), so
`use_object_storage` adds one (tensorstore's `s3` driver, with `$AWS_ENDPOINT_URL` for S3-compatible servers such
as MinIO; for `gs://` it passes `$STORAGE_EMULATOR_HOST`, a GCS emulator, on to tensorstore). Object stores cannot
rename a folder, so checkpoints there are committed by a marker file instead of a rename (Orbax's
`CommitFileTemporaryPath`, what it does on GCS).

Data goes through here too: source files are opened as streams (`open_binary`: fsspec reads an object in ranges),
listed (`find_files`, `folder_sizes`) and stamped (`stamp`: size and ETag/generation); libraries that read local
files only get a local copy (`local_file`, `download`); a reader that needs a few byte ranges of a large object
(a safetensors shard) reads just those (`read_range`). A dataset folder in a bucket:
data/remote_dataset.py. Files a user names on the command line (`--prompts`, `--records`, `--output`) are opened
(`open_input`), checked (`check_writable`) and written (`write_text`) here, so each entry point takes a bucket URL
wherever it takes a path, with the same one-line errors.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import fcntl
import functools
import hashlib
import io
import os
import re
import sys
import tempfile
import uuid
from typing import Iterable, Iterator

import fsspec
from etils import epath

from diffgemma_jax.errors import ConfigError

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")
# what points each store's clients at a server other than the cloud's own (MinIO, an emulator): named in errors
_ENDPOINT_VARIABLES = {"s3": "AWS_ENDPOINT_URL", "gs": "STORAGE_EMULATOR_HOST"}

# Folder listings are never cached. A run's bucket is written by other processes (the other hosts, a dataset
# build), by tensorstore and by a second fsspec client in this one (epath makes its own), so a cached listing goes
# stale; gcsfs then takes any object under a folder missing from a cached listing of its parent for absent (a
# dataset another process built is "not there", a file just uploaded "cannot be read"). A default of fsspec's
# configuration, so it holds for epath's clients too; an explicit setting wins.
for _protocol in ("gcs", "s3"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_url(path) -> bool:
  return bool(_URL.match(str(path)))


_SLASH_MISSING = re.compile(r"^(gs|s3|gcs):(/?[^/]|$)")  # s3:/bucket, gs:bucket: a local folder named "s3:" else


def check_not_mistyped_url(path, key: str) -> None:
  """A ConfigError naming `key` for a path that is a bucket URL with a slash missing (`s3:/bucket/x`), which would
  otherwise be taken for a local folder named `s3:`."""
  if path and _SLASH_MISSING.match(str(path)):
    scheme = str(path).split(":", 1)[0]
    raise ConfigError(f"{key} {path!r} is a bucket URL with a slash missing (it would be a local folder named "
                      f"'{scheme}:'); write {scheme}://bucket/path, or ./{path} for such a local folder")


def resolve(path) -> str:
  """`path` as the run stores it: a URL as written, a local path made absolute."""
  return str(path).rstrip("/") if is_url(path) else os.path.abspath(str(path))


def join(path, *parts) -> str:
  return str(epath.Path(str(path)).joinpath(*parts)) if is_url(path) else os.path.join(str(path), *parts)


def open_path(path) -> epath.Path:
  return epath.Path(str(path))


def filesystem(url):
  """(fsspec filesystem, path within it) of a URL: what epath itself reads buckets through (fsspec keeps one
  client per store and process)."""
  return fsspec.core.url_to_fs(str(url))


LINE_BUFFER_BYTES = 1 << 20  # what `open_binary`'s buffer over an object file asks it for at a time


def open_binary(path, *, exact_reads: bool = False):
  """A seekable binary file object: a local file, or an object read in ranges as it is consumed (streamed).
  `exact_reads` (objects): each read is one request for exactly its bytes, for reads at scattered offsets (a
  Parquet footer and column chunks), where the store client's read-ahead (s3fs: a 50 MB block from every new
  position) fetched 12x a corpus of 1 MB row groups over a build."""
  if not is_url(path):
    return open(path, "rb")
  if exact_reads:
    fs, key = filesystem(path)
    return fs.open(key, "rb", cache_type="none")
  # Buffered: an fsspec file's own readline reads a whole block (copied out of its cache) and seeks back, so
  # iterating the lines of an object (--records, --prompts, a JSONL source) copied a block per line: 50 MB with
  # s3fs, the whole rest of an object under that size (83x slower for 20,000 lines of 8 MB)
  return io.BufferedReader(epath.Path(str(path)).open("rb"), buffer_size=LINE_BUFFER_BYTES)


def read_range(path, start: int, end: int | None) -> bytes:
  """Bytes [start, end) of the file at `path` (end None: to its end; fewer when it ends sooner): a seek and a read
  locally, one ranged request for exactly those bytes from a bucket (no read-ahead, unlike `open_binary`'s
  buffered object files)."""
  if end is not None and end <= start:
    return b""
  if not is_url(path):
    with open(path, "rb") as f:
      f.seek(start)
      return f.read() if end is None else f.read(end - start)
  fs, key = filesystem(path)
  return fs.cat_file(key, start=start or None, end=end)


def file_sha256(path) -> str:
  """The sha256 of a local file or an object, read in chunks."""
  digest = hashlib.sha256()
  with open_binary(path) as f:
    while chunk := f.read(8 << 20):
      digest.update(chunk)
  return digest.hexdigest()


# Within `remembered_listings`: {URL: the listing's entry} of what `find_files` listed, which `file_size` and `stamp`
# answer from instead of asking the store about each object.
_LISTED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("diffgemma_listed", default=None)


@contextlib.contextmanager
def remembered_listings():
  """Within the block (a dataset build's planning, in this thread), the sizes and versions of the objects
  `find_files` lists answer `file_size` and `stamp`: a corpus of a thousand objects cost a thousand requests for
  their sizes and a thousand more for their versions, at every start of a run (a recipe stamps its files to know
  whether its dataset is current). Outside it every call asks the store: an object rewritten since a listing is
  never taken for the old one."""
  token = _LISTED.set({})
  try:
    yield
  finally:
    _LISTED.reset(token)


def _object_info(path) -> dict | None:
  """The store's entry for the object at the URL `path` (the listing's within `remembered_listings`), or None."""
  listed = _LISTED.get()
  if listed is not None and str(path) in listed:
    return listed[str(path)]
  fs, key = filesystem(path)
  try:
    return fs.info(key)
  except FileNotFoundError:
    return None


def file_size(path) -> int | None:
  """The size of the file at `path`, or None when no file is there."""
  if not is_url(path):
    return os.path.getsize(path) if os.path.isfile(path) else None
  info = _object_info(path)
  return int(info["size"]) if info is not None and info.get("type") == "file" else None


def stamp(path) -> list:
  """[size, version] of a file, which changes when it is rewritten: its mtime locally, the object's ETag (S3) or
  generation (GCS) in a bucket."""
  if not is_url(path):
    return [os.path.getsize(path), os.path.getmtime(path)]
  info = _object_info(path)
  if info is None:
    raise FileNotFoundError(path)
  version = next((info[k] for k in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified")
                  if info.get(k)), "")
  return [int(info["size"]), str(version)]


def find_files(url: str, key: str) -> list[str]:
  """The files a URL names: one object, every object under a folder, or those a glob (`*`, `**`) matches, as
  URLs; a ConfigError naming `key` when the bucket cannot be reached or nothing is there. One listing, whose sizes
  and versions answer `file_size` and `stamp` within `remembered_listings`, where the same URL asked again (a
  check of the files before the build that lists them) is answered from it."""
  listed = _LISTED.get()
  if listed is not None and ("find_files", str(url)) in listed:
    return list(listed[("find_files", str(url))])
  check_reachable(url, key)
  fs, path = filesystem(url)
  if any(c in path for c in "*?["):
    found = fs.glob(path, detail=True)
  elif fs.isfile(path):
    found = {path: {"type": "file"}}  # its size and version: asked when needed
  else:
    found = fs.find(path, detail=True)
    if not found:
      raise ConfigError(f"{key} {url!r} does not exist")
  urls = []
  for name, info in found.items():
    if info.get("type") == "file":
      urls.append(str(url) if name == path else fs.unstrip_protocol(name))
      if listed is not None and "size" in info:
        listed[urls[-1]] = info
  if listed is not None:
    listed[("find_files", str(url))] = sorted(urls)
  return sorted(urls)


def folder_sizes(url: str) -> dict[str, int]:
  """{path relative to the folder: size} of every object under the folder `url` (none: {})."""
  fs, path = filesystem(url)
  found = fs.find(path, detail=True)
  return {key[len(path.rstrip("/")) + 1:]: int(info["size"]) for key, info in found.items()
          if info.get("type") == "file"}


def common_folder(paths: list[str]) -> tuple[str, list[str]]:
  """(the folder holding every path, each path relative to it): local paths made absolute, URLs of one bucket."""
  if not any(is_url(p) for p in paths):
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else "."
    return root, [os.path.relpath(os.path.abspath(p), root) for p in paths]
  bucket = "/".join(paths[0].split("/")[:3])
  if any(not p.startswith(bucket + "/") for p in paths):
    raise ConfigError(f"data.source: {paths[0]} and the other files are not all in the bucket {bucket}; name "
                      f"files of one bucket, or local files only")
  folders = [p[len(bucket) + 1:].split("/")[:-1] for p in paths]
  common = os.path.commonprefix(folders)
  root = "/".join([bucket, *common])
  return root, [p[len(root) + 1:] for p in paths]


def download(url: str, target: str, *, size: int | None = None, sha256: str | None = None) -> None:
  """Copies the object at `url` to the local file `target`, atomically (a temporary name, then a rename, so
  processes sharing `target` never see half a file), checking its size and digest when given."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f"{target}.partial-{uuid.uuid4().hex[:12]}"
  digest, written = hashlib.sha256(), 0
  try:
    with open_binary(url) as source, open(partial, "wb") as f:
      while chunk := source.read(8 << 20):
        f.write(chunk)
        digest.update(chunk)
        written += len(chunk)
    if size is not None and written != size:
      raise ConfigError(f"{url} holds {written} bytes, its listing says {size} (changed while it was read); "
                        f"run again")
    if sha256 is not None and digest.hexdigest() != sha256:
      raise ConfigError(f"{url} does not match its recorded sha256 (changed while it was read, or damaged); "
                        f"run again, or rebuild the dataset")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


TRANSFERS = 16  # concurrent requests of `download_many` and `upload_many`


def concurrently(fn, items: list, workers: int = TRANSFERS) -> list:
  """fn(item) for every item, `workers` at a time; results in order; the first failure is raised once every
  transfer begun has ended (none left writing behind the caller)."""
  if workers <= 1 or len(items) <= 1:
    return [fn(item) for item in items]
  with concurrent.futures.ThreadPoolExecutor(min(workers, len(items))) as pool:
    futures = [pool.submit(fn, item) for item in items]
    concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    for future in futures:
      future.cancel()
  for future in futures:
    if not future.cancelled() and future.exception() is not None:
      raise future.exception()
  return [future.result() for future in futures]


def download_many(items: list[tuple], workers: int = TRANSFERS) -> None:
  """`download(url, target, size=, sha256=)` for each (url, target[, size[, sha256]]), `workers` at once: a dataset
  of thousands of shards fetched one request at a time spends most of its time waiting on round trips."""
  def one(item):
    url, target, *rest = item
    download(url, target, size=rest[0] if rest else None, sha256=rest[1] if len(rest) > 1 else None)
  concurrently(one, list(items), workers)


def upload_many(items: list[tuple[str, str]], workers: int = TRANSFERS) -> None:
  """Copies each local file `source` to `target` (an object, or a local path) for each (source, target), `workers`
  at once."""
  def one(item):
    source, target = item
    if not is_url(target):
      os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    epath.Path(source).copy(epath.Path(target), overwrite=True)
  concurrently(one, list(items), workers)


def write_file_atomic(path: str, data: bytes | Iterable[bytes], *, sync: bool = False) -> None:
  """Writes the local file `path` whole or not at all: under a temporary name, then renamed over it (a reader, or
  a process killed meanwhile, never leaves half a file). `data`: the bytes, or pieces of them written one after
  the other (a large file never held whole). `sync`: on disk before the rename (a file of results a crash must not
  cost)."""
  partial = f"{path}.partial-{uuid.uuid4().hex[:12]}"
  try:
    with open(partial, "wb") as f:
      if isinstance(data, bytes):
        f.write(data)
      else:
        f.writelines(data)
      if sync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def has_file(path: str, size: int) -> bool:
  """Whether the local file `path` is there with `size` bytes (a copy a kill cut short is fetched again)."""
  return os.path.isfile(path) and os.path.getsize(path) == size


def local_file(path) -> str:
  """A local path holding the file at `path`: `path` itself, or for a URL a copy under the temporary folder (for
  libraries that read local files only, such as sentencepiece), keyed by the URL and the object's version and
  streamed there once."""
  if not is_url(path):
    return str(path)
  size, version = stamp(path)
  key = hashlib.sha256(f"{path}\0{version}".encode()).hexdigest()[:24]
  target = os.path.join(tempfile.gettempdir(), f"diffgemma-{key}-{os.path.basename(str(path))}")
  if not has_file(target, size):
    download(str(path), target, size=size)
  return target


@contextlib.contextmanager
def staged_folder(path, *, partial: bool = False) -> Iterator[str]:
  """A local folder to write the folder `path` into: `path` itself, or for a URL a temporary folder whose files
  are uploaded there (each object whole) when the block ends without an error; with `partial`, also when it
  fails (the files a run wrote before it failed are worth keeping: an evaluation's results without its samples)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    yield str(path)
    return
  with tempfile.TemporaryDirectory(prefix="diffgemma-upload-") as local:
    try:
      yield local
    except BaseException:
      if partial and any(names for _, _, names in os.walk(local)):
        upload_folder(local, str(path))
      raise
    epath.Path(str(path)).mkdir(parents=True, exist_ok=True)
    upload_folder(local, str(path))


@contextlib.contextmanager
def file_lock(path: str, what: str) -> Iterator[None]:
  """An exclusive lock on the local file `path` (fcntl.flock: released when the holder exits, however it exits)
  for the block; says once on stderr that it waits when another process holds it (`what`: what that process is
  doing, e.g. "building DIR"). On a filesystem without locks (Lustre mounted without flock) the block runs
  unlocked, saying so."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"data: another process is {what} (it holds {path}); waiting for it", file=sys.stderr, flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
      print(f"data: {path} cannot be locked ({e.strerror}); {what} without the lock", file=sys.stderr, flush=True)
      yield
      return
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def open_input(path, flag: str) -> Iterator:
  """The file a user named with `flag` (`--prompts`, `--records`), open for binary reading: a local file, or an
  object streamed in ranges; a ConfigError naming `flag` when its bucket cannot be reached or it is not there."""
  check_reachable(path, flag)
  try:
    f = open_binary(path)
  except OSError as e:
    raise ConfigError(f"{flag} {path} cannot be read: {e.strerror or 'no such object'}") from None
  with f:
    yield f


def check_writable(path, flag: str) -> None:
  """Fails naming `flag` before any work when the file `path` cannot be written: a local folder missing or
  read-only, a bucket that cannot be reached, or `path` a folder (of files or of objects) itself."""
  if is_url(path):
    check_reachable(path, flag)
    fs, key = filesystem(path)
    if fs.isdir(key):
      raise ConfigError(f"{flag} {path} is a directory; give a file path")
    return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ConfigError(f"{flag} {path} is a directory; give a file path")
  if not os.path.isdir(folder):
    raise ConfigError(f"{flag} {path}: the folder {folder} does not exist")
  if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise ConfigError(f"{flag} {path} is not writable")


def write_text(path, text: str) -> None:
  """Writes `text` to the file `path`: a local file (its folder made), or an object (written whole)."""
  if not is_url(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  epath.Path(str(path)).write_text(text)


def rename_folder(path: str, target: str) -> None:
  """Moves the folder `path` to `target` (same store): a rename on a local disk; on object storage, where folders
  are key prefixes that cannot be renamed, every object copied under the new prefix and then deleted."""
  if not is_url(path):
    os.rename(path, target)
    return
  fs, source = filesystem(path)
  destination = filesystem(target)[1]
  files = fs.find(source)  # objects only (fsspec's recursive mv also copies the prefix itself, which is no object)
  for name in files:
    fs.copy(name, destination + name[len(source):])
  fs.rm(files)


def upload_folder(local: str, url: str) -> str:
  """Copies every file under the local folder `local` to the folder `url` (a bucket URL or a local path), keeping
  the relative paths; returns `url`."""
  items = []
  for folder, _, names in os.walk(local):
    for name in sorted(names):
      rel = os.path.relpath(os.path.join(folder, name), local)
      items.append((os.path.join(folder, name), join(url, *rel.split(os.sep))))
  upload_many(items)
  return url


def check_local_folder(path: str, key: str) -> None:
  """That the local folder `path` exists or can be created, without creating it (a refused run writes nothing): a
  ConfigError naming `key` (the config key or flag that gave it) when a file is in the way or the nearest existing
  folder above it is not writable."""
  path = os.path.abspath(path)
  probe = path
  while not os.path.exists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ConfigError(f"{key} {path} cannot be created: a file is in the way ({probe}); give a folder this user can "
                      f"write")
  if probe != path and not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError(f"{key} {path} cannot be created: {probe} is not writable by this user; give a folder this "
                      f"user can write")


def check_reachable(path, flag: str) -> None:
  """For a URL: fails naming `flag` and the bucket when its bucket cannot be listed (unreachable endpoint, missing
  bucket, no credentials), before anything is computed."""
  if not is_url(path):
    return
  bucket = epath.Path("/".join(str(path).split("/")[:3]))
  endpoint = os.environ.get(_ENDPOINT_VARIABLES.get(str(path).split("://")[0], ""), "")
  where = f"{flag} {path}: the bucket {bucket} cannot be reached" + (f" (endpoint {endpoint})" if endpoint else "")
  try:
    found = bucket.exists()
    if found:
      next(iter(bucket.iterdir()), None)
  except Exception as e:  # pylint: disable=broad-except (each object-store client raises its own errors)
    raise ConfigError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
  if not found:
    raise ConfigError(f"{where}: it does not exist, or these credentials cannot see it; create it first")


def temporary_path_class(directory):
  """Orbax's way to commit a checkpoint in `directory`: a marker file on object storage, a rename elsewhere."""
  if not is_url(directory):
    return None
  use_object_storage()
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  return atomicity.CommitFileTemporaryPath


def _gcs_emulator_for_tensorstore() -> None:
  """Sends tensorstore where `$STORAGE_EMULATOR_HOST` sends gcsfs and Google's client libraries (a GCS emulator),
  unless `$TENSORSTORE_GCS_HTTP_URL` names a server itself: else a run's checkpoints would go to the real GCS and
  everything else to the emulator. Tensorstore reads that variable on every request; its GCS spec has no field."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator not in ("", "default") and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator if "://" in emulator else f"http://{emulator}"


@functools.cache
def use_object_storage() -> None:
  """Teaches Orbax's tensorstore spec builder `s3://` URLs, and its `gs://` one `$STORAGE_EMULATOR_HOST`
  (idempotent)."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=import-outside-toplevel
  normalize, remote, gcs_kvstore = (tensorstore_utils._normalize_path, tensorstore_utils._use_gcs_driver,  # pylint: disable=protected-access
                                    gcs_utils.get_kvstore_for_gcs)

  def normalize_s3(path: str) -> str:
    path = str(path)
    return "s3://" + os.path.normpath(path[len("s3://"):]) if path.startswith("s3://") else normalize(path)

  def kvstore(path: str) -> dict:
    if not str(path).startswith("s3://"):
      _gcs_emulator_for_tensorstore()
      return gcs_kvstore(path)
    bucket, _, key = str(path)[len("s3://"):].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    if os.environ.get("AWS_ENDPOINT_URL"):
      spec["endpoint"] = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
      spec["aws_region"] = region
    return spec

  tensorstore_utils._normalize_path = normalize_s3  # pylint: disable=protected-access
  tensorstore_utils._use_gcs_driver = lambda directory: str(directory).startswith("s3://") or remote(directory)  # pylint: disable=protected-access
  gcs_utils.get_kvstore_for_gcs = kvstore

"""Paths of a run: local paths and object-storage URLs (`gs://bucket/run`, `s3://bucket/run`) through one
abstraction, `etils.epath` (what Orbax itself uses), so a workdir can live in a bucket.

Local paths are made absolute; URLs are kept as written (`os.path.abspath("gs://b/run")` would make them
`/cwd/gs:/b/run`). Orbax writes checkpoints to object storage through tensorstore: `gs://` natively; for `s3://`
Orbax 0.12 builds no tensorstore spec (it normalises the URL to `s3:/...` and takes it for a local path), so
`use_object_storage` adds one (tensorstore's `s3` driver, with `$AWS_ENDPOINT_URL` for S3-compatible servers such
as MinIO). Object stores cannot rename a folder, so checkpoints there are committed by a marker file instead of a
rename (Orbax's `CommitFileTemporaryPath`, what it does on GCS).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Iterator

from etils import epath

from diffgemma_jax.errors import ConfigError

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_url(path) -> bool:
  return bool(_URL.match(str(path)))


def resolve(path) -> str:
  """`path` as the run stores it: a URL as written, a local path made absolute."""
  return str(path).rstrip("/") if is_url(path) else os.path.abspath(str(path))


def join(path, *parts) -> str:
  return str(epath.Path(str(path)).joinpath(*parts)) if is_url(path) else os.path.join(str(path), *parts)


def open_path(path) -> epath.Path:
  return epath.Path(str(path))


def local_file(path) -> str:
  """A local path holding the file at `path`: `path` itself, or for a URL a copy under the temporary folder (for
  libraries that read local files only, such as sentencepiece)."""
  if not is_url(path):
    return str(path)
  import hashlib
  import tempfile
  data = epath.Path(str(path)).read_bytes()
  target = os.path.join(tempfile.gettempdir(), "diffgemma-" + hashlib.sha256(data).hexdigest()[:24]
                        + "-" + os.path.basename(str(path)))
  if not os.path.isfile(target):
    with open(target + ".tmp", "wb") as f:
      f.write(data)
    os.replace(target + ".tmp", target)
  return target


@contextlib.contextmanager
def staged_folder(path) -> Iterator[str]:
  """A local folder to write the folder `path` into: `path` itself, or for a URL a temporary folder whose files
  are uploaded there (each object whole) when the block ends without an error."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    yield str(path)
    return
  import tempfile
  with tempfile.TemporaryDirectory(prefix="diffgemma-upload-") as local:
    yield local
    target = epath.Path(str(path))
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local)):
      epath.Path(os.path.join(local, name)).copy(target / name, overwrite=True)


def check_reachable(path, flag: str) -> None:
  """For a URL: fails naming `flag` and the bucket when its bucket cannot be listed (unreachable endpoint, missing
  bucket, no credentials), before anything is computed."""
  if not is_url(path):
    return
  bucket = epath.Path("/".join(str(path).split("/")[:3]))
  endpoint = os.environ.get("AWS_ENDPOINT_URL", "") if str(path).startswith("s3://") else ""
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


@functools.cache
def use_object_storage() -> None:
  """Teaches Orbax's tensorstore spec builder `s3://` URLs (idempotent)."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=import-outside-toplevel
  normalize, remote, gcs_kvstore = (tensorstore_utils._normalize_path, tensorstore_utils._use_gcs_driver,  # pylint: disable=protected-access
                                    gcs_utils.get_kvstore_for_gcs)

  def normalize_s3(path: str) -> str:
    path = str(path)
    return "s3://" + os.path.normpath(path[len("s3://"):]) if path.startswith("s3://") else normalize(path)

  def kvstore(path: str) -> dict:
    if not str(path).startswith("s3://"):
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

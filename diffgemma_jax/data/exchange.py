"""A folder through which the processes of one dataset build pass files when they share no filesystem.

A multi-process pretraining build (data/build.py) splits its tasks over the processes and has process 0 decide
and finish. On a shared filesystem they all work in one staging folder. A dataset built into a bucket
(data/remote_dataset.py) has each process build in a staging folder on its own disk instead, and what crosses
between them goes through an `Exchange`, a folder in the bucket beside the dataset (`<data.dir>.partial/<build
id>/`, one per build, so jobs building the same folder at once never read each other's files):

  at the start    each process: whether it found the dataset current or must build it (`found/<process>.current`
                  or `.build`); every process reads them all, and a split decision fails them all
  after scan      each process: its tasks' digest tables as one file and its tokenizer sample; process 0 reads
                  the others'
  after decide    process 0: the held-out decision and the tokenizer; the others read them
  after tokenise  each process: its shard entries and token counts; process 0 reads the others'
  after finish    process 0: the manifest, which every process returns
  on a failure    the failing process's one-line error (`errors/<process>`), raised by every process after the
                  phase's barrier

The token shards themselves never pass through it: each process uploads its own into the dataset when it is
published. Process 0 deletes the folder once the dataset is published, or once a failed step's barrier has passed
(a process that reads the errors after that learns of the failure from process 0's outcome on the board).
"""

from __future__ import annotations

import os

from etils import epath

from diffgemma_jax import storage


class Exchange:
  """The folder `url` (a bucket URL, or a local path) of one build's exchanged files, named by paths relative to
  it."""

  def __init__(self, url: str):
    self.url = str(url).rstrip("/")
    self.found: str | None = None  # what this process found: "current" or "build" (build.agree_to_build)

  def _at(self, rel: str) -> str:
    return storage.join(self.url, *rel.split("/"))

  def put(self, items: list[tuple[str, str]]) -> None:
    """Uploads each local file `path` as `rel`, for each (path, rel)."""
    storage.upload_many([(path, self._at(rel)) for path, rel in items])

  def get(self, rels: list[str], folder: str) -> None:
    """Downloads each `rel` to `folder/rel` (a FileNotFoundError when one is missing)."""
    storage.download_many([(self._at(rel), os.path.join(folder, *rel.split("/"))) for rel in rels])

  def write_text(self, rel: str, text: str) -> None:
    storage.write_text(self._at(rel), text)

  def read_text(self, rel: str) -> str | None:
    try:
      return epath.Path(self._at(rel)).read_text()
    except FileNotFoundError:
      return None

  def listing(self, folder: str) -> list[str]:
    """The paths (relative to the exchange) of the files under its `folder`, sorted; [] when there are none."""
    return sorted(f"{folder}/{rel}" for rel in storage.folder_sizes(self._at(folder)))

  def clear(self) -> None:
    """Deletes the exchange and everything in it."""
    fs, path = storage.filesystem(self.url)
    try:
      fs.rm(path, recursive=True)
    except FileNotFoundError:
      pass

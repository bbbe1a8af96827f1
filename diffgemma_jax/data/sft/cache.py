"""SFT rows kept on disk and read in place: a split of millions of examples is gigabytes of rows, more than a
process should hold (and every process of a run would hold it).

A cache is a folder beside the dataset: one raw int32 file per field (`tokens.bin`, `segment_ids.bin`,
`positions.bin`, `loss_mask.bin`, rows of `seq_len` one after another) and `rows.json` (the row count and length),
written last. The rows are written as they are made (`write_rows`: nothing but the row being written is held), into
a temporary folder renamed into place, so a cache is whole or absent; processes that build the same cache at once
each write their own and the first rename wins. `open_rows` maps the files read-only (`np.memmap`): a batch reads its
rows from the page cache.

Earlier versions cached a split's rows as one `.npz` file beside the data, which nothing reads any more;
`remove_old_npz_caches` deletes a split's (files of that naming only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Iterable

import numpy as np

from diffgemma_jax.data.sft.rows import KEYS

META = "rows.json"
# The old caches: <split>-sft-<template>-<seq_len>[-packed<unit>]-<16 hex digits of the tokenizer's hash>.npz, and
# the temporary file of a writer killed before its rename, <that name>.<pid>.tmp.npz.
OLD_NPZ_CACHE = r"{split}-sft-[a-z0-9_]+-[0-9]+(-packed[0-9]+)?-[0-9a-f]{{16}}\.npz(\.[0-9]+\.tmp\.npz)?"


def open_rows(folder: str) -> dict[str, np.ndarray] | None:
  """The cached rows {field: [N, seq_len] int32, read-only memory maps}, or None when the folder holds no whole
  cache."""
  meta_path = os.path.join(folder, META)
  if not os.path.isfile(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  shape = (int(meta["rows"]), int(meta["seq_len"]))
  if shape[0] == 0:
    return {k: np.zeros(shape, np.int32) for k in KEYS}
  return {k: np.memmap(os.path.join(folder, f"{k}.bin"), np.int32, "r", shape=shape) for k in KEYS}


def write_rows(folder: str, rows: Iterable[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """Writes `rows` (one row dict at a time) as the cache `folder` and opens it (`open_rows`)."""
  tmp = f"{folder}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
  os.makedirs(tmp)
  try:
    count = 0
    files = {k: open(os.path.join(tmp, f"{k}.bin"), "wb") for k in KEYS}  # pylint: disable=consider-using-with
    try:
      for row in rows:
        for key, f in files.items():
          f.write(np.ascontiguousarray(row[key], np.int32).tobytes())
        count += 1
    finally:
      for f in files.values():
        f.close()
    with open(os.path.join(tmp, META), "w") as f:
      json.dump({"rows": count, "seq_len": int(seq_len)}, f)
    try:
      os.rename(tmp, folder)
    except OSError:  # another process renamed its copy first
      if open_rows(folder) is None:
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return open_rows(folder)


def remove_old_npz_caches(data_dir: str, split: str) -> list[tuple[str, int]]:
  """Deletes the `.npz` row caches of `split` that earlier versions left in `data_dir` (names of the old cache form
  only, never other files); the (name, size in bytes) of each file deleted."""
  pattern = re.compile(OLD_NPZ_CACHE.format(split=re.escape(split)))
  removed = []
  for name in sorted(os.listdir(data_dir)):
    path = os.path.join(data_dir, name)
    if not (pattern.fullmatch(name) and os.path.isfile(path)):
      continue
    try:
      size = os.path.getsize(path)
      os.remove(path)
    except FileNotFoundError:  # another process of the run deleted it first
      continue
    removed.append((name, size))
  return removed

"""The built dataset directory, as the library reads it.

A data recipe (`data_recipes/`) writes `DIR/manifest.json` last, so a directory with a manifest is complete; the
manifest's `kind` tells a token store ("text", `store.py`) from SFT records ("sft"), and for SFT its
`splits[split]["files"]` list the JSONL shards of records, in order. The recipes write this format and read it back
through these functions too.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from diffgemma_jax.errors import DataError

MANIFEST = "manifest.json"


def read_manifest(data_dir: str) -> dict | None:
  """The directory's manifest, or None when it holds none (not built, or a build cut short)."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def iter_records(data_dir: str, split: str) -> Iterator[dict]:
  """The records of one split of an SFT dataset, in order, read one at a time."""
  manifest = read_manifest(data_dir)
  if manifest is None:
    raise DataError(f"{data_dir!r} holds no manifest.json; build it with a data recipe")
  for name in manifest["splits"][split]["files"]:
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
      yield from (json.loads(line) for line in f if line.strip())


def read_records(data_dir: str, split: str) -> list[dict]:
  """The records of one split of an SFT dataset, in order."""
  return list(iter_records(data_dir, split))

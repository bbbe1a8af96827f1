"""The held-out split, decided from document identity in a streaming build.

The rule is the one `data_recipes.common.split_by_hash` applies in memory: order split keys by the sha256 of the
key, and hold out keys in that order while the held-out side has less than `heldout_fraction` of all bytes. The
held-out keys are therefore exactly those whose digest is at most a threshold (the last key taken), so a build
routes each document with one comparison once the threshold is known. Finding it needs each key's byte count:
the scan writes one (digest, bytes) record per document to disk, and `heldout_threshold` reads those tables
twice, a 2^16-bucket byte histogram over the digest's top bits to find the bucket where the fraction is crossed,
then that bucket's keys only, in order. Memory stays that of the histogram, whatever the corpus size.

Digests are compared on their first 64 bits (two keys equal there and different beyond are 2^-64 events).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

SPLIT_BY = ("document", "file", "folder")
DIGEST_TABLE = np.dtype([("digest", "<u8"), ("bytes", "<i8")])
BUCKET_SHIFT = 48  # 2^16 buckets
NOTHING_HELD_OUT = -1
_CHUNK = 1 << 20  # records per read of a digest table


def split_key(rel: str, identity: str, split_by: str) -> str:
  """What a document is held out by: itself (`document`), its file, or its file's top folder (a play, a package)."""
  if split_by == "document":
    return identity
  if split_by == "file":
    return rel
  return rel.replace("\\", "/").split("/")[0]


def key_digest(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def write_digest_table(path: str, digests: list[int], sizes: list[int]) -> None:
  table = np.empty((len(digests),), DIGEST_TABLE)
  table["digest"] = np.asarray(digests, np.uint64)
  table["bytes"] = sizes
  table.tofile(path)


def _chunks(paths):
  for path in paths:
    table = np.memmap(path, DIGEST_TABLE, "r") if os.path.getsize(path) else np.zeros((0,), DIGEST_TABLE)
    for start in range(0, len(table), _CHUNK):
      yield np.asarray(table[start:start + _CHUNK])


def heldout_threshold(table_paths: list[str], heldout_fraction: float) -> tuple[int, int, int]:
  """(threshold, held-out bytes, total bytes): documents whose key digest is <= threshold are held out
  (NOTHING_HELD_OUT: none)."""
  histogram = np.zeros((1 << (64 - BUCKET_SHIFT),), np.int64)
  for chunk in _chunks(table_paths):
    np.add.at(histogram, (chunk["digest"] >> np.uint64(BUCKET_SHIFT)).astype(np.int64), chunk["bytes"])
  total = int(histogram.sum())
  target = heldout_fraction * total
  cumulative = np.cumsum(histogram)
  if total == 0 or target <= 0:
    return NOTHING_HELD_OUT, 0, total
  bucket = int(np.searchsorted(cumulative, target, side="left"))
  held = int(cumulative[bucket - 1]) if bucket else 0
  keys: dict[int, int] = {}
  for chunk in _chunks(table_paths):
    inside = chunk[(chunk["digest"] >> np.uint64(BUCKET_SHIFT)) == bucket]
    for digest, size in zip(inside["digest"].tolist(), inside["bytes"].tolist()):
      keys[digest] = keys.get(digest, 0) + size
  threshold = NOTHING_HELD_OUT
  for digest in sorted(keys):
    if held >= target:
      break
    threshold = digest
    held += keys[digest]
  return threshold, held, total


def keyed_bytes(table_paths: list[str], digests: frozenset[int]) -> tuple[int, int]:
  """(held-out bytes, total bytes) when exactly the keys with these digests are held out."""
  wanted = np.fromiter(sorted(digests), np.uint64, len(digests))
  held = total = 0
  for chunk in _chunks(table_paths):
    total += int(chunk["bytes"].sum())
    held += int(chunk["bytes"][np.isin(chunk["digest"], wanted)].sum())
  return held, total


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Which documents are held out: those whose key digest is at most `threshold` (the byte-fraction rule), or,
  when a recipe chose the keys itself (`Corpus.heldout_keys`), exactly those whose digest is in `digests`."""
  threshold: int = NOTHING_HELD_OUT
  digests: frozenset[int] | None = None

  def __call__(self, digest: int) -> bool:
    return digest in self.digests if self.digests is not None else digest <= self.threshold

  def to_json(self) -> dict:
    return {"threshold": self.threshold, "digests": None if self.digests is None else sorted(self.digests)}

  @classmethod
  def from_json(cls, value: dict) -> "HeldOut":
    digests = value.get("digests")
    return cls(int(value["threshold"]), None if digests is None else frozenset(int(d) for d in digests))

"""Writing a dataset directory: JSONL text shards per split, a trained tokenizer, and a manifest with a hash.

Layout: `DIR/train/shard-00000.jsonl`, `DIR/heldout/shard-00000.jsonl` (one `{"text", "source"}` per document),
`DIR/tokenizer.model` (+ `.vocab`), `DIR/manifest.json`. Building is idempotent: a directory whose manifest
names the same recipe, vocabulary size and source is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Iterable

from diffgemma_jax.data.errors import DataError
from diffgemma_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer

SHARD_BYTES = 8 << 20
SPLITS = ("train", "heldout")


def read_manifest(output_dir: str) -> dict | None:
  path = os.path.join(output_dir, "manifest.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_current(output_dir: str, recipe: str, vocab_size: int, source: str | None) -> bool:
  manifest = read_manifest(output_dir)
  return bool(manifest and manifest.get("recipe") == recipe and manifest.get("vocab_size") == vocab_size
              and manifest.get("source") == (source or None)
              and os.path.isfile(os.path.join(output_dir, "tokenizer.model")))


def content_hash(splits: dict[str, list[tuple[str, str]]]) -> str:
  digest = hashlib.sha256()
  for split in SPLITS:
    for source, text in splits[split]:
      digest.update(f"{split}\0{source}\0".encode())
      digest.update(text.encode("utf-8"))
  return digest.hexdigest()


def _write_shards(directory: str, documents: list[tuple[str, str]]) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  files, shard, size = [], None, 0
  for source, text in documents:
    if shard is None or size >= SHARD_BYTES:
      if shard:
        shard.close()
      name = f"shard-{len(files):05d}.jsonl"
      files.append(name)
      shard, size = open(os.path.join(directory, name), "w", encoding="utf-8"), 0
    line = json.dumps({"text": text, "source": source}, ensure_ascii=False)
    shard.write(line + "\n")
    size += len(line)
  if shard:
    shard.close()
  return files


def write_dataset(output_dir: str, recipe: str, vocab_size: int, splits: dict[str, list[tuple[str, str]]], *,
                  source: str | None = None, notes: dict | None = None) -> dict:
  """Writes both splits and the tokenizer (trained on the train split only) into a fresh directory."""
  for split in SPLITS:
    if not splits.get(split):
      raise DataError(f"recipe {recipe!r}: the {split} split is empty; the corpus is too small to split")
  if os.path.isdir(output_dir) and os.listdir(output_dir) and read_manifest(output_dir) is None:
    # A rebuild replaces the whole directory: never do that to one this code did not write.
    raise DataError(f"output directory {output_dir!r} is not empty and holds no manifest.json, so it is not a "
                    f"dataset directory; pass a new or empty directory (--output / data.dir)")
  start = time.time()
  staging = output_dir.rstrip("/") + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  files = {split: _write_shards(os.path.join(staging, split), splits[split]) for split in SPLITS}
  tokenizer = train_tokenizer((text for _, text in splits["train"]), os.path.join(staging, "tokenizer"), vocab_size)
  manifest = {
      "recipe": recipe,
      "source": source or None,
      "vocab_size": vocab_size,
      "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "mask": tokenizer.mask_id,
                      "start_of_turn": tokenizer.start_of_turn_id, "end_of_turn": tokenizer.end_of_turn_id},
      "splits": {split: {"documents": len(splits[split]),
                         "bytes": sum(len(t.encode("utf-8")) for _, t in splits[split]),
                         "files": [f"{split}/{name}" for name in files[split]]} for split in SPLITS},
      "sha256": content_hash(splits),
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "build_seconds": round(time.time() - start, 2),
  }
  manifest.update(notes or {})
  with open(os.path.join(staging, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  # The manifest appears in the target only when everything else is there: a killed build is rebuilt.
  shutil.rmtree(output_dir, ignore_errors=True)
  os.replace(staging, output_dir)
  return manifest


def read_split(data_dir: str, split: str) -> list[str]:
  """The documents of one split, in order."""
  manifest = read_manifest(data_dir)
  if manifest is None:
    raise DataError(f"{data_dir!r} holds no manifest.json; build it with a data recipe")
  texts = []
  for name in manifest["splits"][split]["files"]:
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
      texts.extend(json.loads(line)["text"] for line in f if line.strip())
  return texts


def read_utf8(path: str) -> str | None:
  """The file's text, or None when it is not UTF-8."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError:
    return None


def split_by_hash(items: Iterable[tuple[str, str]], heldout_fraction: float, key=None) -> dict:
  """Deterministic split of (source, text) by a hash of each item's key (default: its source) until the
  held-out side holds at least `heldout_fraction` of the bytes; no key lands on both sides."""
  key = key or (lambda source: source)
  items = list(items)
  groups: dict[str, list[tuple[str, str]]] = {}
  for source, text in items:
    groups.setdefault(key(source), []).append((source, text))
  order = sorted(groups, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
  total = sum(len(t.encode("utf-8")) for _, t in items)
  heldout_keys, held = set(), 0
  for k in order:
    if held >= heldout_fraction * total:
      break
    heldout_keys.add(k)
    held += sum(len(t.encode("utf-8")) for _, t in groups[k])
  splits = {"train": [], "heldout": []}
  for source, text in sorted(items):
    splits["heldout" if key(source) in heldout_keys else "train"].append((source, text))
  return splits

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
from typing import Any, Iterable

from diffgemma_jax.data.errors import DataError
from diffgemma_jax.data.tokenizer import Tokenizer, train_tokenizer

SHARD_BYTES = 8 << 20
SPLITS = ("train", "heldout")


def read_manifest(output_dir: str) -> dict | None:
  path = os.path.join(output_dir, "manifest.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def files_stamp(paths) -> dict[str, list]:
  """{path: [size, mtime]} of a recipe's source files, kept in the manifest as `files` (see `is_current`)."""
  return {p: [os.path.getsize(p), os.path.getmtime(p)] for p in paths}


def is_current(output_dir: str, recipe: str, vocab_size: int | None, source: str | None,
               tokenizer: str | None = None, files: dict | None = None) -> bool:
  """Whether `output_dir` already holds this recipe's dataset, built from the same source and with the same
  tokenizer (`tokenizer`: a given sentencepiece file, compared by content; None: one the recipe trains) and,
  given `files` (a `files_stamp`), from files of the same sizes and mtimes (new, removed or edited: rebuilt)."""
  manifest = read_manifest(output_dir)
  if not (manifest and manifest.get("recipe") == recipe and manifest.get("source") == (source or None)
          and os.path.isfile(os.path.join(output_dir, "tokenizer.model"))):
    return False
  if files is not None and manifest.get("files") != files:
    return False
  if tokenizer:
    return os.path.isfile(tokenizer) and manifest.get("tokenizer_sha256") == file_sha256(tokenizer)
  return manifest.get("vocab_size") == vocab_size and manifest.get("tokenizer_sha256") is None


def _item_text(item: str | dict) -> str:
  return item if isinstance(item, str) else json.dumps(item, sort_keys=True, ensure_ascii=False)


def item_bytes(item: str | dict) -> int:
  return len(_item_text(item).encode("utf-8"))


def content_hash(splits: dict[str, list[tuple[str, str | dict]]]) -> str:
  digest = hashlib.sha256()
  for split in SPLITS:
    for source, item in splits[split]:
      digest.update(f"{split}\0{source}\0".encode())
      digest.update(_item_text(item).encode("utf-8"))
  return digest.hexdigest()


def _write_shards(directory: str, documents: list[tuple[str, str | dict]]) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  files, shard, size = [], None, 0
  for source, text in documents:
    if shard is None or size >= SHARD_BYTES:
      if shard:
        shard.close()
      name = f"shard-{len(files):05d}.jsonl"
      files.append(name)
      shard, size = open(os.path.join(directory, name), "w", encoding="utf-8"), 0
    record = dict(text, source=source) if isinstance(text, dict) else {"text": text, "source": source}
    line = json.dumps(record, ensure_ascii=False)
    shard.write(line + "\n")
    size += len(line)
  if shard:
    shard.close()
  return files


def write_dataset(output_dir: str, recipe: str, vocab_size: int | None, splits: dict[str, list[tuple[str, Any]]], *,
                  source: str | None = None, notes: dict | None = None, tokenizer: str | None = None,
                  kind: str = "text") -> dict:
  """Writes both splits and the tokenizer into a fresh directory: a copy of `tokenizer` (a sentencepiece model
  file) when given, else one trained on the train split only. `kind`: "text" (documents `{"text", "source"}`,
  packed for pretraining) or "sft" (records `{"prompt", "response"}` or `{"messages"}`, see data/sft.py)."""
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
  if tokenizer:
    if not os.path.isfile(tokenizer):
      raise DataError(f"data.tokenizer: {tokenizer!r} does not exist; give a sentencepiece .model file")
    shutil.copyfile(tokenizer, os.path.join(staging, "tokenizer.model"))
    tok = Tokenizer(os.path.join(staging, "tokenizer.model"))
  else:
    if kind != "text":
      raise DataError(f"recipe {recipe!r} trains no tokenizer: set data.tokenizer or init.checkpoint")
    tok = train_tokenizer((text for _, text in splits["train"]), os.path.join(staging, "tokenizer"), vocab_size)
  manifest = {
      "recipe": recipe,
      "kind": kind,
      "source": source or None,
      "vocab_size": tok.vocab_size,
      "tokenizer_sha256": file_sha256(tokenizer) if tokenizer else None,
      "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id,
                      "mask": tok.mask_id, "start_of_turn": tok.start_of_turn_id, "end_of_turn": tok.end_of_turn_id},
      "splits": {split: {"documents": len(splits[split]),
                         "bytes": sum(item_bytes(t) for _, t in splits[split]),
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


def read_records(data_dir: str, split: str) -> list[dict]:
  """The records of one split, in order: `{"text", "source"}` documents, or an SFT dataset's examples."""
  manifest = read_manifest(data_dir)
  if manifest is None:
    raise DataError(f"{data_dir!r} holds no manifest.json; build it with a data recipe")
  records = []
  for name in manifest["splits"][split]["files"]:
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
      records.extend(json.loads(line) for line in f if line.strip())
  return records


def read_split(data_dir: str, split: str) -> list[str]:
  """The documents (texts) of one split, in order."""
  return [record["text"] for record in read_records(data_dir, split)]


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
  total = sum(item_bytes(t) for _, t in items)
  heldout_keys, held = set(), 0
  for k in order:
    if held >= heldout_fraction * total:
      break
    heldout_keys.add(k)
    held += sum(item_bytes(t) for _, t in groups[k])
  splits = {"train": [], "heldout": []}
  for source, text in sorted(items, key=lambda item: (item[0], _item_text(item[1]))):
    splits["heldout" if key(source) in heldout_keys else "train"].append((source, text))
  return splits

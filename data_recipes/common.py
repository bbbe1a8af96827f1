"""Writing a dataset directory: a tokenizer, the data of both splits, and a manifest with a hash.

Pretraining recipes build a token store (diffgemma_jax/data/build.py: `DIR/train/*.tokens|starts`,
`DIR/heldout/...`, unigram counts) with `build_text_dataset`. SFT recipes write JSONL shards of records with
`write_dataset` (`DIR/train/shard-00000.jsonl`, ...; their rows are made at training time, data/sft/). Both
write `DIR/tokenizer.model` (+ `.vocab` when trained) and `DIR/manifest.json`, last; the library reads the format
(`diffgemma_jax/data/manifest.py`). Building is idempotent: a
directory whose manifest names the same recipe, vocabulary size, source and build settings is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterable

from diffgemma_jax import storage
from diffgemma_jax.storage import file_sha256
from diffgemma_jax.data.build import SPLITS, BuildOptions, Corpus, build_store, special_ids
from diffgemma_jax.data.manifest import MANIFEST, read_manifest
from diffgemma_jax.data.tokenizer import Tokenizer
from diffgemma_jax.errors import DataError

SHARD_BYTES = 8 << 20


def files_stamp(paths) -> dict[str, list]:
  """{path: [size, mtime (a bucket object's version)]} of a recipe's source files, kept in the manifest as
  `files` (see `is_current`)."""
  return {p: storage.stamp(p) for p in paths}


def is_current(output_dir: str, recipe: str, vocab_size: int | None, source: str | None,
               tokenizer: str | None = None, files: dict | None = None, expect: dict | None = None) -> bool:
  """Whether `output_dir` already holds this recipe's dataset, built from the same source and with the same
  tokenizer (`tokenizer`: a given sentencepiece file, compared by content; None: one the recipe trains) and,
  given `files` (a `files_stamp`), from files of the same sizes and mtimes (new, removed or edited: rebuilt).
  `expect`: manifest fields that must match (a pretraining dataset's build settings, `text_build_settings`); a
  pretraining dataset from before the token store is rebuilt."""
  manifest = read_manifest(output_dir)
  if not (manifest and manifest.get("recipe") == recipe and manifest.get("source") == (source or None)
          and os.path.isfile(os.path.join(output_dir, "tokenizer.model"))):
    return False
  if files is not None and manifest.get("files") != files:
    return False
  if manifest.get("kind", "text") == "text" and "store" not in manifest:
    return False
  if any(manifest.get(key) != value for key, value in (expect or {}).items()):
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


DEFAULT_SAMPLE_LINES = 120_000
BUILD_OPTIONS = ("build_workers", "tokenizer_sample_lines", "process_index", "process_count", "barrier", "exchange")


def build_options(options: dict) -> dict:
  """The options of `build_dataset` that say how to build (not what): `build_text_dataset`'s keywords."""
  return {key: options[key] for key in BUILD_OPTIONS if key in options}


def text_build_settings(corpus: Corpus, tokenizer: str | None, options: dict) -> dict:
  """The build settings a pretraining dataset's manifest records (and `is_current` compares)."""
  lines = int(options.get("tokenizer_sample_lines", DEFAULT_SAMPLE_LINES))
  return {"text_field": corpus.text_field, "split_by": corpus.split_by, "heldout_fraction": corpus.heldout_fraction,
          "tokenizer_sample_lines": None if tokenizer else lines}


def _check_output_dir(output_dir: str) -> None:
  if os.path.isdir(output_dir) and os.listdir(output_dir) and read_manifest(output_dir) is None:
    # A rebuild replaces the whole directory: never do that to one this code did not write.
    raise DataError(f"output directory {output_dir!r} is not empty and holds no manifest.json, so it is not a "
                    f"dataset directory; pass a new or empty directory (--output / data.dir)")


def build_text_dataset(output_dir: str, recipe: str, corpus: Corpus, vocab_size: int | None, *,
                       source: str | None = None, notes: dict | None = None, tokenizer: str | None = None,
                       build_workers: int = 0, tokenizer_sample_lines: int = DEFAULT_SAMPLE_LINES,
                       process_index: int = 0, process_count: int = 1, barrier=None, exchange=None) -> dict:
  """Builds a pretraining dataset (token store) of `corpus`: a copy of `tokenizer` when given, else one trained
  on a uniform sample of the training documents (`tokenizer_sample_lines` lines). `exchange`: a multi-process
  build whose processes each build in a folder of their own (`BuildOptions.exchange`)."""
  _check_output_dir(output_dir)
  if tokenizer and not os.path.isfile(tokenizer):
    raise DataError(f"data.tokenizer: {tokenizer!r} does not exist; give a sentencepiece .model file")
  manifest = {"recipe": recipe, "source": source or None,
              "tokenizer_sha256": file_sha256(tokenizer) if tokenizer else None, **(notes or {})}
  options = BuildOptions(workers=int(build_workers), sample_lines=int(tokenizer_sample_lines),
                         process_index=process_index, process_count=process_count, barrier=barrier,
                         exchange=exchange)
  return build_store(output_dir, corpus, vocab_size=vocab_size, tokenizer=tokenizer, manifest=manifest,
                     options=options)


def write_dataset(output_dir: str, recipe: str, splits: dict[str, list[tuple[str, Any]]], *,
                  source: str | None = None, notes: dict | None = None, tokenizer: str | None = None) -> dict:
  """Writes both splits of an SFT dataset (records `{"prompt", "response"}` or `{"messages"}`, data/sft/) and
  a copy of `tokenizer` (a sentencepiece model file) into a fresh directory."""
  for split in SPLITS:
    if not splits.get(split):
      raise DataError(f"recipe {recipe!r}: the {split} split is empty; the corpus is too small to split")
  _check_output_dir(output_dir)
  if not tokenizer:
    raise DataError(f"recipe {recipe!r} trains no tokenizer: set data.tokenizer or init.checkpoint")
  start = time.time()
  staging = output_dir.rstrip("/") + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  files = {split: _write_shards(os.path.join(staging, split), splits[split]) for split in SPLITS}
  if not os.path.isfile(tokenizer):
    raise DataError(f"data.tokenizer: {tokenizer!r} does not exist; give a sentencepiece .model file")
  shutil.copyfile(tokenizer, os.path.join(staging, "tokenizer.model"))
  tok = Tokenizer(os.path.join(staging, "tokenizer.model"))
  manifest = {
      "recipe": recipe,
      "kind": "sft",
      "source": source or None,
      "vocab_size": tok.vocab_size,
      "tokenizer_sha256": file_sha256(tokenizer),
      "special_ids": special_ids(tok),
      "splits": {split: {"documents": len(splits[split]),
                         "bytes": sum(item_bytes(t) for _, t in splits[split]),
                         "files": [f"{split}/{name}" for name in files[split]]} for split in SPLITS},
      "sha256": content_hash(splits),
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "build_seconds": round(time.time() - start, 2),
  }
  manifest.update(notes or {})
  with open(os.path.join(staging, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  # The manifest appears in the target only when everything else is there: a killed build is rebuilt.
  shutil.rmtree(output_dir, ignore_errors=True)
  os.replace(staging, output_dir)
  return manifest


def staging_folder(root: str) -> str:
  """A fresh folder beside `root`, this process's own, to build a cache entry in before `publish_folder`: several
  processes (the hosts of a job, or the processes of one host) may build the same entry at once."""
  parent = os.path.dirname(root.rstrip("/")) or "."
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=os.path.basename(root.rstrip("/")) + ".partial-", dir=parent)


def publish_folder(staging: str, root: str, done: str) -> None:
  """Renames the finished `staging` to `root`; an entry is complete exactly when it holds the file `done`,
  written last. Another process that published first wins (its folder is the same build), so ours is dropped;
  a leftover without `done` (an interrupted build of an older layout) is moved aside first, never deleted under a
  reader."""
  try:
    os.rename(staging, root)
    return
  except OSError:
    if os.path.isfile(os.path.join(root, done)):
      shutil.rmtree(staging, ignore_errors=True)
      return
  aside = tempfile.mkdtemp(prefix=os.path.basename(root.rstrip("/")) + ".stale-", dir=os.path.dirname(root) or ".")
  try:
    os.replace(root, os.path.join(aside, "old"))
  except OSError:
    pass  # gone meanwhile
  try:
    os.rename(staging, root)
  except OSError:  # another process published between the two renames
    if not os.path.isfile(os.path.join(root, done)):
      raise
    shutil.rmtree(staging, ignore_errors=True)
  shutil.rmtree(aside, ignore_errors=True)


def read_utf8(path: str) -> str | None:
  """The file's text, or None when it is not UTF-8."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError:
    return None


def split_by_hash(items: Iterable[tuple[str, str]], heldout_fraction: float, key=None) -> dict:
  """Deterministic split of (source, text) by a hash of each item's key (default: its source) until the
  held-out side holds at least `heldout_fraction` of the bytes; no key lands on both sides. The pretraining build
  applies the same rule to a streamed corpus (diffgemma_jax/data/split.py); SFT recipes split in memory here."""
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

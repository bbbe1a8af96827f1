"""The user's own SFT data: JSONL files of `{"prompt", "response"}` or `{"messages": [...]}` records
(diffgemma_jax/data/sft.py). `source` is a file, a directory (its *.jsonl files) or a glob; `heldout_source`
the same for the held-out split, or empty to hold out a hashed 5% of the records. Malformed lines are reported with
file and line and skipped, up to `max_bad_lines` in all; an invalid record (empty response, unknown role) fails
the build naming its file and line.
"""

from __future__ import annotations

import glob
import os
import sys

from data_recipes.common import files_stamp, is_current, split_by_hash, write_dataset
from diffgemma_jax import storage
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.data.sft import read_jsonl
from diffgemma_jax.errors import DataError

HELDOUT_FRACTION = 0.05


def jsonl_files(source: str, key: str = "data.source") -> list[str]:
  if not source:
    raise DataError(f"the jsonl recipe needs {key}: a JSONL file, a directory of .jsonl files, or a glob")
  if storage.is_url(source):  # an object, a folder (its .jsonl objects) or a glob in a bucket
    paths = [p for p in storage.find_files(source, key) if p.endswith(".jsonl") or glob.has_magic(source)
             or p == source]
  elif os.path.isdir(source):
    paths = [os.path.join(d, f) for d, _, files in os.walk(source) for f in files if f.endswith(".jsonl")]
  elif os.path.isfile(source):
    paths = [source]
  else:
    paths = glob.glob(source, recursive=True)
  paths = sorted(p for p in paths if storage.is_url(p) or os.path.isfile(p))
  if not paths:
    raise DataError(f"{key}={source!r} matches no JSONL file")
  return paths


def source_records(source: str, key: str, max_bad_lines: int, seen_bad: int = 0) -> tuple[list, int]:
  """(source, record) items of every file `source` names, and the malformed lines skipped so far in all."""
  items, bad = [], seen_bad
  for path in jsonl_files(source, key):
    # read_jsonl reads a local file: an object is copied to the local temporary folder first.
    records, skipped = read_jsonl(storage.local_file(path), max_bad_lines=max_bad_lines, seen_bad=bad, display=path)
    bad += skipped
    items.extend((record.pop("source"), record) for record in records)
  return items, bad


def build(output_dir: str, vocab_size: int | None = None, source: str | None = None, tokenizer: str | None = None,
          heldout_source: str | None = None, max_bad_lines: int = 10, **_) -> dict:
  del vocab_size
  if not tokenizer:
    raise DataError("the jsonl recipe trains no tokenizer: set data.tokenizer (a sentencepiece .model) or "
                    "init.checkpoint (its run's tokenizer is used)")
  label = source if not heldout_source else f"{source} | heldout: {heldout_source}"
  files = jsonl_files(source) + (jsonl_files(heldout_source, "data.heldout_source") if heldout_source else [])
  stamp = files_stamp(files)
  if is_current(output_dir, "jsonl", None, label, tokenizer, files=stamp):
    return read_manifest(output_dir)
  items, bad = source_records(source, "data.source", max_bad_lines)
  if heldout_source:
    heldout, bad = source_records(heldout_source, "data.heldout_source", max_bad_lines, bad)
    splits = {"train": items, "heldout": heldout}
  else:
    splits = split_by_hash(items, HELDOUT_FRACTION)
  return write_dataset(output_dir, "jsonl", splits, source=label, tokenizer=tokenizer,
                       notes={"files": stamp, "skipped_malformed_lines": bad})


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "jsonl", argv)


if __name__ == "__main__":
  sys.exit(main())

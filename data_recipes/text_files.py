"""The user's own pretraining corpus (`--source`, data.source): a folder, a glob, or a comma-separated list of
either. Every file is read by its extension (diffgemma_jax/data/sources.py): JSONL (`.jsonl`, `.jsonl.gz`) and
Parquet records hold their text in `data.text_field` (default `text`), ArrayRecord files hold text records, and
any other file is one UTF-8 document (a file that is not UTF-8 is skipped and named). Held out by document (a
text file, or one record of a record file): at least 4% of the bytes. The manifest keeps each file's size and
mtime, and a build whose files changed since is redone."""

from __future__ import annotations

import glob
import os
import sys

from data_recipes.common import (
  build_options,
  build_text_dataset,
  files_stamp,
  is_current,
  text_build_settings,
)
from diffgemma_jax import storage
from diffgemma_jax.data.build import Corpus
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.errors import DataError

HELDOUT_FRACTION = 0.04


def source_files(source: str) -> list[str]:
  """The files `source` names (folders walked, globs expanded, recursively with `**`), sorted, each once."""
  if not source:
    raise DataError("the text_files recipe needs data.source (--source): a folder, a glob or a comma-separated "
                    "list of them")
  paths = set()
  for part in (p.strip() for p in source.split(",")):
    if not part:
      continue
    if storage.is_url(part):  # gs://, s3://: an object, a folder or a glob, read as a stream
      paths.update(storage.find_files(part, "data.source"))
    elif os.path.isdir(part):
      paths.update(os.path.join(d, f) for d, _, files in os.walk(part) for f in files)
    elif os.path.isfile(part):
      paths.add(part)
    else:
      found = glob.glob(part, recursive=True)
      if not found and not glob.has_magic(part):
        raise DataError(f"data.source {part!r} does not exist")
      paths.update(found)
  return sorted(p for p in paths if storage.is_url(p) or os.path.isfile(p))


def corpus(source: str, text_field: str = "text", max_bad_lines: int = 10) -> Corpus:
  paths = source_files(source)
  # Documents are named relative to the files' common folder, so the split depends on the corpus, not on where
  # it lies (a split keyed by absolute paths would change when the same files move).
  root, files = storage.common_folder(paths)
  return Corpus(root=root, files=tuple(files), name=f"data.source {source!r}", split_by="document",
                heldout_fraction=HELDOUT_FRACTION, text_field=text_field, max_bad_lines=max_bad_lines)


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          text_field: str = "text", max_bad_lines: int = 10, **options) -> dict:
  files = corpus(source, text_field, max_bad_lines)
  stamp = files_stamp(storage.join(files.root, rel) for rel in files.files)  # changed files: rebuilt
  expect = text_build_settings(files, tokenizer, options)
  if is_current(output_dir, "text_files", vocab_size, source, tokenizer, files=stamp, expect=expect):
    return read_manifest(output_dir)
  return build_text_dataset(output_dir, "text_files", files, vocab_size, source=source, notes={"files": stamp},
                            tokenizer=tokenizer, **build_options(options))


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "text_files", argv)


if __name__ == "__main__":
  sys.exit(main())

"""The user's own pretraining corpus (`--source`, data.source): a folder, a glob, or a comma-separated list of
either. Every file is read by its extension (diffgemma_jax/data/sources.py): JSONL (`.jsonl`, `.jsonl.gz`,
`.jsonl.zst`, `.json.gz`, `.json.zst`) and Parquet records hold their text in `data.text_field` (default `text`),
ArrayRecord files hold text records, and any other file is one UTF-8 document (a file that is not UTF-8 is
skipped and named). Held out
by document (a text file, or one record of a record file): at least 4% of the bytes; or, with `--heldout_source`
(data.heldout_source, the same forms), the documents of those files exactly (a standard validation set), every
document of the source trained on; `--heldout_source` without `--source` builds an evaluation set (every document
held out, no training split, read with a given `--tokenizer`: the model's; `diffgemma-eval --heldout` builds one
itself). The manifest keeps each file's size and mtime, and a build whose files changed
since is redone."""

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


def source_files(source: str, key: str = "data.source") -> list[str]:
  """The files `source` (the value of config key `key`) names (folders walked, globs expanded, recursively with
  `**`), sorted, each once."""
  if not source:
    raise DataError("the text_files recipe needs data.source (--source): a folder, a glob or a comma-separated "
                    "list of them")
  paths = set()
  for part in (p.strip() for p in source.split(",")):
    if not part:
      continue
    if storage.is_url(part):  # gs://, s3://: an object, a folder or a glob, read as a stream
      paths.update(storage.find_files(part, key))
    elif os.path.isdir(part):
      paths.update(os.path.join(d, f) for d, _, files in os.walk(part) for f in files)
    elif os.path.isfile(part):
      paths.add(part)
    else:
      found = glob.glob(part, recursive=True)
      if not found and not glob.has_magic(part):
        raise DataError(f"{key} {part!r} does not exist")
      paths.update(found)
  return sorted(p for p in paths if storage.is_url(p) or os.path.isfile(p))


def corpus(source: str, text_field: str = "text", max_bad_lines: int = 10, heldout_source: str | None = None
           ) -> Corpus:
  """The corpus of `source`'s files; with `heldout_source`, those files too, held out by file (every document of
  theirs, and no other); `heldout_source` alone: an evaluation set (every document held out, no training split;
  built with a given tokenizer)."""
  if heldout_source and not source:
    held = [p if storage.is_url(p) else os.path.abspath(p) for p in source_files(heldout_source,
                                                                                 "data.heldout_source")]
    root, files = storage.common_folder(held)
    return Corpus(root=root, files=tuple(files), name=f"data.heldout_source {heldout_source!r}", split_by="file",
                  heldout_fraction=HELDOUT_FRACTION, text_field=text_field, max_bad_lines=max_bad_lines,
                  heldout_keys=tuple(files), evaluation_only=True)
  paths = source_files(source)
  held = source_files(heldout_source, "data.heldout_source") if heldout_source else []
  if held:  # one spelling per file (./a/x.txt and a/x.txt are one file) before they are compared
    paths, held = ([p if storage.is_url(p) else os.path.abspath(p) for p in files] for files in (paths, held))
  both = sorted(set(paths) & set(held))
  if both:
    raise DataError(f"data.heldout_source {heldout_source!r} names {len(both)} file(s) data.source {source!r} "
                    f"names too (first: {both[0]}); a held-out file must not be trained on")
  # Documents are named relative to the files' common folder, so the split depends on the corpus, not on where
  # it lies (a split keyed by absolute paths would change when the same files move).
  everything = sorted(paths + held)
  root, files = storage.common_folder(everything)
  if not held:
    return Corpus(root=root, files=tuple(files), name=f"data.source {source!r}", split_by="document",
                  heldout_fraction=HELDOUT_FRACTION, text_field=text_field, max_bad_lines=max_bad_lines)
  held = set(held)
  return Corpus(root=root, files=tuple(files), name=f"data.source {source!r} and data.heldout_source "
                f"{heldout_source!r}", split_by="file", heldout_fraction=HELDOUT_FRACTION, text_field=text_field,
                max_bad_lines=max_bad_lines, heldout_keys=tuple(rel for path, rel in zip(everything, files)
                                                                if path in held))


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          text_field: str = "text", max_bad_lines: int = 10, heldout_source: str | None = None, **options) -> dict:
  files = corpus(source, text_field, max_bad_lines, heldout_source)
  stamp = files_stamp(storage.join(files.root, rel) for rel in files.files)  # changed files: rebuilt
  expect = text_build_settings(files, tokenizer, options)
  label = (f"{source} | heldout: {heldout_source}" if source else f"heldout: {heldout_source}") if heldout_source \
      else source
  if is_current(output_dir, "text_files", vocab_size, label, tokenizer, files=stamp, expect=expect):
    return read_manifest(output_dir)
  return build_text_dataset(output_dir, "text_files", files, vocab_size, source=label, notes={"files": stamp},
                            tokenizer=tokenizer, **build_options(options))


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "text_files", argv)


if __name__ == "__main__":
  sys.exit(main())

"""Any directory or glob of the user's own UTF-8 text files (`--source`). Non-UTF-8 files are skipped and
named; split by file (held-out at least 4% of the bytes). The manifest keeps each file's size and mtime, and a
build whose files changed since is redone."""

from __future__ import annotations

import glob
import os
import sys

from data_recipes.common import files_stamp, is_current, read_manifest, read_utf8, split_by_hash, write_dataset
from diffgemma_jax.data.errors import DataError

MAX_LISTED = 10  # skipped files named in the warning; the rest are counted


def source_files(source: str) -> list[str]:
  if not source:
    raise DataError("the text_files recipe needs data.source (--source): a directory or a glob of UTF-8 files")
  if os.path.isdir(source):
    paths = [os.path.join(d, f) for d, _, files in os.walk(source) for f in files]
  else:
    paths = glob.glob(source, recursive=True)
    if not paths and not glob.has_magic(source) and not os.path.exists(source):
      raise DataError(f"data.source {source!r} does not exist")
  return sorted(p for p in paths if os.path.isfile(p))


def documents(source: str) -> tuple[list[tuple[str, str]], int]:
  paths = source_files(source)
  docs, skipped = [], []
  # Documents are named relative to the files' common folder, so the split depends on the corpus, not on where
  # it lies (a split keyed by absolute paths would change when the same files move).
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
  for path in paths:
    text = read_utf8(path)
    if text is None:
      skipped.append(path)
    elif text.strip():
      docs.append((os.path.relpath(os.path.abspath(path), root), text))
  if skipped:
    listed = ", ".join(skipped[:MAX_LISTED]) + (f" and {len(skipped) - MAX_LISTED} more"
                                                 if len(skipped) > MAX_LISTED else "")
    print(f"text_files: skipped {len(skipped)} non-UTF-8 file(s) under {source!r}: {listed}", file=sys.stderr)
  if not docs:
    raise DataError(f"data.source {source!r} holds no non-empty UTF-8 files ({len(paths)} file(s) found, "
                    f"{len(skipped)} not UTF-8)")
  return docs, len(skipped)


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          **_) -> dict:
  stamp = files_stamp(source_files(source))  # a corpus with new, removed or edited files is rebuilt, not reused
  if is_current(output_dir, "text_files", vocab_size, source, tokenizer, files=stamp):
    return read_manifest(output_dir)
  docs, skipped = documents(source)
  return write_dataset(output_dir, "text_files", vocab_size, split_by_hash(docs, 0.04), source=source,
                       notes={"skipped_non_utf8": skipped, "files": stamp}, tokenizer=tokenizer)


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "text_files", argv)


if __name__ == "__main__":
  sys.exit(main())

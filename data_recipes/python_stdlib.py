"""The embedded default corpus: the CPython standard library source of the running interpreter (no download).

Test suites (`test/`, `tests/`, `idle_test/`), site-packages and generated help text (`pydoc_data/`) are left
out. Split deterministically by module (a hash of each file's path under the stdlib), held-out at least 4% of the
bytes, no file on both sides.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from data_recipes.common import (
  build_options,
  build_text_dataset,
  is_current,
  read_utf8,
  text_build_settings,
)
from diffgemma_jax.data.build import Corpus
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.errors import DataError

# pydoc_data/topics.py is a generated 750 KB string of English help text: wherever the hash put it, it would make
# up most of its split (it was 85% of the held-out bytes), so the held-out bound would not measure Python code.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages", "lib2to3",
                 "pydoc_data"}
HELDOUT_FRACTION = 0.04


def stdlib_files(root: str | None = None) -> list[str]:
  """Relative paths of the stdlib's .py files, sorted."""
  root = root or sysconfig.get_paths()["stdlib"]
  found = []
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("."))
    for name in files:
      if name.endswith(".py"):
        found.append(os.path.relpath(os.path.join(directory, name), root))
  return sorted(found)


def documents(root: str | None = None) -> list[tuple[str, str]]:
  root = root or sysconfig.get_paths()["stdlib"]
  docs = []
  for rel in stdlib_files(root):
    text = read_utf8(os.path.join(root, rel))
    if text and text.strip():
      docs.append((rel, text))
  if not docs:
    raise DataError(f"no Python sources found under the standard library at {root!r}")
  return docs


def corpus(root: str | None = None) -> Corpus:
  """The stdlib as a corpus: one document per module, held out by module."""
  root = root or sysconfig.get_paths()["stdlib"]
  return Corpus(root=root, files=tuple(stdlib_files(root)), name=f"the standard library at {root!r}",
                split_by="document", heldout_fraction=HELDOUT_FRACTION)


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          **options) -> dict:
  del source
  root = sysconfig.get_paths()["stdlib"]
  notes = {"stdlib_root": root, "python": sys.version.split()[0], "excluded_dirs": sorted(EXCLUDED_DIRS)}
  stdlib = corpus(root)
  expect = {**notes, **text_build_settings(stdlib, tokenizer, options)}
  # A directory built by another interpreter or an older file selection holds a different corpus: rebuild it.
  if is_current(output_dir, "python_stdlib", vocab_size, None, tokenizer, expect=expect):
    return read_manifest(output_dir)
  return build_text_dataset(output_dir, "python_stdlib", stdlib, vocab_size, notes=notes, tokenizer=tokenizer,
                            **build_options(options))


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "python_stdlib", argv)


if __name__ == "__main__":
  sys.exit(main())

"""Data recipes: each builds a dataset directory (JSONL shards, held-out split, manifest, sentencepiece
tokenizer) from a real corpus. Run one as `python -m data_recipes.<name> --output DIR [--vocab_size N]`."""

from __future__ import annotations

import argparse
import sys

from diffgemma_jax.data.errors import DataError

RECIPES = ("python_stdlib", "shakespeare", "text_files")


def build_dataset(recipe: str, output_dir: str, vocab_size: int, source: str | None = None) -> dict:
  """Builds (or reuses, when its manifest matches) the dataset of `recipe` in `output_dir`."""
  if recipe == "python_stdlib":
    from data_recipes.python_stdlib import build
  elif recipe == "shakespeare":
    from data_recipes.shakespeare import build
  elif recipe == "text_files":
    from data_recipes.text_files import build
  else:
    raise DataError(f"data.recipe: unknown recipe {recipe!r}; valid recipes are {RECIPES}")
  return build(output_dir, vocab_size=vocab_size, source=source)


def run_cli(build, name: str, argv=None) -> int:
  parser = argparse.ArgumentParser(prog=f"python -m data_recipes.{name}")
  parser.add_argument("--output", required=True, help="dataset directory to write")
  parser.add_argument("--vocab_size", type=int, default=1024)
  parser.add_argument("--source", default=None, help="text_files: a directory or glob of UTF-8 files")
  args = parser.parse_args(argv)
  try:
    manifest = build(args.output, vocab_size=args.vocab_size, source=args.source)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sizes = ", ".join(f"{s}: {v['documents']} docs / {v['bytes'] / 1e6:.2f} MB" for s, v in manifest["splits"].items())
  print(f"{name}: {args.output} ({sizes}; vocab {manifest['vocab_size']}; sha256 {manifest['sha256'][:12]})")
  return 0

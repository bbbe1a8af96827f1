"""Data recipes: each builds a dataset directory (JSONL shards, held-out split, manifest, sentencepiece
tokenizer) from a real corpus. Run one as `python -m data_recipes.<name> --output DIR [--vocab_size N]`."""

from __future__ import annotations

import argparse
import sys

from diffgemma_jax.data.errors import DataError

PRETRAIN_RECIPES = ("python_stdlib", "python_packages", "shakespeare", "text_files")
SFT_RECIPES = ("python_docstrings", "jsonl")  # prompt/response records (data/sft.py); they train no tokenizer
RECIPES = PRETRAIN_RECIPES + SFT_RECIPES


def build_dataset(recipe: str, output_dir: str, vocab_size: int | None, source: str | None = None, *,
                  tokenizer: str | None = None, **options) -> dict:
  """Builds (or reuses, when its manifest matches) the dataset of `recipe` in `output_dir`.

  `tokenizer`: an existing sentencepiece model to copy in instead of training one (required by SFT recipes).
  `options`: recipe-specific (jsonl: heldout_source, max_bad_lines)."""
  if recipe not in RECIPES:
    raise DataError(f"data.recipe: unknown recipe {recipe!r}; valid recipes are {RECIPES}")
  import importlib
  build = importlib.import_module(f"data_recipes.{recipe}").build
  return build(output_dir, vocab_size=vocab_size, source=source, tokenizer=tokenizer, **options)


def run_cli(build, name: str, argv=None) -> int:
  parser = argparse.ArgumentParser(prog=f"python -m data_recipes.{name}")
  parser.add_argument("--output", required=True, help="dataset directory to write")
  parser.add_argument("--vocab_size", type=int, default=1024)
  parser.add_argument("--source", default=None, help="text_files: a directory or glob of UTF-8 files; jsonl: "
                      "a JSONL file, directory or glob")
  parser.add_argument("--tokenizer", default=None, help="an existing sentencepiece .model to use (SFT recipes: "
                      "required) instead of training one")
  args = parser.parse_args(argv)
  try:
    manifest = build(args.output, vocab_size=args.vocab_size, source=args.source, tokenizer=args.tokenizer)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sizes = ", ".join(f"{s}: {v['documents']} docs / {v['bytes'] / 1e6:.2f} MB" for s, v in manifest["splits"].items())
  print(f"{name}: {args.output} ({sizes}; vocab {manifest['vocab_size']}; sha256 {manifest['sha256'][:12]})")
  return 0

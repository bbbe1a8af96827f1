"""Data recipes: each builds a dataset directory (JSONL shards, held-out split, manifest, sentencepiece
tokenizer) from a real corpus. Run one as `python -m data_recipes.<name> --output DIR [--vocab_size N]` (DIR may
be a bucket folder, gs:// or s3://)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from diffgemma_jax import storage
from diffgemma_jax.data import remote_dataset
from diffgemma_jax.data.build_status import JobBuild
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.errors import ConfigError, DataError

PRETRAIN_RECIPES = ("python_stdlib", "python_packages", "shakespeare", "text_files", "pypi_code")
SFT_RECIPES = ("python_docstrings", "jsonl")  # prompt/response records (data/sft.py); they train no tokenizer
RECIPES = PRETRAIN_RECIPES + SFT_RECIPES
SOURCE_RECIPES = ("text_files", "jsonl", "python_packages")  # those that read data.source (the others ignore it)
HELDOUT_SOURCE_RECIPES = ("text_files", "jsonl")  # those that read data.heldout_source


def build_dataset(recipe: str, output_dir: str, vocab_size: int | None, source: str | None = None, *,
                  tokenizer: str | None = None, job: JobBuild | None = None, **options) -> dict:
  """Builds (or reuses, when its manifest matches) the dataset of `recipe` in `output_dir`.

  `tokenizer`: an existing sentencepiece model to copy in instead of training one (required by SFT recipes).
  `options`: recipe-specific (jsonl: heldout_source, max_bad_lines; text_files: text_field, max_bad_lines) and
  how to build a pretraining dataset (build_workers, tokenizer_sample_lines; a multi-process run's
  process_index, process_count and barrier(name): every process builds its share; `every_process=False`: process
  0 builds alone, as one process would, while the others wait at the barrier). An SFT dataset is written by process
  0 while the others wait at the barrier. `job`: a multi-process run's build_status.JobBuild, whose
  barrier replaces `barrier`: process 0 reports while it waits for the build lock and builds, so the others wait
  for as long as it beats (not a barrier's fixed timeout) and fail with its message when it fails."""
  if recipe not in RECIPES:
    raise DataError(f"data.recipe: unknown recipe {recipe!r}; valid recipes are {RECIPES}")
  import importlib
  build = importlib.import_module(f"data_recipes.{recipe}").build
  if job is not None:
    options["barrier"] = job.barrier
  # Runs started apart (a sweep on one machine, two jobs on one filesystem) may ask for the same folder at once:
  # one builds while the others wait for its lock, then find the dataset current. In a job of several processes
  # process 0 holds the lock for the whole job; the others follow it through the barriers.
  several, every_process = options.get("process_count", 1) > 1, options.pop("every_process", True)
  alone = several and (recipe in SFT_RECIPES or not every_process)
  with job or contextlib.nullcontext(), \
      build_lock(output_dir) if options.get("process_index", 0) == 0 else contextlib.nullcontext():
    if alone:  # process 0 builds as one process would (an SFT set; sources only it can read); the others read it
      one = {key: value for key, value in options.items()
             if key not in ("process_index", "process_count", "barrier")}
      manifest = None
      if options["process_index"] == 0:
        with storage.remembered_listings():
          manifest = build(output_dir, vocab_size=vocab_size, source=source, tokenizer=tokenizer, **one)
      options["barrier"]("diffgemma_dataset_built_by_process_0")
      manifest = manifest or read_manifest(output_dir)
      if manifest is None:
        raise DataError(f"process {options['process_index']}: {output_dir} holds no dataset after process 0 built "
                        f"it there; a job's data.dir must be on a filesystem every process shares, or in a bucket")
      return manifest
    if several:
      options["barrier"]("diffgemma_dataset_checked")  # every process has decided whether to build before writing
    with storage.remembered_listings():  # a source in a bucket: listed once, not asked about file by file
      return build(output_dir, vocab_size=vocab_size, source=source, tokenizer=tokenizer, **options)


def build_lock(output_dir: str):
  """An exclusive lock on `<output_dir>.lock` for the duration of a build (`storage.file_lock`)."""
  return storage.file_lock(output_dir.rstrip("/") + ".lock", f"building {output_dir}")


def run_cli(build, name: str, argv=None, parents=()) -> int:
  """`parents`: a recipe's own argparse parsers (add_help=False), listed in --help; the recipe parses them itself."""
  parser = argparse.ArgumentParser(prog=f"python -m data_recipes.{name}", parents=list(parents))
  parser.add_argument("--output", required=True, help="dataset directory to write, or a bucket folder (gs://, "
                      "s3://): built in --cache_dir and uploaded, as diffgemma-train does for such a data.dir")
  parser.add_argument("--cache_dir", default=None, help="with --output in a bucket: where the dataset is built and "
                      "its copy kept (data.cache_dir; default ~/.cache/diffgemma-jax/datasets)")
  parser.add_argument("--vocab_size", type=int, default=1024)
  parser.add_argument("--source", default=None, help="text_files: a folder, glob or comma-separated list of "
                      "text, JSONL, Parquet or ArrayRecord files; jsonl: a JSONL file, directory or glob")
  parser.add_argument("--heldout_source", default=None, help="text_files, jsonl: files (the same forms as "
                      "--source) that make the held-out split, every --source document trained on (default: a share "
                      "of --source held out by hash)")
  parser.add_argument("--tokenizer", default=None, help="an existing sentencepiece .model to use (SFT recipes: "
                      "required) instead of training one")
  parser.add_argument("--text_field", default="text", help="text_files: the text of a JSONL or Parquet record")
  parser.add_argument("--max_bad_lines", type=int, default=10, help="malformed records skipped before failing")
  parser.add_argument("--workers", type=int, default=0, help="pretraining recipes: build processes (0: every core)")
  parser.add_argument("--tokenizer_sample_lines", type=int, default=None,
                      help="pretraining recipes without --tokenizer: lines of the uniform document sample the "
                      "tokenizer is trained on (default 120000)")
  args = parser.parse_args(argv)
  for flag, value, readers in (("--source", args.source, SOURCE_RECIPES),
                               ("--heldout_source", args.heldout_source, HELDOUT_SOURCE_RECIPES)):
    if value and name not in readers:
      print(f"error: {flag}: the {name} recipe reads no {flag[2:]}; the recipes that do are {readers}",
            file=sys.stderr)
      return 2
  if args.tokenizer_sample_lines is not None and args.tokenizer:
    print("error: --tokenizer_sample_lines: --tokenizer is given, so no tokenizer is trained (it would be ignored); "
          "leave one of them out", file=sys.stderr)
    return 2
  options = dict(vocab_size=args.vocab_size, source=args.source, tokenizer=args.tokenizer,
                 text_field=args.text_field, max_bad_lines=args.max_bad_lines, build_workers=args.workers)
  if args.tokenizer_sample_lines is not None:
    options["tokenizer_sample_lines"] = args.tokenizer_sample_lines
  if args.heldout_source:
    options["heldout_source"] = args.heldout_source
  try:
    with storage.remembered_listings():  # a source in a bucket: listed once, not asked about file by file
      if storage.is_url(args.output):
        storage.check_reachable(args.output, "--output")
        local = remote_dataset.build_in_bucket(str(args.output).rstrip("/"),
                                               args.cache_dir or remote_dataset.default_cache_root(),
                                               lambda folder: build(folder, **options))
        manifest = read_manifest(local)
      else:
        manifest = build(args.output, **options)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sizes = ", ".join(f"{s}: {v['documents']} docs / {v['bytes'] / 1e6:.2f} MB" for s, v in manifest["splits"].items())
  print(f"{name}: {args.output} ({sizes}; vocab {manifest['vocab_size']}; sha256 {manifest['sha256'][:12]})")
  return 0

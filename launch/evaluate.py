"""diffgemma-eval --config FILE (--workdir DIR | --checkpoint PATH) [--step N | best | N,M,... | all]
[--output FILE.json] [--heldout FILES [--heldout_dir DIR] [--text_field NAME]]
[--partial_dir DIR] [--config.a.b=value ...]: the held-out perplexity bound of a checkpoint, printed (and optionally
written) as JSON; of several (`--step 400,800`, `--step all`) as a JSON list, evaluated in turn by one compiled
program (a run's curve without compiling per step). `--step best`: the step of lowest held-out bound the trainer
recorded with its checkpoints (`checkpoint.keep_best`).

`--checkpoint` evaluates another run's parameters (a workdir, its checkpoints/ folder or a step folder) under this
config and on its held-out set: e.g. the pretrained model on a fine-tuning config's held-out pairs.

`--heldout FILES` evaluates a held-out set of your own (a standard validation set, another domain): every document
of those files (text, JSONL, Parquet or ArrayRecord; folders, globs, bucket URLs), tokenised with the run's own
tokenizer into an evaluation set kept in `--heldout_dir` (default: a cache folder keyed by the files and the
tokenizer; built once, rebuilt when a file changes), every sequence of it unless `--config.eval.max_sequences` says
otherwise. The result names it (`heldout`, `dataset`); `unigram_ppl` is the training split's unigram model on it
where the config's dataset is on this host, else null.

A long evaluation reports its progress on stderr and keeps its partial results in `--partial_dir` (default
WORKDIR/eval-partial with --workdir; none with --checkpoint unless given): stopped by SIGTERM it saves them and
exits with status 4, and the same command continues from there (a kill loses at most the last minute).

Started on several hosts as one job (`launch/multihost/local.sh`, `srun`, a JobSet: the environment
`distributed_settings` reads), the processes join JAX's distributed runtime, as the trainer's do, and compute one
bound on a mesh spanning them, each loading its slice of every held-out batch; process 0 writes and prints it
(docs/multihost.md)."""

from __future__ import annotations

import argparse
import json
import sys

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError, DataError
from diffgemma_jax.evaluate import evaluate_steps
from diffgemma_jax.parallel.distributed import initialize_distributed
from diffgemma_jax.train.bound import EvaluationStopped
from diffgemma_jax.train.reading import parse_step
from .common import Outputs, config_overrides, fail, json_safe, load_run_config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="diffgemma-eval", description=__doc__)
  parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--workdir", help="the training workdir holding checkpoints/")
  where.add_argument("--checkpoint", help="parameters of another run (workdir, checkpoints/ or step folder) "
                     "evaluated under this config, e.g. a pretrained model on an SFT held-out set")
  parser.add_argument("--step", default=None, help="checkpoint step (default: the latest; best: the one of lowest "
                      "recorded held-out bound); several, comma-separated (400,800), or 'all': each evaluated in turn "
                      "by one compiled program, printed as a JSON list")
  parser.add_argument("--partial_dir", default=None, help="folder (local or a bucket URL) for partial results, so "
                      "a stopped evaluation continues (default: WORKDIR/eval-partial with --workdir)")
  parser.add_argument("--output", default=None, help="also write the JSON here: a local file or a bucket URL "
                      "(s3://..., gs://...)")
  parser.add_argument("--heldout", default=None, help="evaluate these documents instead of the config's held-out "
                      "split: text, JSONL(.gz/.zst), Parquet or ArrayRecord files, folders or globs, "
                      "comma-separated, local or in a bucket (--text_field names a record's text), tokenised with the "
                      "run's tokenizer into an evaluation set (built once, rebuilt when a file changes); every "
                      "sequence unless --config.eval.max_sequences is given")
  parser.add_argument("--heldout_dir", default=None, help="where --heldout's evaluation set is built and kept "
                      "(default: eval-sets/<digest of the sources and tokenizer> in data.cache_dir, "
                      "~/.cache/diffgemma-jax/datasets unless set, under data.cache_max_gb)")
  parser.add_argument("--text_field", default=None, help="with --heldout: the field (JSONL) or column (Parquet) "
                      "holding a record's text (default: data.text_field, 'text')")
  args, rest = parser.parse_known_args(argv)
  try:
    steps = _steps(args.step)
    overrides = config_overrides(rest)
    for flag in ("heldout_dir", "text_field"):
      if getattr(args, flag) and not args.heldout:
        raise ConfigError(f"--{flag}: only with --heldout")
    if args.heldout and "eval.max_sequences" not in overrides:
      overrides["eval.max_sequences"] = "0"  # a whole evaluation set, unless asked otherwise
    config = load_run_config(args.config, overrides)
    initialize_distributed(config)  # before any device is touched; a no-op for one process
    outputs = Outputs(config)
    outputs.check(args.output, "--output")  # before the evaluation, not after it
    partial_dir = args.partial_dir or (storage.join(args.workdir, "eval-partial") if args.workdir else None)
    results = evaluate_steps(config, args.workdir, steps, checkpoint=args.checkpoint, partial_dir=partial_dir,
                             log=lambda message: print(message, file=sys.stderr, flush=True), heldout=args.heldout,
                             heldout_dir=args.heldout_dir, heldout_text_field=args.text_field)
  except (ConfigError, DataError) as e:
    return fail(str(e))
  except EvaluationStopped as e:
    where = f"; its partial results are in {e.path}" if e.path else ""
    return fail(f"{e} (SIGTERM){where}: run the same command to continue", code=4)
  listed = args.step is not None and (args.step.strip() == "all" or "," in args.step)  # a JSON list
  text = json.dumps(json_safe(results if listed else results[0]), indent=2, sort_keys=True, allow_nan=False)
  outputs.write(args.output, text + "\n")
  outputs.print(text)
  return 0


def _steps(text: str | None):
  """--step as `evaluate_steps` takes it: [None] (the latest), a list of steps (numbers, or "best"), or "all"."""
  if text is None:
    return [None]
  if text.strip() == "all":
    return "all"
  try:
    return [parse_step(part, "--step") for part in text.split(",")]
  except ConfigError:
    raise ConfigError(f"--step {text}: give a step number (>= 0) or 'best' (the step of lowest recorded held-out "
                      f"bound), several separated by commas (400,800), or 'all'") from None


if __name__ == "__main__":
  sys.exit(main())

"""diffgemma-lm-eval [lm-eval arguments]: EleutherAI's lm-evaluation-harness with the `diffgemma` model registered
and this repository's task files (diffgemma_jax/harness_tasks: the held-out stdlib tasks) on its include path, e.g.
  diffgemma-lm-eval --model diffgemma --model_args config=configs/pretrain_tiny.py,workdir=runs/tiny \\
      --tasks stdlib_heldout_mc,stdlib_heldout_completion --batch_size 32
Every argument goes to the harness's own CLI unchanged (`lm-eval --help`), plus `--include_path` of our tasks
unless you give one, except a bucket `--output_path` (gs://, s3://; on the command line or in the harness's own
`--config` YAML file): the harness's writer takes local paths only, so it writes into a temporary folder whose
files are uploaded to the URL when it ends, also when it fails part way. Needs the lm_eval extra
(pip install -e '.[lm_eval]')."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile

import yaml

import diffgemma_jax
from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError, DataError
from .common import Outputs

# the package's own task files (package data), wherever it is installed
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(diffgemma_jax.__file__)), "harness_tasks")


class ShippedTaskNotice(logging.Filter):
  """Drops one notice of the harness (lm_eval.api.task), for the tasks shipped in TASKS_DIR only: that a task whose
  `custom_dataset` is a function may be given keyword arguments with `--metadata`. It comes with every run of
  such a task; ours read local JSONL and take none. The same notice for any other task, and every other record,
  pass."""

  def __init__(self):
    super().__init__()
    shipped = sorted(name[:-len(".yaml")] for name in os.listdir(TASKS_DIR) if name.endswith(".yaml"))
    self.prefixes = tuple(f"{task}: Custom kwargs can be passed to `--metadata`" for task in shipped)

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING and record.getMessage().startswith(self.prefixes))


def harness_argv(argv: list[str]) -> list[str]:
  """The harness's arguments: `argv`, with this repository's task directory as the include path unless one is
  given (the harness takes one; a directory of your own tasks can hold a copy or a link of ours)."""
  argv = list(argv)
  if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
    return argv
  if not argv or argv[0] in ("-h", "--help"):
    return argv
  return argv + ["--include_path", TASKS_DIR]


def split_output_path(argv: list[str]) -> tuple[str | None, list[str]]:
  """(the --output_path the harness's parser reads from `argv`, or None; `argv` without it): written as
  `--output_path X`, `--output_path=X`, `-o X` or an abbreviation such as `--output X`, as the harness accepts."""
  parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
  parser.add_argument("--output_path", "-o")
  try:
    known, rest = parser.parse_known_args(argv)
  except argparse.ArgumentError:  # `--output_path` without a value: the harness says so
    return None, list(argv)
  return known.output_path, rest


def config_output_path(argv: list[str]) -> str | None:
  """The `output_path` of the harness's own YAML config (`--config`/`-C FILE`) when `argv` names one that sets
  it; the harness's command line overrides it, as it overrides every key of that file."""
  parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
  parser.add_argument("--config", "-C")
  try:
    known, _ = parser.parse_known_args(argv)
    if not known.config:
      return None
    with open(known.config) as f:
      values = yaml.safe_load(f)
  except (argparse.ArgumentError, OSError, yaml.YAMLError):  # the harness reports a bad --config itself
    return None
  value = values.get("output_path") if isinstance(values, dict) else None
  return str(value) if value else None


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  output, rest = split_output_path(argv)
  if output is None:  # a bucket output_path in the harness's YAML config is replaced on the command line
    output, rest = config_output_path(argv), argv
  try:
    outputs = Outputs()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not outputs.first:  # process 0 writes the results and prints the table; the others' go to a scratch folder
    with tempfile.TemporaryDirectory(prefix="diffgemma-harness-") as scratch, contextlib.redirect_stdout(io.StringIO()):
      return _evaluate(rest + (["--output_path", scratch] if output is not None else []))
  if output is None or not storage.is_url(output):
    return _evaluate(argv)
  try:
    storage.check_reachable(output, "--output_path")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # the harness writes `X.json` as X_<date>.json beside it (samples too), a folder as files inside it
  folder, name = (output.rsplit("/", 1) if output.endswith(".json") else (output, ""))
  with storage.staged_folder(folder, partial=True) as local:
    return _evaluate(rest + ["--output_path", os.path.join(local, name) if name else local])


def _evaluate(argv: list[str]) -> int:
  """The harness's own CLI on `argv` (with our task files), 0; 2 after a one-line error of our model."""
  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError:
    print("error: diffgemma-lm-eval needs the lm-evaluation-harness: pip install -e '.[lm_eval]'", file=sys.stderr)
    return 2
  import lm_eval.evaluator

  import diffgemma_jax.harness  # noqa: F401  (registers the diffgemma model)
  saved, saved_git_hash = sys.argv, getattr(lm_eval.evaluator, "get_git_commit_hash", None)
  sys.argv = ["lm-eval"] + harness_argv(argv)
  if saved_git_hash is not None:
    lm_eval.evaluator.get_git_commit_hash = git_commit_hash
  notice, task_logger = ShippedTaskNotice(), logging.getLogger("lm_eval.api.task")
  task_logger.addFilter(notice)
  try:
    cli_evaluate()
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    diffgemma_jax.harness.report_failure(str(e))  # for the launch's other processes, if there are any
    return 2
  except ValueError as e:  # the harness's own checks of its arguments (an unknown task, none given): one line
    if not raised_by_harness(e):
      raise
    line = f"lm-eval: {str(e).splitlines()[0] if str(e) else type(e).__name__} (diffgemma-lm-eval --tasks list names them)"
    print(f"error: {line}", file=sys.stderr)
    diffgemma_jax.harness.report_failure(line)
    return 2
  finally:
    sys.argv = saved
    if saved_git_hash is not None:
      lm_eval.evaluator.get_git_commit_hash = saved_git_hash
    task_logger.removeFilter(notice)
  return 0


def raised_by_harness(error: BaseException) -> bool:
  """Whether `error` was raised by lm-eval's own code (its argument and task checks), not by ours under it."""
  import traceback
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and f"{os.sep}lm_eval{os.sep}" in frames[-1].filename


def git_commit_hash() -> str | None:
  """What lm-eval's `get_git_commit_hash` records as its results' `git_hash` (`git describe --always` in the
  working directory, else the commit its `.git` names, else None), without the `fatal: not a git repository`
  that git prints to the job's log when the working directory is not in a repository (a cluster job's usually
  is not); git's other errors are dropped with it, as the harness ignores them too."""
  import subprocess

  from lm_eval.loggers.utils import get_commit_from_path
  try:
    return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return get_commit_from_path(os.getcwd())


if __name__ == "__main__":
  sys.exit(main())

"""The run history: every start of a run appends one JSON line to `workdir/run_history.jsonl` with its effective
config, the command-line overrides, the command line, the step it starts from, and the versions of this package
and of jax, so a resumed or extended run records what changed (run_config.json beside the checkpoints keeps the
first run's config, which a resume is checked against)."""

from __future__ import annotations

import datetime
import json
import os
import sys
from importlib import metadata
from typing import Any

import jax
from etils import epath

HISTORY_FILE = "run_history.jsonl"


def _version(package: str) -> str:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "unknown"


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir`'s history, oldest first (a line cut by a kill is skipped)."""
  path = epath.Path(os.path.join(workdir, HISTORY_FILE))
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


def append_run_history(workdir: str, config_dict: dict[str, Any], *, start_step: int,
                       overrides: dict[str, str] | None = None, command: list[str] | None = None) -> dict | None:
  """Appends this start's record (process 0 writes) and returns the record before it: the start whose run wrote
  the checkpoints this one resumes from (None for a first start)."""
  previous = (read_history(workdir) or [None])[-1]
  if jax.process_index() == 0:
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "start_step": int(start_step), "command": list(sys.argv if command is None else command),
              "overrides": dict(overrides or {}), "diffgemma_jax": _version("diffgemma-jax"),
              "jax": jax.__version__, "config": config_dict}
    with epath.Path(os.path.join(workdir, HISTORY_FILE)).open("a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
  return previous

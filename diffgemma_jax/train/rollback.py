"""Rolling a run back to an earlier checkpoint, optionally skipping data (`diffgemma-rollback`): the remedy for a
loss spike that large runs use (PaLM restarted from a checkpoint about 100 steps before a spike and skipped the
200-500 batches around it).

`roll_back(workdir, step, skip_batches)` sets every saved step after `step` aside (renamed `<step>.rolled-back`:
kept, never deleted, no longer a step) and writes `ROLLBACK_FILE` in the workdir. The trainer, resuming from `step`
(now the newest), drops the log records after it as any resume does, and starts the data stream `skip_batches`
global batches further on than the checkpoint saved (`skipped_state`). The file applies to a start from that step
only: once the run has saved a later step, whose data position already holds the skip, a restart resumes from that
one and the file no longer applies; a restart from the same step (a crash before the next save) skips the same
batches again. The training command itself is unchanged, so a scheduler's requeue repeats nothing.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.train.checkpoint import Checkpointer, aside_path
from diffgemma_jax.train.reading import check_workdir

ROLLBACK_FILE = "rollback.json"
SET_ASIDE = ".rolled-back"


def roll_back(workdir: str, step: int, skip_batches: int = 0) -> dict[str, Any]:
  """Sets the steps after `step` aside and records the roll-back (see the module docstring); returns the record.
  Stop the run first: its job would save into the folder while this renames in it."""
  check_workdir(workdir, reading=True)
  if skip_batches < 0:
    raise ConfigError(f"--skip_batches {skip_batches}: give a number of global batches >= 0")
  root = storage.resolve(workdir)
  directory = storage.join(root, "checkpoints")
  reader = Checkpointer(directory, create=False)
  try:
    steps = sorted(reader.all_steps())
    problem = reader.damage(step, reader.saved_items(step)) if step in steps else None
  finally:
    reader.close()
  if step not in steps:
    raise ConfigError(f"--step {step}: no such checkpoint in {directory}; its steps are {steps}")
  if problem:
    raise ConfigError(f"--step {step}: that checkpoint is damaged ({problem}); roll back to an intact one")
  later = [s for s in steps if s > step]
  if not later and not skip_batches:
    raise ConfigError(f"--step {step} is the newest checkpoint in {directory} and --skip_batches is 0: nothing to "
                      f"roll back")
  set_aside = []
  for s in later:
    target = aside_path(directory, s, SET_ASIDE)
    storage.rename_folder(storage.join(directory, str(s)), target)
    set_aside.append(os.path.basename(target))
  record = {"step": step, "skip_batches": int(skip_batches), "set_aside": set_aside,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  epath.Path(storage.join(root, ROLLBACK_FILE)).write_text(json.dumps(record, indent=2) + "\n")
  return record


def read_record(workdir: str) -> dict[str, Any] | None:
  """The run's last roll-back (`roll_back`'s record), or None when it has had none."""
  path = epath.Path(storage.join(storage.resolve(workdir), ROLLBACK_FILE))
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:
    raise ConfigError(f"{path} is not JSON; diffgemma-rollback writes it: run it again, or delete the file") from None


def pending_skip(workdir: str, start_step: int) -> int:
  """The batches a roll-back asks a start from `start_step` to skip (0: none, or a roll-back to another step)."""
  record = read_record(workdir) or {}
  return int(record.get("skip_batches", 0)) if int(record.get("step", -1)) == start_step else 0


def skipped_state(state: Any, skip_batches: int) -> Any:
  """A data iterator state `skip_batches` global batches further on (the trainer's `{"next_index": n}`)."""
  if not (isinstance(state, dict) and "next_index" in state):
    raise ConfigError(f"{ROLLBACK_FILE} asks to skip {skip_batches} batches, but this checkpoint's data position "
                      f"({type(state).__name__}) is not a batch index (a checkpoint of an older version)")
  return dict(state, next_index=int(state["next_index"]) + int(skip_batches))

"""What a run's workdir holds (`diffgemma-inspect --workdir`): its checkpoints, each with its size, whether it is
intact (`integrity`), whether it holds the parameters' moving average and the held-out bound the trainer recorded
with it; the latest and the best of them; the folders beside them that are not steps (a damaged step set aside, an
unfinished save); and the run's starts (`history`). Read from listings and small files only, locally or in a bucket:
no tensor is read."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.train import ema as moving_average
from diffgemma_jax.train import integrity
from diffgemma_jax.train.checkpoint import CONFIG_FILE, DAMAGED, Checkpointer, best_of
from diffgemma_jax.train.history import read_history
from diffgemma_jax.train.logging import logged_records
from diffgemma_jax.train.reading import TOKENIZER_FILE, check_workdir
from diffgemma_jax.train.rollback import ROLLBACK_FILE, SET_ASIDE, read_record

# On a local disk Orbax writes a step into a folder named `<step>.orbax-checkpoint-tmp...` and renames it when
# complete; on object storage it writes the step's own folder and a commit marker last.
UNFINISHED_MARK = ".orbax-checkpoint-tmp"


def _other_entry(name: str) -> str:
  """What a folder beside the steps is."""
  if DAMAGED in name:
    return "a damaged step set aside by a resume that saved its step again (kept for you to delete)"
  if SET_ASIDE in name:
    return "a step set aside by diffgemma-rollback (kept for you to delete)"
  if UNFINISHED_MARK in name or name.isdigit():  # on object storage: a step folder without its commit marker
    return "an unfinished save (a killed or running save; never read as a step)"
  return "not a step folder"


def list_run(workdir: str) -> dict[str, Any]:
  """The report of the run in `workdir` (see the module docstring) as a JSON-ready dict."""
  check_workdir(workdir, reading=True)
  root = storage.resolve(workdir)
  directory = storage.join(root, "checkpoints")
  history = read_history(root)
  if not (history or epath.Path(directory).is_dir()):
    raise ConfigError(f"--workdir {workdir} holds no run (no checkpoints/ and no run_history.jsonl); give a "
                      f"diffgemma-train --workdir")
  saved_config = epath.Path(storage.join(directory, CONFIG_FILE))
  config = history[-1]["config"] if history else (json.loads(saved_config.read_text())
                                                  if saved_config.is_file() else {})
  checkpoint_config = config.get("checkpoint", {})
  report: dict[str, Any] = {
      "workdir": workdir, "checkpoints_dir": directory,
      "objective": config.get("objective", {}).get("name"),
      "tokenizer_pinned": epath.Path(storage.join(root, TOKENIZER_FILE)).is_file(),
      "keep": checkpoint_config.get("keep"), "keep_best": checkpoint_config.get("keep_best", 0),
      "ema_decay": config.get("train", {}).get("ema_decay", 0.0),
      "starts": [{"time": r.get("time"), "start_step": r.get("start_step"), "overrides": r.get("overrides", {})}
                 for r in history],
      "num_steps": config.get("train", {}).get("num_steps"), "logged_through_step": _last_logged_step(root),
      "steps": [], "latest_step": None, "best_step": None, "other": [], "rollback": None}
  report["rollback"] = read_record(root)
  if not epath.Path(directory).is_dir():
    return report
  reader = Checkpointer(directory, create=False)
  try:
    steps = sorted(reader.all_steps())
    bounds = reader.recorded_bounds()
    best = best_of(bounds)
    items = {step: reader.saved_items(step) for step in steps}
  finally:
    reader.close()
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    entry = {"step": step, "bytes": sum(integrity.file_sizes(epath.Path(step_dir)).values()),
             "moving_average": moving_average.ITEM in items[step], "damage": integrity.damage(step_dir, items[step])}
    if step in bounds:
      entry.update(bounds[step])
    report["steps"].append(entry)
  report["latest_step"] = steps[-1] if steps else None
  report["best_step"] = best[0] if best else None
  listed = {str(step) for step in steps} | {CONFIG_FILE}
  report["other"] = [{"name": path.name, "what": _other_entry(path.name)}
                     for path in sorted(epath.Path(directory).iterdir(), key=lambda p: p.name)
                     if path.name not in listed and path.is_dir()]
  return report


def _last_logged_step(root: str) -> int | None:
  """The last training step metrics.jsonl logged (None: no file, or no step logged yet)."""
  return max((int(r["step"]) for r in logged_records(root) if "train/loss" in r), default=None)


def _size(n: int) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} B"


def format_run(report: dict[str, Any]) -> list[str]:
  """`list_run`'s report as text lines."""
  pinned = "tokenizer pinned" if report["tokenizer_pinned"] else "no tokenizer pinned"
  lines = [f"run          {report['workdir']} (objective {report['objective'] or 'unknown'}, {pinned})"]
  starts = report["starts"]
  if starts:
    lines.append(f"starts       {len(starts)}: " + "; ".join(
        f"step {s['start_step']} at {s['time']}" + (f" ({' '.join(f'{k}={v}' for k, v in s['overrides'].items())})"
                                                    if s["overrides"] else "") for s in starts))
  if report["logged_through_step"] is not None:
    lines.append(f"progress     trained and logged to step {report['logged_through_step']} of "
                 f"{report['num_steps']} (train.num_steps of the last start)")
  keep = report["keep"]
  kept = (f"checkpoint.keep {keep if keep else 'all'}" + (f", keep_best {report['keep_best']}"
                                                          if report["keep_best"] else ""))
  lines.append(f"checkpoints  {report['checkpoints_dir']}: {len(report['steps'])} complete ({kept})")
  if report["steps"]:
    lines.append(f"  {'step':>8}  {'held-out bits/token':<21}  {'weights':<7}  {'size':>10}  notes")
    for entry in report["steps"]:
      bound = (f"{entry['bits_per_token']:.4f} +- {entry['stderr_bits_per_token']:.4f}"
               if "bits_per_token" in entry else "-")
      notes = [note for note, holds in (("latest", entry["step"] == report["latest_step"]),
                                        ("best", entry["step"] == report["best_step"]),
                                        ("bound from metrics.jsonl", entry.get("logged", False)),
                                        ("moving average saved", entry["moving_average"])) if holds]
      if entry["damage"]:
        notes.append(f"DAMAGED: {entry['damage']}")
      lines.append(f"  {entry['step']:>8}  {bound:<21}  {entry.get('weights', '-'):<7}  {_size(entry['bytes']):>10}  "
                   f"{', '.join(notes)}".rstrip())
  lines += [f"  also       {other['name']}: {other['what']}" for other in report["other"]]
  if report["rollback"]:
    rollback = report["rollback"]
    lines.append(f"rolled back to step {rollback['step']} at {rollback['time']}, skipping "
                 f"{rollback['skip_batches']} batches after it ({ROLLBACK_FILE})")
  return lines


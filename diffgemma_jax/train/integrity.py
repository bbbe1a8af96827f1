"""Is a checkpoint step folder still what was written? A record of its files, and what a damaged copy looks like.

Orbax renames a step folder into place only once every file is written, so a killed save never looks complete. What
it cannot see is damage after the fact: a copy of the run cut short, a full disk while copying, a file deleted by
hand. Once a save is final the trainer records, inside the step folder, every file's size (`FILES_RECORD`); a later
reader compares the folder with that record by listing it, without reading a tensor, and names the first file
that is missing or has another size. A folder without a record (written before the record existed, or its record
itself lost) gets a structural check instead: each item and each metadata file Orbax needs is there and parses.
Sizes catch truncation and deletion, the damage these events leave; they do not catch a flipped byte.
"""

from __future__ import annotations

import json
import re

from etils import epath

FILES_RECORD = "file_sizes.json"
# The Orbax files each item of a step needs (StandardSave items; JsonSave items keep one `metadata` file).
_STANDARD_FILES = ("_METADATA", "manifest.ocdbt")
_JSON_ITEM_FILE = "metadata"


def file_sizes(step_dir: epath.Path) -> dict[str, int]:
  """{path relative to the step folder: size in bytes} of every file under it, the record excepted."""
  sizes, folders = {}, [step_dir]
  while folders:  # listed folder by folder: object stores' clients differ in their recursive walks
    for path in folders.pop().iterdir():
      if path.is_dir():
        folders.append(path)
      else:
        relative = str(path.relative_to(step_dir))
        if relative != FILES_RECORD:
          sizes[relative] = path.stat().length
  return sizes


def record_files(step_dir) -> None:
  """Writes the record of a finished step folder (one writer: call it on process 0 only)."""
  step_dir = epath.Path(step_dir)
  if not step_dir.is_dir():  # removed meanwhile (checkpoint.keep)
    return
  (step_dir / FILES_RECORD).write_text(json.dumps(file_sizes(step_dir), indent=0, sort_keys=True))


def damage(step_dir, items: tuple[str, ...]) -> str | None:
  """What is wrong with a step folder (naming the file, relative to the checkpoints folder), or None if it still
  holds what was written; `items` are the Orbax items a reader needs (e.g. ("params",))."""
  step_dir = epath.Path(step_dir)
  prefix = step_dir.name
  record_path = step_dir / FILES_RECORD
  if record_path.is_file():
    try:
      recorded = json.loads(record_path.read_text())
    except ValueError:
      recorded = None
    if isinstance(recorded, dict):
      present = file_sizes(step_dir)
      for relative, size in sorted(recorded.items()):
        if relative not in present:
          return f"{prefix}/{relative} is missing"
        if present[relative] != size:
          return f"{prefix}/{relative} has {present[relative]} bytes, {size} were written"
      return None
  return _structural_damage(step_dir, items)


def _structural_damage(step_dir: epath.Path, items: tuple[str, ...]) -> str | None:
  prefix = step_dir.name
  for item in items:
    folder = step_dir / item
    if not folder.is_dir():
      return f"{prefix}/{item} is missing"
    needed = (_JSON_ITEM_FILE,) if (folder / _JSON_ITEM_FILE).exists() else _STANDARD_FILES
    for name in needed:
      path = folder / name
      if not path.is_file():
        return f"{prefix}/{item}/{name} is missing"
      if name != "manifest.ocdbt":
        try:
          json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
          return f"{prefix}/{item}/{name} is not valid JSON (cut short?)"
  return None


_PATH_IN_MESSAGE = re.compile(r'(?:local )?file "?(/[^"\s]+)"?')


def describe_read_error(step_dir, error: BaseException) -> str:
  """A one-line account of a failed read of `step_dir`, naming the file (or item folder) the error or one of its
  causes names, if any (tensorstore's errors name them; Orbax wraps them)."""
  step_dir = str(epath.Path(step_dir))
  chain, seen = [], error
  while seen is not None and len(chain) < 8:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for link in reversed(chain):
    for path in _PATH_IN_MESSAGE.findall(str(link)):
      if path.startswith(step_dir + "/"):
        return f"{epath.Path(step_dir).name}/{path[len(step_dir) + 1:].rstrip('/')} cannot be read ({_first_line(link)})"
  return f"it cannot be read ({type(error).__name__}: {_first_line(error)})"


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return (text.splitlines()[0] if text else type(error).__name__)[:200]

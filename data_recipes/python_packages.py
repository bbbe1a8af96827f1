"""A code corpus from the Python sources installed on this machine: the interpreter's standard library and its
site-packages (no download; what `bench/gpu_pair.sh` trains on where no package index can be reached).

`data.source` (`--source`): comma-separated folders of Python packages and modules (site-packages, the stdlib, or
any folder laid out like them); empty: the running interpreter's stdlib and site-packages. Every top-level package
or module of a folder is one unit: a package lands whole on one side of the split (held out by package), chosen by
a hash of its name, so the split depends on what is installed, not on paths or file order. Units larger than a
quarter of the held-out share never go to the held-out side, so one big package (torch, transformers) cannot
become the whole held-out set. Held out: at least 4% of the bytes.

Files: every `.py` under the folders except the stdlib recipe's excluded folders (test suites, caches, generated
help text), files over 1 MB (generated tables), non-UTF-8 files, and exact duplicates (vendored copies: the bytes
are kept once, in the first package in hash order). `max_bytes` (`--max_mb`) keeps whole units in hash order until
the corpus would pass it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import site
import sys
import sysconfig

from data_recipes.common import is_current, read_manifest, read_utf8, write_dataset
from data_recipes.python_stdlib import EXCLUDED_DIRS
from diffgemma_jax.data.errors import DataError

HELDOUT_FRACTION = 0.04
MAX_FILE_BYTES = 1 << 20


def default_folders() -> list[str]:
  """The running interpreter's stdlib and site-packages folders that exist, in that order, without repeats."""
  paths = sysconfig.get_paths()
  candidates = [paths["stdlib"], paths["purelib"], paths["platlib"]] + list(site.getsitepackages())
  out = []
  for path in candidates:
    real = os.path.realpath(path)
    if os.path.isdir(real) and real not in out:
      out.append(real)
  return out


def source_folders(source: str | None) -> list[str]:
  if not source:
    return default_folders()
  folders = [os.path.realpath(s.strip()) for s in source.split(",") if s.strip()]
  for folder in folders:
    if not os.path.isdir(folder):
      raise DataError(f"data.source: {folder!r} is not a folder; give comma-separated folders of Python packages "
                      f"(a site-packages or stdlib folder), or leave it empty for this interpreter's own")
  return folders


def unit_of(relpath: str) -> str:
  """The top-level package or module a file under a folder belongs to: `json/decoder.py` -> `json`."""
  top = relpath.split(os.sep, 1)[0]
  return top[:-len(".py")] if top.endswith(".py") else top


def python_files(folder: str) -> list[str]:
  """Paths of the `.py` files under `folder` relative to it, sorted; excluded folders and big files left out."""
  found = []
  for directory, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".") and "." not in d)
    for name in files:
      path = os.path.join(directory, name)
      if name.endswith(".py") and os.path.getsize(path) <= MAX_FILE_BYTES:
        found.append(os.path.relpath(path, folder))
  return sorted(found)


def _hash(name: str) -> str:
  return hashlib.sha256(name.encode()).hexdigest()


def candidate_units(folders: list[str]) -> dict[str, list[tuple[str, str]]]:
  """{unit: [(folder, relative path)]} of every candidate file, in folder then path order."""
  units: dict[str, list[tuple[str, str]]] = {}
  for folder in folders:
    for rel in python_files(folder):
      units.setdefault(unit_of(rel), []).append((folder, rel))
  if not units:
    raise DataError(f"no Python sources found under {folders}")
  return units


def select_units(sizes: dict[str, int], max_bytes: int = 0) -> list[str]:
  """Units in hash order, whole, while their total stays within `max_bytes` (0: all of them)."""
  order = sorted(sizes, key=_hash)
  if not max_bytes:
    return order
  kept, total = [], 0
  for unit in order:
    if total + sizes[unit] <= max_bytes:
      kept.append(unit)
      total += sizes[unit]
  return kept


def documents(units: dict[str, list[tuple[str, str]]]) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
  """{unit: [(document name, text)]}, deduplicated by content, and counts of what was skipped. A document is named
  `<folder name>/<path>` (`site-packages/json/decoder.py`)."""
  out: dict[str, list[tuple[str, str]]] = {}
  seen: set[bytes] = set()
  skipped = {"non_utf8": 0, "duplicate": 0, "empty": 0}
  for unit, files in units.items():
    for folder, rel in files:
      text = read_utf8(os.path.join(folder, rel))
      if text is None:
        skipped["non_utf8"] += 1
        continue
      if not text.strip():
        skipped["empty"] += 1
        continue
      digest = hashlib.sha256(text.encode("utf-8")).digest()
      if digest in seen:
        skipped["duplicate"] += 1
        continue
      seen.add(digest)
      label = os.path.basename(folder.rstrip(os.sep)) or folder
      out.setdefault(unit, []).append((f"{label}/{rel}", text))
  if not out:
    raise DataError("no non-empty UTF-8 Python sources among the selected packages")
  return out, skipped


def split_units(units: dict[str, list[tuple[str, str]]],
                heldout_fraction: float = HELDOUT_FRACTION) -> dict[str, list[tuple[str, str]]]:
  """Holds out units in hash order until the held-out side has `heldout_fraction` of the bytes, skipping units
  larger than a quarter of that share; each unit lands whole on one side."""
  size = {u: sum(len(t.encode("utf-8")) for _, t in docs) for u, docs in units.items()}
  target = heldout_fraction * sum(size.values())
  heldout, held = set(), 0
  for unit in sorted(units, key=_hash):
    if held >= target:
      break
    if size[unit] <= target / 4:
      heldout.add(unit)
      held += size[unit]
  splits = {"train": [], "heldout": []}
  for unit in sorted(units):
    splits["heldout" if unit in heldout else "train"].extend(sorted(units[unit]))
  return splits


def _stamp(folders: list[str]) -> str:
  """A digest of every candidate file's path, size and mtime: a changed installation is rebuilt."""
  digest = hashlib.sha256()
  for folder in folders:
    for rel in python_files(folder):
      st = os.stat(os.path.join(folder, rel))
      digest.update(f"{folder}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          max_bytes: int | None = None, **_) -> dict:
  """Builds the corpus; `max_bytes` None reuses a current build whatever its cap (the trainer's call after a
  capped build by the command line), an int (0: no cap) rebuilds unless the current one has that cap."""
  folders = source_folders(source)
  notes = {"folders": folders, "python": sys.version.split()[0], "files_digest": _stamp(folders),
           "excluded_dirs": sorted(EXCLUDED_DIRS), "max_file_bytes": MAX_FILE_BYTES}
  if is_current(output_dir, "python_packages", vocab_size, source, tokenizer):
    manifest = read_manifest(output_dir)
    same_cap = max_bytes is None or manifest.get("max_bytes") == max_bytes
    if same_cap and all(manifest.get(key) == value for key, value in notes.items()):
      return manifest
  candidates = candidate_units(folders)
  sizes = {unit: sum(os.path.getsize(os.path.join(f, rel)) for f, rel in files) for unit, files in candidates.items()}
  kept = select_units(sizes, max_bytes or 0)
  units, skipped = documents({unit: candidates[unit] for unit in kept})
  splits = split_units(units, HELDOUT_FRACTION)
  notes.update(max_bytes=max_bytes or 0, skipped=skipped, units={
      split: sorted({unit_of(name.split("/", 1)[1]) for name, _ in splits[split]}) for split in splits})
  return write_dataset(output_dir, "python_packages", vocab_size, splits, source=source, notes=notes,
                       tokenizer=tokenizer)


def main(argv=None) -> int:
  from data_recipes import run_cli
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--max_mb", type=float, default=0.0, help="keep whole packages up to this many MB (0: all)")
  args, rest = parser.parse_known_args(argv)
  if args.max_mb < 0:
    print(f"error: --max_mb={args.max_mb} must be >= 0 (0: no cap)", file=sys.stderr)
    return 2
  return run_cli(functools.partial(build, max_bytes=int(args.max_mb * 1e6)), "python_packages", rest)


if __name__ == "__main__":
  sys.exit(main())

"""A code corpus from the Python sources installed on this machine: the interpreter's standard library and its
site-packages (no download; what `bench/gpu_pair.sh` trains on where no package index can be reached).

`data.source` (`--source`): comma-separated folders of Python packages and modules (site-packages, the stdlib, or
any folder laid out like them); empty: the running interpreter's stdlib and site-packages. Every top-level package
or module of a folder is one unit: a package lands whole on one side of the split (held out by package), chosen in
the order of a hash of its name, so the split depends on what is installed, not on paths or file order. Units
larger than a quarter of the held-out share never go to the held-out side, so one big package (torch,
transformers) cannot become the whole held-out set. Held out: at least 4% of the bytes.

Files: every `.py` under the folders except the stdlib recipe's excluded folders (test suites, caches, generated
help text), files over 1 MB (generated tables), non-UTF-8 files, and exact duplicates (vendored copies: the bytes
are kept once, in the first package in hash order). `max_bytes` (`--max_mb`) keeps whole units in hash order while
the corpus stays within it. The selected files are gathered into one JSONL file per package in CACHE (keyed by the
installation's files and the cap), which the token store is built from.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import site
import sys
import sysconfig

from data_recipes.common import (
  build_options,
  build_text_dataset,
  is_current,
  publish_folder,
  read_utf8,
  staging_folder,
  text_build_settings,
)
from data_recipes.python_stdlib import EXCLUDED_DIRS
from diffgemma_jax.data.build import Corpus
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.errors import DataError

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "diffgemma_jax", "python_packages")
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


def unit_documents(units: dict[str, list[tuple[str, str]]], skipped: dict[str, int]):
  """(unit, document name, text) of the units' files in the given unit order, deduplicated by content; skips are
  counted in `skipped`. A document is named `<folder name>/<path>` (`site-packages/json/decoder.py`)."""
  seen: set[bytes] = set()
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
      yield unit, f"{os.path.basename(folder.rstrip(os.sep)) or folder}/{rel}", text


def heldout_units(sizes: dict[str, int], heldout_fraction: float = HELDOUT_FRACTION) -> list[str]:
  """Units in hash order, skipping any larger than a quarter of the held-out share, until the held-out side has
  `heldout_fraction` of the bytes."""
  target = heldout_fraction * sum(sizes.values())
  out, held = [], 0
  for unit in sorted(sizes, key=_hash):
    if held >= target:
      break
    if sizes[unit] <= target / 4:
      out.append(unit)
      held += sizes[unit]
  return out


def _stamp(folders: list[str]) -> str:
  """A digest of every candidate file's path, size and mtime: a changed installation is rebuilt."""
  digest = hashlib.sha256()
  for folder in folders:
    for rel in python_files(folder):
      st = os.stat(os.path.join(folder, rel))
      digest.update(f"{folder}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def gather(folders: list[str], max_bytes: int, stamp: str, cache: str = CACHE) -> tuple[Corpus, dict]:
  """The selected units as one JSONL file each (`<unit>.jsonl`, records {"text", "path"}) in the cache, written
  once per (folders, installation stamp, cap); the corpus over them and what was kept and skipped."""
  key = hashlib.sha256(json.dumps([folders, stamp, max_bytes]).encode()).hexdigest()[:16]
  root = os.path.join(cache, f"corpus-{key}")
  done = os.path.join(root, "units.json")
  if not os.path.isfile(done):
    candidates = candidate_units(folders)
    sizes = {unit: sum(os.path.getsize(os.path.join(f, rel)) for f, rel in files)
             for unit, files in candidates.items()}
    kept = select_units(sizes, max_bytes)
    staging = staging_folder(root)
    skipped = {"non_utf8": 0, "duplicate": 0, "empty": 0}
    written: dict[str, int] = {}
    out, current = None, None
    for unit, name, text in unit_documents({unit: candidates[unit] for unit in kept}, skipped):
      if unit != current:
        if out:
          out.close()
        out, current = open(os.path.join(staging, f"{unit}.jsonl"), "w", encoding="utf-8"), unit
      out.write(json.dumps({"text": text, "path": name}, ensure_ascii=False) + "\n")
      written[unit] = written.get(unit, 0) + len(text.encode("utf-8"))
    if out:
      out.close()
    if not written:
      shutil.rmtree(staging, ignore_errors=True)
      raise DataError(f"no non-empty UTF-8 Python sources under {folders}")
    with open(os.path.join(staging, "units.json"), "w") as f:
      json.dump({"bytes": written, "skipped": skipped}, f)
    publish_folder(staging, root, "units.json")
  with open(done) as f:
    info = json.load(f)
  held = heldout_units(info["bytes"])
  corpus = Corpus(root=root, files=tuple(f"{unit}.jsonl" for unit in sorted(info["bytes"])),
                  name=f"the Python packages of {folders}", split_by="file", heldout_fraction=HELDOUT_FRACTION,
                  heldout_keys=tuple(f"{unit}.jsonl" for unit in held))
  return corpus, {"skipped": info["skipped"], "units": {"heldout": sorted(held),
                                                        "train": sorted(set(info["bytes"]) - set(held))}}


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          max_bytes: int | None = None, **options) -> dict:
  """Builds the corpus; `max_bytes` None reuses a current build whatever its cap (the trainer's call after a
  capped build by the command line), an int (0: no cap) rebuilds unless the current one has that cap."""
  folders = source_folders(source)
  notes = {"folders": folders, "python": sys.version.split()[0], "files_digest": _stamp(folders),
           "excluded_dirs": sorted(EXCLUDED_DIRS), "max_file_bytes": MAX_FILE_BYTES}
  settings = text_build_settings(Corpus(root="", files=(), name="", split_by="file",
                                        heldout_fraction=HELDOUT_FRACTION), tokenizer, options)
  if is_current(output_dir, "python_packages", vocab_size, source, tokenizer, expect={**notes, **settings}):
    manifest = read_manifest(output_dir)
    if max_bytes is None or manifest.get("max_bytes") == max_bytes:
      return manifest
  corpus, selection = gather(folders, max_bytes or 0, notes["files_digest"])
  return build_text_dataset(output_dir, "python_packages", corpus, vocab_size, source=source, tokenizer=tokenizer,
                            notes={**notes, **selection, "max_bytes": max_bytes or 0}, **build_options(options))


def main(argv=None) -> int:
  from data_recipes import run_cli
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--max_mb", type=float, default=0.0, help="keep whole packages up to this many MB (0: all)")
  args, rest = parser.parse_known_args(argv)
  if args.max_mb < 0:
    print(f"error: --max_mb={args.max_mb} must be >= 0 (0: no cap)", file=sys.stderr)
    return 2
  return run_cli(functools.partial(build, max_bytes=int(args.max_mb * 1e6)), "python_packages", rest,
                 parents=(parser,))


if __name__ == "__main__":
  sys.exit(main())

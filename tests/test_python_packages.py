"""data_recipes.python_packages: installed Python sources as a corpus, held out by package, deduplicated, capped
by whole packages."""

from __future__ import annotations

import os
import sysconfig

import pytest

from data_recipes import python_packages as pp
from diffgemma_jax.errors import DataError


def _write(root, rel, text):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


@pytest.fixture()
def folder(tmp_path):
  """A site-packages-like folder: 40 small packages of two modules, one big package, a vendored copy, a test
  suite, a cache and a non-UTF-8 file."""
  root = str(tmp_path / "site-packages")
  for i in range(40):
    _write(root, f"pkg{i:02d}/__init__.py", f"VALUE = {i}\n")
    _write(root, f"pkg{i:02d}/core.py", f"def f{i}(x):\n    return x * {i}\n" * 20)
  _write(root, "big/__init__.py", "def big(x):\n    return x\n" * 2000)
  _write(root, "vendor/_copy.py", "def f3(x):\n    return x * 3\n" * 20)  # same bytes as pkg03/core.py
  _write(root, "single.py", "print('one module')\n")
  _write(root, "pkg01/tests/test_core.py", "assert True\n")
  _write(root, "pkg01/__pycache__/core.py", "cached = 1\n")
  with open(os.path.join(root, "pkg02", "latin1.py"), "wb") as f:
    f.write("name = 'caf\xe9'\n".encode("latin-1"))
  return root


def test_units_are_whole_packages_deduplicated_and_held_out_whole(folder, tmp_path):
  units = pp.candidate_units([folder])
  assert set(units) == {f"pkg{i:02d}" for i in range(40)} | {"big", "vendor", "single"}
  assert ("pkg01/tests/test_core.py" not in {rel for _, rel in units["pkg01"]}
          and "pkg01/__pycache__/core.py" not in {rel for _, rel in units["pkg01"]})
  skipped = {"non_utf8": 0, "duplicate": 0, "empty": 0}
  docs = list(pp.unit_documents(units, skipped))
  assert skipped == {"non_utf8": 1, "duplicate": 1, "empty": 0}
  names = [name for _, name, _ in docs]
  assert len(names) == len(set(names)) == 40 * 2 + 1 + 1  # the vendored copy or pkg03/core.py, once
  assert names[0].startswith("site-packages/")
  corpus, selection = pp.gather([folder], 0, "stamp", cache=str(tmp_path / "cache"))
  held, trained = set(selection["units"]["heldout"]), set(selection["units"]["train"])
  assert held and not held & trained and "big" in trained  # 'big' is over a quarter of the held-out share
  assert corpus.split_by == "file" and set(corpus.heldout_keys) == {f"{u}.jsonl" for u in held}
  sizes = {f: os.path.getsize(os.path.join(corpus.root, f)) for f in corpus.files}
  assert sum(sizes[f"{u}.jsonl"] for u in held) >= pp.HELDOUT_FRACTION * sum(sizes.values()) * 0.9


def test_cap_keeps_whole_packages_in_hash_order(folder):
  sizes = {unit: sum(os.path.getsize(os.path.join(f, rel)) for f, rel in files)
           for unit, files in pp.candidate_units([folder]).items()}
  kept = pp.select_units(sizes, max_bytes=5000)
  assert 0 < sum(sizes[u] for u in kept) <= 5000 and "big" not in kept
  order = sorted(sizes, key=pp._hash)  # pylint: disable=protected-access
  assert kept == [u for u in order if u in kept] and kept[0] == next(u for u in order if sizes[u] <= 5000)
  assert pp.select_units(sizes, 0) == order


def test_source_that_is_not_a_folder_is_named(tmp_path):
  with pytest.raises(DataError, match=r"data.source: .*nowhere.* is not a folder"):
    pp.source_folders(f"{tmp_path},{tmp_path / 'nowhere'}")


def test_a_package_bigger_than_a_quarter_of_the_held_out_share_is_never_held_out():
  names = [f"mod{i:03d}" for i in range(100)]
  first = min(names, key=pp._hash)  # pylint: disable=protected-access
  sizes = {n: 2400 if n == first else 12 for n in names}
  held = pp.heldout_units(sizes)
  assert first not in held and held
  assert sum(sizes[n] for n in held) >= pp.HELDOUT_FRACTION * sum(sizes.values())


def test_build_holds_out_exactly_the_chosen_packages(folder, tmp_path, monkeypatch):
  """The token store routes by the recipe's own held-out keys (not the digest threshold): every held-out document
  comes from a chosen package, and every chosen package's documents are held out."""
  monkeypatch.setattr(pp, "CACHE", str(tmp_path / "cache"))
  with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8") as f:
    words = f.read()
  for i in range(40):  # real code, enough for a 512-piece vocabulary
    _write(folder, f"pkg{i:02d}/words.py", words[i * 1500:(i + 1) * 1500])
  manifest = pp.build(str(tmp_path / "data"), vocab_size=512, source=folder, max_bytes=0, build_workers=1)
  held = set(manifest["units"]["heldout"])
  units = pp.candidate_units([folder])
  kept = {u: units[u] for u in sorted(units, key=pp._hash)}  # pylint: disable=protected-access
  docs = [unit for unit, _, _ in pp.unit_documents(kept, {"non_utf8": 0, "duplicate": 0, "empty": 0})]
  assert held and "big" not in held
  assert manifest["splits"]["heldout"]["documents"] == sum(unit in held for unit in docs)
  assert manifest["splits"]["train"]["documents"] == sum(unit not in held for unit in docs)
  assert pp.build(str(tmp_path / "data"), vocab_size=512, source=folder) == manifest  # reused, whatever the cap


def test_help_lists_max_mb(capsys):
  with pytest.raises(SystemExit):
    pp.main(["--help"])
  assert "--max_mb" in capsys.readouterr().out

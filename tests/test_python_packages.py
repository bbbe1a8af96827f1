"""data_recipes.python_packages: installed Python sources as a corpus, held out by package, deduplicated, capped
by whole packages."""

from __future__ import annotations

import os

import pytest

from data_recipes import python_packages as pp
from diffgemma_jax.data.errors import DataError


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


def test_units_are_whole_packages_deduplicated_and_held_out_whole(folder):
  units = pp.candidate_units([folder])
  assert set(units) == {f"pkg{i:02d}" for i in range(40)} | {"big", "vendor", "single"}
  assert ("pkg01/tests/test_core.py" not in {rel for _, rel in units["pkg01"]}
          and "pkg01/__pycache__/core.py" not in {rel for _, rel in units["pkg01"]})
  docs, skipped = pp.documents(units)
  assert skipped == {"non_utf8": 1, "duplicate": 1, "empty": 0}
  names = [name for unit in docs.values() for name, _ in unit]
  assert len(names) == len(set(names)) == 40 * 2 + 1 + 1  # the vendored copy or pkg03/core.py, once
  splits = pp.split_units(docs)
  held = {name.split("/")[1].removesuffix(".py") for name, _ in splits["heldout"]}
  trained = {name.split("/")[1].removesuffix(".py") for name, _ in splits["train"]}
  assert held and not held & trained and "big" in trained  # 'big' is over a quarter of the held-out share
  total = sum(len(t) for part in splits.values() for _, t in part)
  assert sum(len(t) for _, t in splits["heldout"]) >= pp.HELDOUT_FRACTION * total
  assert names[0].startswith("site-packages/")


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
  units = {n: [(f"site-packages/{n}.py", "x = 1\n" * (400 if n == first else 2))] for n in names}
  splits = pp.split_units(units)
  assert f"site-packages/{first}.py" in {name for name, _ in splits["train"]}
  assert len(splits["heldout"]) >= 1

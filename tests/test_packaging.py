"""What a non-editable install carries: the wheel is built (pip, no build isolation: a second or two) from a copy of
the source tree, and it must hold every file of the installed folders (the harness task files included) with no
packaging warning from setuptools; unpacked outside the checkout, the entry points import from it and find their
task files there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> where its files land in the wheel (setup.py: launch/ installs as diffgemma_jax._launch)
INSTALLED = {"diffgemma_jax": "diffgemma_jax", "pallas_kernels": "pallas_kernels", "data_recipes": "data_recipes",
             "launch": "diffgemma_jax/_launch"}
NOT_INSTALLED = ("launch/multihost",)  # job scripts run from a checkout (README "Multi-host")
BUILD_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md")


def _source_files() -> dict[str, str]:
  """{path in the wheel: path in the checkout} of every file the installed folders hold."""
  found = {}
  for folder, target in INSTALLED.items():
    for root, dirs, files in os.walk(os.path.join(REPO, folder)):
      dirs[:] = [d for d in dirs if d != "__pycache__"
                 and os.path.relpath(os.path.join(root, d), REPO) not in NOT_INSTALLED]
      for name in files:
        if name.endswith(".pyc"):
          continue
        rel = os.path.relpath(os.path.join(root, name), os.path.join(REPO, folder))
        found[f"{target}/{rel}".replace(os.sep, "/")] = os.path.relpath(os.path.join(root, name), REPO)
  return found


def _copy_tree(src) -> dict[str, str]:
  """Copies what a build reads into `src`; returns `_source_files()`."""
  files = _source_files()
  for rel in list(files.values()) + list(BUILD_FILES):
    os.makedirs(src / os.path.dirname(rel), exist_ok=True)
    shutil.copy(os.path.join(REPO, rel), src / rel)
  return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """(the built wheel's path, pip's output, the source files it should hold)."""
  root = tmp_path_factory.mktemp("packaging")
  src, out = root / "src", root / "wheel"
  files = _copy_tree(src)
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                         "-w", str(out), str(src)], capture_output=True, text=True, cwd=root)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (built,) = out.glob("diffgemma_jax-*.whl")
  return built, proc.stdout + proc.stderr, files


def test_the_wheel_holds_every_installed_file_and_builds_without_warnings(wheel):
  built, output, files = wheel
  assert "would be ignored" not in output and "Warning" not in output, output
  names = set(zipfile.ZipFile(built).namelist())
  missing = sorted(set(files) - names)
  assert not missing, missing
  assert {"diffgemma_jax/harness_tasks/stdlib_heldout_mc.yaml", "diffgemma_jax/harness_tasks/stdlib_heldout_mc.jsonl",
          "diffgemma_jax/harness_tasks/utils.py", "diffgemma_jax/harness_tasks/baselines.json"} <= names
  assert not [n for n in names if n.startswith(("configs/", "launch/", "tests/", "bench/"))]


def test_the_editable_install_builds_without_warnings(tmp_path):
  """`pip install -e .` builds an editable wheel (setuptools' build_editable); it printed that
  diffgemma_jax.harness_tasks 'would be ignored'."""
  src = tmp_path / "src"
  _copy_tree(src)
  proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                         "print(build_meta.build_editable(sys.argv[1]))", str(tmp_path / "out")],
                        capture_output=True, text=True, cwd=src)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  output = proc.stdout + proc.stderr
  assert proc.stdout.strip().endswith(".whl") and "would be ignored" not in output and "Warning" not in output, output


def test_the_unpacked_wheel_runs_outside_the_checkout(wheel, tmp_path):
  """The console scripts' modules import from the wheel alone (cwd elsewhere, the checkout off sys.path), and
  diffgemma-lm-eval's include path and the tasks' loaders read the task files installed beside them."""
  built, _, _ = wheel
  site = tmp_path / "site"
  zipfile.ZipFile(built).extractall(site)
  entry_points = (site / next(n for n in os.listdir(site) if n.endswith(".dist-info")) / "entry_points.txt")
  modules = sorted({line.split("=")[1].split(":")[0].strip() for line in entry_points.read_text().splitlines()
                    if "=" in line})
  assert len(modules) == 9, modules
  script = f"""
import importlib, importlib.util, os
for name in {modules!r}:
  module = importlib.import_module(name)
  assert module.__file__.startswith({str(site)!r}), module.__file__
from diffgemma_jax._launch.harness import TASKS_DIR
assert TASKS_DIR == os.path.join({str(site)!r}, "diffgemma_jax", "harness_tasks"), TASKS_DIR
spec = importlib.util.spec_from_file_location("utils", os.path.join(TASKS_DIR, "utils.py"))
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)
print(len(utils.load_mc()["test"]), len(utils.load_completion()["test"]))
"""
  env = dict(os.environ, PYTHONPATH=str(site))
  proc = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  mc, completion = map(int, proc.stdout.split())
  assert mc > 0 and completion > 0

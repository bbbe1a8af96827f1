"""Which packages install (everything else is in setup.cfg).

The entry points in launch/ install as `diffgemma_jax._launch` (they import each other relatively), so nothing
named `launch` lands in site-packages; configs/ is not installed at all: configs are files, loaded by path
(`--config configs/pretrain_tiny.py`). In a checkout both folders stay where they are (`python -m launch.train`).
`diffgemma_jax/harness_tasks` is a folder of lm-evaluation-harness task files (YAML, JSONL, its loaders in
utils.py) with no `__init__.py`: it is named here so that its files install (setup.cfg's package_data) and
setuptools does not warn that an importable folder is left out. tests/test_packaging.py builds the wheel and
checks what it holds.
"""

from setuptools import find_packages, setup

LIBRARY = ("diffgemma_jax", "pallas_kernels", "data_recipes")
DATA_FOLDERS = ("diffgemma_jax.harness_tasks",)

setup(packages=find_packages(include=[p for name in LIBRARY for p in (name, f"{name}.*")]) + list(DATA_FOLDERS)
      + ["diffgemma_jax._launch"],
      package_dir={"diffgemma_jax._launch": "launch"})

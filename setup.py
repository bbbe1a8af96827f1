"""Which packages install (everything else is in setup.cfg).

The entry points in launch/ install as `diffgemma_jax._launch` (they import each other relatively), so nothing
named `launch` lands in site-packages; configs/ is not installed at all: configs are files, loaded by path
(`--config configs/pretrain_tiny.py`). In a checkout both folders stay where they are (`python -m launch.train`).
"""

from setuptools import find_packages, setup

LIBRARY = ("diffgemma_jax", "pallas_kernels", "data_recipes")

setup(packages=find_packages(include=[p for name in LIBRARY for p in (name, f"{name}.*")]) + ["diffgemma_jax._launch"],
      package_dir={"diffgemma_jax._launch": "launch"})

"""Tiny masked block diffusion (BD3-LM layout, blocks of 16) on the CPython standard library: pretrain_tiny with the
block objective, so its held-out bound compares directly with plain masked diffusion and the AR baseline."""

import importlib.util
import os


def _recipe(name: str):
  spec = importlib.util.spec_from_file_location(f"_recipe_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _recipe("pretrain_tiny").get_config()
  c.objective.name = "block"
  c.objective.block_size = 16
  return c

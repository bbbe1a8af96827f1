"""The autoregressive twin of pretrain_tiny: the same backbone, data, tokens and schedule with a causal mask and
next-token loss, so its exact held-out perplexity and its generation speed compare directly with the diffusion
model's bound and samplers."""

import importlib.util
import os


def _recipe(name: str):
  spec = importlib.util.spec_from_file_location(f"_recipe_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _recipe("pretrain_tiny").get_config()
  c.objective.name = "ar"
  return c

"""Flag helpers shared by the entry points: `--config.a.b=value` overrides and one-line failures."""

from __future__ import annotations

import math
import sys

from diffgemma_jax.compile_cache import use_compilation_cache
from diffgemma_jax.config import load_config
from diffgemma_jax.errors import ConfigError


def config_overrides(rest: list[str]) -> dict[str, str]:
  """Turns leftover `--config.a.b=value` (or `--config.a.b value`) flags into an overrides dict."""
  overrides: dict[str, str] = {}
  i = 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --config.train.num_steps=10")
    key, eq, value = arg[len("--config."):].partition("=")
    if not eq:
      if i + 1 >= len(rest):
        raise ConfigError(f"override --config.{key} has no value")
      value = rest[i + 1]
      i += 1
    overrides[key] = value
    i += 1
  return overrides


def load_run_config(spec: str, overrides: dict[str, str]):
  """The locked config of `--config` with its overrides, and JAX's compilation cache pointed where it says (before
  anything compiles: JAX opens the cache at the first compile)."""
  config = load_config(spec, overrides)
  use_compilation_cache(config)
  return config


def fail(message: str, code: int = 2) -> int:
  print(f"error: {message}", file=sys.stderr)
  return code


def json_safe(value):
  """`value` with every non-finite float as None, so the JSON printed is standard (no NaN or Infinity)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value

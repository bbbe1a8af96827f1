"""LoRA adapters as parameters: which leaves are adapters, and merging them into the base weights.

An adapter of projection `name` lives beside it as `name_lora` = {"a": A, "b": B} (see `layers.LoRA`); merging
adds (alpha / rank) A B to `name` and drops the adapter, giving the parameters of the same model with
`lora_rank=0` (what export writes and what serving without adapters loads).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.layers import lora_delta

SUFFIX = "_lora"


def is_adapter_path(path: tuple[str, ...]) -> bool:
  """True for the leaves of LoRA adapters (a key path through a `<projection>_lora` node)."""
  return any(isinstance(k, str) and k.endswith(SUFFIX) for k in path)


def merge_lora(params: Mapping[str, Any], cfg: ModelConfig) -> tuple[dict[str, Any], ModelConfig]:
  """(params with every adapter added into its base weight and removed, the config without LoRA: `lora_rank=0`
  and the other lora fields at their defaults).

  `params` is the plain nested dict of a checkpoint (`to_pure`); arrays may be numpy or jax. The merge runs in
  float32 and casts back to each base weight's dtype.
  """
  if cfg.lora_rank <= 0:
    return dict(params), cfg
  scale = float(cfg.lora_alpha) / cfg.lora_rank

  def merge(node):
    if not isinstance(node, Mapping):
      return node
    out = {}
    for key, value in node.items():
      if isinstance(key, str) and key.endswith(SUFFIX):
        continue
      adapter = node.get(f"{key}{SUFFIX}") if isinstance(key, str) else None
      if adapter is not None:
        base = np.asarray(value)
        delta = np.asarray(lora_delta(np.asarray(adapter["a"]), np.asarray(adapter["b"]), scale, base.ndim))
        out[key] = (base.astype(np.float32) + delta).astype(base.dtype)
      else:
        out[key] = merge(value)
    orphans = [k for k in node if isinstance(k, str) and k.endswith(SUFFIX) and k[:-len(SUFFIX)] not in node]
    if orphans:
      raise ValueError(f"LoRA adapters without a base weight: {orphans}")
    return out

  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name.startswith("lora_")}
  return merge(params), dataclasses.replace(cfg, **defaults)

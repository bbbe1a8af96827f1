"""Which parameters a run trains: `train.freeze` groups and LoRA.

The trainable parameters are an nnx filter over parameter paths. The train state keeps every parameter, but the
optimizer state covers the trainable ones only, and gradients are taken with respect to them only: a frozen
expert stack costs neither Adam moments nor a weight gradient. With `model.lora_rank > 0` the LoRA adapters are
the only trainable parameters.
"""

from __future__ import annotations

from typing import Callable, Sequence

from flax import nnx

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.lora import is_adapter_path

FROZEN_DTYPES = ("", "float32", "bfloat16")  # train.frozen_dtype; "": as built (train/state.store_frozen)
_EXPERT_LEAVES = ("w_gate_up", "w_down", "per_expert_scale")
_ROUTER_LEAVES = ("router_w", "router_scale")


def _keys(path) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


FREEZE_GROUPS: dict[str, Callable[[tuple[str, ...]], bool]] = {
    "router": lambda p: "moe" in p and p[-1] in _ROUTER_LEAVES,
    "experts": lambda p: "moe" in p and p[-1] in _EXPERT_LEAVES,
    "attention": lambda p: "attn" in p,
    "mlp": lambda p: "mlp" in p,
    "embedder": lambda p: "embedder" in p,
    "norms": lambda p: any("norm" in k for k in p) or p[-1] == "layer_scalar",
    "self_conditioning": lambda p: p[0] == "self_conditioning",
}


def trainable_filter(model_cfg: ModelConfig, freeze: Sequence[str] = ()):
  """An nnx filter `(path, value) -> bool` selecting the parameters a run updates."""
  unknown = [g for g in freeze if g not in FREEZE_GROUPS]
  if unknown:
    raise ValueError(f"train.freeze: unknown group(s) {unknown}; valid groups are {tuple(FREEZE_GROUPS)}")
  lora = model_cfg.lora_rank > 0
  groups = [FREEZE_GROUPS[g] for g in freeze]

  def trainable(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    keys = _keys(path)
    if lora:
      return is_adapter_path(keys)
    return not any(group(keys) for group in groups)

  return trainable


def split_trainable(params: nnx.State, trainable) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) parts of a parameter State; `nnx.merge_state` puts them back together."""
  return nnx.split_state(params, trainable, ...)


def describe(params: nnx.State, trainable) -> dict[str, int]:
  """Parameter counts of the trainable and frozen parts (for the run's log)."""
  import math
  train, frozen = split_trainable(params, trainable)
  count = lambda s: sum(math.prod(v.shape) for _, v in nnx.to_flat_state(s))  # noqa: E731
  return {"trainable_params": count(train), "frozen_params": count(frozen)}

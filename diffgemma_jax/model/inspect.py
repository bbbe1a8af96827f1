"""Parameter and FLOP accounting of a model config, built under `jax.eval_shape` (no memory for weights)."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.transformer import build_model

EXPERT_PARAMS = ("w_gate_up", "w_down")


def _component(path: tuple[str, ...]) -> str:
  names = [str(p) for p in path]
  if any(n.endswith("_lora") for n in names):
    return "lora_adapters"
  if "embedder" in names:
    return "embedding"
  if "moe" in names:
    return "experts" if names[-1] in EXPERT_PARAMS else "router"
  if "attn" in names:
    return "attention"
  if "mlp" in names:
    return "dense_mlp"
  return "norms_and_scalars"


def abstract_model(cfg: ModelConfig):
  return nnx.eval_shape(lambda: build_model(cfg, 0))


def count_params(cfg: ModelConfig) -> dict[str, Any]:
  """Total parameters, active parameters per token (all non-expert ones plus top_k/E of the experts), by part."""
  model = abstract_model(cfg)
  by_component: dict[str, int] = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      name = _component(path)
      by_component[name] = by_component.get(name, 0) + math.prod(var.shape)
  total = sum(by_component.values())
  experts = by_component.get("experts", 0)
  active = total - experts + experts * cfg.top_k / cfg.num_experts
  return {"total_params": int(total), "active_params_per_token": int(round(active)),
          "params_by_component": dict(sorted(by_component.items()))}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token: 2 x active matmul parameters (embedding lookup excluded, tied unembedding
  included) plus attention scores and values over the context each layer sees (the sliding window or L)."""
  counts = count_params(cfg)["params_by_component"]
  D, E, K = cfg.embed_dim, cfg.num_experts, cfg.top_k
  matmul = (counts.get("attention", 0) + counts.get("dense_mlp", 0) + counts.get("router", 0)
            + counts.get("lora_adapters", 0)
            + counts.get("experts", 0) * K / E + cfg.vocab_size * D)
  attention = 0.0
  for kind in cfg.layer_kinds:
    head_dim = cfg.attention_dims(kind)[0]
    context = min(seq_len, cfg.sliding_window) if kind == "sliding" else seq_len
    attention += 2 * 2 * cfg.num_heads * head_dim * context
  forward = 2 * matmul + attention
  return {"forward_flops_per_token": forward, "train_flops_per_token": 3 * forward,
          "matmul_flops_per_token": 2 * matmul, "attention_flops_per_token": attention}


def inspect_model(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
  report = count_params(cfg)
  report.update(flops_per_token(cfg, seq_len))
  report["seq_len"] = seq_len
  report["num_layers"] = cfg.num_layers
  report["layer_kinds"] = list(cfg.layer_kinds)
  report["jax_backend"] = jax.default_backend()
  return report

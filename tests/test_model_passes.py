"""`Objective.model_passes`, which scales the trainer's MFU, against XLA's own FLOP count of each objective's
training gradient on the same rows (the masked objective's one pass as the unit)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.objectives import make_objective

# Wide matmuls, short attention: XLA's count is dominated by what model_passes counts (tokens through the stack).
CFG = ModelConfig(vocab_size=64, embed_dim=64, num_layers=1, layer_pattern=("global",), num_heads=2,
                  head_dim=8, num_kv_heads=1, sliding_window=8, global_head_dim=8, global_num_kv_heads=1,
                  mlp_dim=256, num_experts=4, top_k=2, expert_dim=128, dispatch="dense")
B, L = 4, 32


def _gradient_flops(objective, cfg) -> float:
  graphdef, params = nnx.split(build_model(cfg))
  batch = {"tokens": jax.random.randint(jax.random.key(0), (B, L), 0, 63),
           "segment_ids": jnp.ones((B, L), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))}
  loss = lambda p: objective.loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(1))[0]
  return float(jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"])


def test_model_passes_matches_xla_flop_count():
  unit = _gradient_flops(make_objective("masked", mask_id=63), CFG)
  for section, self_conditioning in ((dict(name="block", block_size=8), False),
                                     (dict(name="uniform", block_size=8), True)):
    cfg = dataclasses.replace(CFG, self_conditioning=self_conditioning)
    objective = make_objective(section, mask_id=63)
    ratio = _gradient_flops(objective, cfg) / unit
    assert objective.model_passes(L, cfg) == pytest.approx(ratio, rel=0.05), (section, self_conditioning)

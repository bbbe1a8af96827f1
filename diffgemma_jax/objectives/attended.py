"""The rows an objective's model calls attend over: every mask description its loss and its held-out bound hand the
denoiser, found by tracing both abstractly (shapes only, nothing computed or allocated) with a model that records
what `Placement.reorder_row` is given, the call where a context-parallel run decides whether a row runs in the
load-balanced order (`parallel/balance.py`, `balances`).

So a start-up check asks the same question of the same masks the layers will see (`parallel.mesh.check_mesh_fits`
with `balance.unbalanced`) rather than a second description of each objective's layout: the block objective's
[canvas ; clean] rows are 2L long, the uniform objective's training rows one canvas plus the clean row (b + L) and
its bound's 2L, the AR baseline's L, and the masked objective's bidirectional rows never uneven.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.placement import Placement
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.objectives.interface import Objective


class _Recorder(Placement):
  """`LOCAL`, keeping the shapes of every self-attention mask the denoiser is called with."""

  def __init__(self):
    self.masks = []

  def reorder_row(self, inputs, mask):
    self.masks.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mask))
    return inputs, mask


def attended_masks(objective: Objective, model_cfg: ModelConfig, seq_len: int, *, batch_size: int = 1) -> list:
  """The masks (leaves `jax.ShapeDtypeStruct`) of every model call of `objective.loss_fn` and
  `objective.sequence_bound` on packed rows of `seq_len` tokens, traced with `model_cfg` cut to one repetition of
  its layer pattern (the masks depend on the objective, the rows and the model's settings, not on its depth)."""
  cfg = dataclasses.replace(model_cfg, num_layers=len(model_cfg.layer_pattern), scan_layers=False)
  recorder = _Recorder()
  row = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)

  def run(batch):
    model = build_model(cfg, 0, recorder)
    loss, _ = objective.loss_fn(model, batch, jax.random.key(0))
    nelbo, _, _ = objective.sequence_bound(model, batch, jax.random.key(1), num_t_samples=1)
    return loss, nelbo

  jax.eval_shape(run, {"tokens": row, "segment_ids": row, "positions": row})
  return recorder.masks

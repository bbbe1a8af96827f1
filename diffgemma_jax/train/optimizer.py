"""AdamW with linear warmup and cosine decay to `min_lr_ratio`, global-norm clipping, and weight decay on matrices.

Gradient accumulation is not an optax wrapper: `train_step` scans over micro-batches and applies one update, so one
jitted step is one optimizer update and the schedule counts updates.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx


def learning_rate_schedule(train_config) -> optax.Schedule:
  peak = float(train_config.learning_rate)
  warmup = max(int(train_config.warmup_steps), 0)
  total = max(int(train_config.num_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
      end_value=peak * float(train_config.min_lr_ratio))


def _decays(variable: nnx.Variable) -> bool:
  """Weight decay applies to matrices only: norms, per-layer scalars, per-expert scales and biases are exempt.

  The logical axes say what a dimension is, so a stacked ("layers", D) norm scale is not mistaken for a matrix.
  """
  axes = variable.get_metadata().get("axes") or (None,) * len(variable.shape)
  return sum(1 for a in axes if a != "layers") >= 2


def weight_decay_mask(params):
  return jax.tree.map(lambda v: v.replace(_decays(v)), params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(train_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(train_config)
  parts = []
  if float(train_config.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(train_config.b1), b2=float(train_config.b2),
                           weight_decay=float(train_config.weight_decay), mask=weight_decay_mask))
  return optax.chain(*parts), schedule

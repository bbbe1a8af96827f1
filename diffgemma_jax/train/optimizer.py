"""The optimizer (AdamW or Adafactor) with its learning-rate schedule, global-norm clipping, and weight decay on
matrices.

Schedules (`train.lr_schedule`), each with a linear warmup of `train.warmup_steps` from 0 to
`train.learning_rate` and a decay horizon of its own, `train.schedule_steps` (0: `train.num_steps`):
  cosine    cosine decay to `min_lr_ratio` x peak at the horizon (the default);
  linear    linear decay to the same floor at the horizon;
  constant  the peak after warmup, for ever;
  wsd       warmup-stable-decay: the peak until `train.decay_steps` before the horizon, then linear decay to the
            floor. Extending a run moves only the decay phase, so a resume from the plateau continues on it.
  wsd_time  warmup-stable-decay sized by the clock: the run is given `train.max_runtime_s`, not a step count, and
            decays linearly to the floor over the last `train.decay_fraction` of it. The trainer places the decay
            while it runs (train/time_decay.py): once (1 - decay_fraction) of the stepping time is spent, it counts
            the steps the rest of the budget holds at the measured step time and fixes (decay start, horizon);
            `train.num_steps` stays a cap (the decay then starts at (1 - decay_fraction) x num_steps). The pair
            is an argument of the jitted step, so placing it compiles nothing, and it is saved beside the
            checkpoints, so a resumed run follows the same schedule.
A run resumed with another schedule or horizon (a larger `num_steps`, say) gets the new schedule from its step on;
`schedule_change` says by how much the rate jumps there (the trainer warns with the numbers).

Optimizers (`train.optimizer`): `adamw` (b1, b2, decoupled weight decay), or `adafactor`, the optimizer GShard,
Switch Transformer and ST-MoE trained their sparse models with: factored second moments (a row and a column
statistic per matrix instead of a full second moment), so its state is a small fraction of AdamW's two moments,
which is what limits full fine-tuning of a large MoE (README); decay 0.8, no momentum, weight decay as AdamW's.
`train.adam_mu_dtype` ("": the parameters' dtype, "float32" or "bfloat16") is the dtype of AdamW's first moment
(optax's `mu_dtype`); the second moment keeps the parameters' dtype.

Gradient accumulation is not an optax wrapper: `train_step` scans over micro-batches and applies one update, so one
jitted step is one optimizer update and the schedule counts updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

SCHEDULES = ("cosine", "linear", "constant", "wsd", "wsd_time")
# wsd_time before its decay is placed: a start no step reaches.
UNPLACED_DECAY = (2**31 - 1, 2**31 - 1)
OPTIMIZERS = ("adamw", "adafactor")
ADAM_MU_DTYPES = ("", "float32", "bfloat16")  # train.adam_mu_dtype; "": the parameters' dtype


def _get(train_config, key: str, default):
  return train_config.get(key, default) if hasattr(train_config, "get") else getattr(train_config, key, default)


def schedule_horizon(train_config) -> int:
  """The step at which the schedule ends its decay: `train.schedule_steps`, or `train.num_steps` when 0."""
  return int(_get(train_config, "schedule_steps", 0)) or int(train_config.num_steps)


def timed_decay_schedule(peak: float, floor: float, warmup: int, decay) -> optax.Schedule:
  """wsd_time's rate: a linear warmup to `peak`, `peak` until `decay[0]`, then linear to `floor` at `decay[1]`.
  `decay` (start, horizon) may be traced values (the jitted step's argument); the arithmetic is optax's wsd's."""
  start, horizon = decay

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    start_, horizon_ = jnp.asarray(start, jnp.float32), jnp.asarray(horizon, jnp.float32)
    ramp = peak * count / max(warmup, 1)
    length = jnp.maximum(horizon_ - start_, 1.0)
    decayed = (peak - floor) * (1.0 - jnp.clip(count - start_, 0.0, length) / length) + floor
    return jnp.where(count < warmup, ramp, jnp.where(count < start_, peak, decayed))

  return schedule


def learning_rate_schedule(train_config, decay=None) -> optax.Schedule:
  """The rate per update count. `decay`: wsd_time's placed (start, horizon); None before it is placed."""
  peak = float(train_config.learning_rate)
  warmup = max(int(train_config.warmup_steps), 0)
  floor = peak * float(train_config.min_lr_ratio)
  horizon = max(schedule_horizon(train_config), warmup + 1)
  name = str(_get(train_config, "lr_schedule", "cosine"))
  if name == "wsd_time":
    return timed_decay_schedule(peak, floor, warmup, UNPLACED_DECAY if decay is None else decay)
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=horizon, end_value=floor)
  ramp = optax.linear_schedule(0.0, peak, warmup)
  if name == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
  if name == "linear":
    return optax.join_schedules([ramp, optax.linear_schedule(peak, floor, horizon - warmup)], [warmup])
  if name == "wsd":
    decay_start = max(horizon - int(_get(train_config, "decay_steps", 0)), warmup)
    return optax.join_schedules([ramp, optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, floor, horizon - decay_start)], [warmup, decay_start])
  raise ValueError(f"train.lr_schedule: unknown schedule {name!r}; valid are {SCHEDULES}")


def schedule_change(before, after, step: int) -> tuple[float, float] | None:
  """(rate before, rate after) at `step` when the schedule of train config `after` differs there from that of
  `before` (the run that wrote the checkpoint resumed at `step`); None when they agree."""
  old, new = float(learning_rate_schedule(before)(step)), float(learning_rate_schedule(after)(step))
  return None if abs(new - old) <= 1e-6 * max(abs(old), abs(new), 1e-30) else (old, new)


def describe_schedule_change(before, after, step: int) -> str | None:
  """A warning with the numbers when resuming at `step` under train config `after` moves the learning rate off the
  schedule `before` ran; None when it continues."""
  change = schedule_change(before, after, step)
  if change is None:
    return None
  old, new = change
  ratio = f" (x{new / old:.2f})" if old > 0 else ""
  return (f"warning: resuming at step {step}, the learning rate jumps from {old:.3g} to {new:.3g}{ratio}: "
          f"train.lr_schedule={_get(after, 'lr_schedule', 'cosine')!r} now decays to step "
          f"{schedule_horizon(after)}, the run so far followed {_get(before, 'lr_schedule', 'cosine')!r} to step "
          f"{schedule_horizon(before)}. To extend a run without a jump, train it with lr_schedule='wsd' or 'constant', "
          f"or keep train.schedule_steps={schedule_horizon(before)}")


def _decays(variable: nnx.Variable) -> bool:
  """Weight decay applies to matrices only: norms, per-layer scalars, per-expert scales and biases are exempt.

  The logical axes say what a dimension is, so a stacked ("layers", D) norm scale is not mistaken for a matrix.
  """
  axes = variable.get_metadata().get("axes") or (None,) * len(variable.shape)
  return sum(1 for a in axes if a != "layers") >= 2


def weight_decay_mask(params):
  return jax.tree.map(lambda v: v.replace(_decays(v)), params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def placed_decay_optimizer(train_config):
  """wsd_time: `make_optimizer` as a function of the placed (start, horizon), for `make_train_step`'s
  `optimizer_for_decay` (the step then takes the pair as an argument); None for every other schedule."""
  if str(_get(train_config, "lr_schedule", "cosine")) != "wsd_time":
    return None
  return lambda decay: make_optimizer(train_config, decay)


def decay_argument(placed: tuple[int, int] | None) -> np.ndarray:
  """The jitted step's wsd_time argument: int32[2] (start, horizon), or UNPLACED_DECAY before it is placed."""
  return np.asarray(UNPLACED_DECAY if placed is None else placed, np.int32)


def make_optimizer(train_config, decay=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The update rule and its schedule. `decay`: wsd_time's (start, horizon), traced when built inside the step."""
  schedule = learning_rate_schedule(train_config, decay)
  parts = []
  if float(train_config.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip)))
  name = str(_get(train_config, "optimizer", "adamw"))
  weight_decay = float(train_config.weight_decay)
  if name == "adamw":
    mu_dtype = str(_get(train_config, "adam_mu_dtype", ""))  # "": the parameters' dtype (optax's None)
    parts.append(optax.adamw(schedule, b1=float(train_config.b1), b2=float(train_config.b2),
                             mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None,
                             weight_decay=weight_decay, mask=weight_decay_mask))
  elif name == "adafactor":
    parts.append(optax.adafactor(schedule, decay_rate=0.8, multiply_by_parameter_scale=False, momentum=None,
                                 weight_decay_rate=weight_decay or None, weight_decay_mask=weight_decay_mask))
  else:
    raise ValueError(f"train.optimizer: unknown optimizer {name!r}; valid are {OPTIMIZERS}")
  return optax.chain(*parts), schedule

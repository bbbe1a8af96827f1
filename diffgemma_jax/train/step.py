"""The pure train step: one optimizer update from one batch, gradient accumulation by a scan over micro-batches.

`make_train_step` closes over the graphdef, objective and optimizer and returns the step jitted once, with explicit
input/output shardings and the state donated. No branching on model or objective type happens in here.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from diffgemma_jax.parallel.rules import batch_sharding, replicated
from diffgemma_jax.train import ema as moving_average
from diffgemma_jax.train.state import TrainState


# Counts over the batch, summed over micro-batches (the others are means, averaged).
SUMMED_METRICS = ("num_tokens", "dropped_tokens")


def step_rng(base_rng: jax.Array, step: jax.Array) -> jax.Array:
  """The randomness of update `step` depends on the step alone, so a resumed run repeats it exactly."""
  return jax.random.fold_in(base_rng, step)


def _micro_batches(batch: dict[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
  """[B, ...] -> [A, B/A, ...] taking rows with stride A, so each device's rows spread over every micro-batch
  and the row sharding survives the reshape without communication."""
  def split(x):
    rows = x.shape[0] // num_micro
    return jnp.swapaxes(x.reshape((rows, num_micro) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, graphdef, objective, tx,
               schedule: optax.Schedule, grad_accum_steps: int = 1, debug_nan_at_step: int = -1,
               trainable=nnx.Param, ema_decay: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update. `rng` is the run's base key; the step's key is `fold_in(rng, state.step)`.

  Gradients and updates cover the parameters `trainable` selects (an nnx filter; train/freeze.py); the others
  stay as they are. A state that keeps a moving average (`state.ema`) moves it toward the updated parameters by
  `ema_decay` (train/ema.py). Returns the new state and float32 metrics: the objective's (mean over micro-batches, the
  counts in SUMMED_METRICS summed), `grad_norm` (before clipping), `param_norm` (of the trainable parameters
  after the update) and `lr` (the rate this update used).
  """
  rng = step_rng(rng, state.step)
  train_params, frozen = nnx.split_state(state.params, trainable, ...)

  def loss_fn(params, micro_batch, micro_rng):
    with jax.named_scope("objective"):  # the model's own scopes (attention, moe, ...) nest inside
      loss, metrics = objective.loss_fn(nnx.merge(graphdef, params, frozen), micro_batch, micro_rng)
    if debug_nan_at_step >= 0:  # test hook: poison the update that would produce step `debug_nan_at_step`
      loss = jnp.where(state.step + 1 == debug_nan_at_step, jnp.nan, 1.0) * loss
      metrics = dict(metrics, loss=loss)
    return loss, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  micro = _micro_batches(batch, grad_accum_steps)

  def accumulate(grads_sum, inputs):
    index, micro_batch = inputs
    (_, metrics), grads = grad_fn(train_params, micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, grads_sum, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, train_params)
  grads, metrics_A = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
  grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
  metrics = {k: (jnp.sum(v, 0) if k in SUMMED_METRICS else jnp.mean(v.astype(jnp.float32), 0))
             for k, v in metrics_A.items()}

  with jax.named_scope("optimizer"):
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    updated = optax.apply_updates(train_params, updates)
  params = nnx.merge_state(updated, frozen)
  ema = None
  if state.ema is not None:
    with jax.named_scope("ema"):
      ema = moving_average.update(state.ema, updated, ema_decay, state.step + 1)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(updated)  # after the update: non-finite stops the run before a save
  metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def make_train_step(*, graphdef, objective, tx, schedule, mesh: Mesh, state_shardings: TrainState,
                    grad_accum_steps: int = 1, debug_nan_at_step: int = -1, trainable=nnx.Param,
                    ema_decay: float = 0.0,
                    optimizer_for_decay: Callable[[Any], tuple[Any, optax.Schedule]] | None = None
                    ) -> Callable[..., Any]:
  """`train_step` jitted once: state in its shardings and donated, batch rows over the batch axes. The graphdef
  carries the model's placement (`abstract_train_state` builds it for `mesh`).

  `optimizer_for_decay` (the wsd_time schedule): a function of the decay's (start, horizon) returning (tx,
  schedule); the step then takes that pair as a fourth argument, an int32[2] array, and builds its optimizer from
  it, so the trainer can place the decay while it runs without compiling again (the optimizer state's structure
  does not depend on the schedule). `tx` and `schedule` are unused then.
  """
  def step(state, batch, rng, *decay):
    step_tx, step_schedule = optimizer_for_decay(decay[0]) if decay else (tx, schedule)
    return train_step(state, batch, rng, graphdef=graphdef, objective=objective, tx=step_tx,
                      schedule=step_schedule, grad_accum_steps=grad_accum_steps,
                      debug_nan_at_step=debug_nan_at_step, trainable=trainable, ema_decay=ema_decay)

  in_shardings = (state_shardings, batch_sharding(mesh), replicated(mesh))
  if optimizer_for_decay is not None:
    in_shardings += (replicated(mesh),)
  return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=(0,))

"""A moving average of the trained parameters (`train.ema_decay`), kept beside them in the train state.

Masked-diffusion language models are evaluated and sampled with an exponential moving average of their weights
(MDLM and BD3-LM train with decay 0.9999). After update n (n = 1, 2, ...) the average moves toward the new
parameters p_n by

    decay_n = min(train.ema_decay, (1 + n) / (10 + n)),     ema_n = ema_{n-1} + (1 - decay_n) * (p_n - ema_{n-1}),

starting from the initial parameters (ema_0 = p_0). The warm-up factor (1 + n) / (10 + n), the number-of-updates
rule of TensorFlow's `ExponentialMovingAverage` that MDLM's EMA applies too, lets the average forget the random
initialisation within the first hundred updates; from about n = 9 / (1 - decay) on the decay is the configured one.

The average covers the trainable parameters only (a frozen one is its own average) and is kept in float32 whatever
the parameters' dtype: at decay 0.9999 a bfloat16 average could not move. It is sharded like the parameters, saved
in each checkpoint as the item `ema` (a resume continues it exactly), and read in place of the trainable
parameters by evaluation, generation, scoring, the Hugging Face export and a fine-tune's `init.checkpoint`
(`checkpoint.weights` / `init.weights`, train/reading.py); the trainer's own held-out evaluation follows
`checkpoint.weights` too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffgemma_jax.train.freeze import split_trainable

WEIGHTS = ("auto", "ema", "params")  # checkpoint.weights / init.weights: auto = the average where a step has one
ITEM = "ema"  # the checkpoint item holding the average


def initial(params: nnx.State, trainable) -> nnx.State:
  """The average before any update: the trainable parameters in float32 (their shardings: the parameters')."""
  return jax.tree.map(lambda x: x.astype(jnp.float32), split_trainable(params, trainable)[0])


def decay_at(decay: float, updates: jax.Array) -> jax.Array:
  """The decay applied by update number `updates` (1 for the first): the configured one, warmed up."""
  n = updates.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def update(ema: nnx.State, trained: nnx.State, decay: float, updates: jax.Array) -> nnx.State:
  """The average after update number `updates`, whose result is `trained` (the trainable parameters)."""
  rate = 1.0 - decay_at(decay, updates)
  return jax.tree.map(lambda e, p: e + rate * (p.astype(jnp.float32) - e), ema, trained)


def averaged_params(params: nnx.State, ema: nnx.State, trainable) -> nnx.State:
  """The parameters with the trainable ones replaced by their average, in the parameters' own dtypes: the weights
  a reader of the checkpoint gets with `checkpoint.weights=ema` (it restores the average into those dtypes)."""
  trained, frozen = split_trainable(params, trainable)
  averaged = jax.tree.map(lambda e, p: e.astype(p.dtype), ema, trained)
  return nnx.merge_state(averaged, frozen)

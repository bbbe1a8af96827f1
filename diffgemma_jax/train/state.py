"""The train state (step, parameters, optimizer state, and the parameters' moving average when `train.ema_decay`
is set), built sharded: abstract state -> shardings -> jitted init.

The model's graphdef lives outside the state: the state is a pytree of arrays wrapped in `nnx.Param` (which carry
their logical `axes`, so optimizer moments shard like their parameter).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.placement import Placement
from diffgemma_jax.model.transformer import abstract_model, build_model
from diffgemma_jax.parallel.placement import placement_for
from diffgemma_jax.parallel.rules import replicated, shardings_for
from diffgemma_jax.train import ema as moving_average


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: nnx.State  # nnx.Param leaves
  opt_state: optax.OptState
  ema: Any = None  # nnx.State of the trainable parameters' moving average in float32 (train/ema.py), or None


def split_model(model: nnx.Module):
  """(graphdef, params); a denoiser holds parameters only, so the graphdef and params rebuild it exactly."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the denoiser holds non-parameter state, which the trainer does not carry")
  return graphdef, params


def _init(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, trainable=nnx.Param,
          frozen_dtype: str = "", ema: bool = False) -> TrainState:
  _, params = split_model(build_model(cfg, seed))
  params = store_frozen(params, trainable, frozen_dtype)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable_part(params, trainable)),
                    ema=moving_average.initial(params, trainable) if ema else None)


def store_frozen(params: nnx.State, trainable, frozen_dtype: str) -> nnx.State:
  """`params` with the parameters `trainable` leaves out held in `frozen_dtype` (`train.frozen_dtype`; "": as
  built). The layers cast every weight to the compute dtype where they use it, so a frozen weight whose values
  the dtype holds exactly (a bfloat16 release imported to float32) computes what it did, in half the bytes."""
  if not frozen_dtype:
    return params
  train, frozen = nnx.split_state(params, trainable, ...)
  frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
  return nnx.merge_state(train, frozen)


def trainable_part(params: nnx.State, trainable=nnx.Param) -> nnx.State:
  """The parameters the optimizer updates (`train.freeze` / LoRA, see train/freeze.py); all of them by default."""
  return nnx.split_state(params, trainable, ...)[0]


def abstract_train_state(cfg: ModelConfig, tx, mesh: Mesh, seed: int = 0, trainable=nnx.Param, *,
                         placement: Placement | None = None, frozen_dtype: str = "", ema: bool = False):
  """(graphdef, abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings); allocates nothing.

  The graphdef is the model's placed on `mesh` (`parallel.placement`: activation rows over the batch axes,
  expert-parallel MoE dispatch with an `expert` axis > 1). The optimizer state covers the parameters `trainable`
  selects (an nnx filter; default: all of them). `placement`: the run config's (`placement_for(mesh, config)`),
  else the mesh's default. `frozen_dtype`: the other parameters' dtype (`store_frozen`). `ema`: the state keeps
  the trainable parameters' moving average (train/ema.py), sharded like them."""
  graphdef, _ = split_model(abstract_model(cfg, placement or placement_for(mesh)))
  abstract = jax.eval_shape(lambda: _init(cfg, tx, seed, trainable, frozen_dtype, ema))
  shardings = TrainState(step=replicated(mesh), params=shardings_for(abstract.params, mesh),
                         opt_state=shardings_for(abstract.opt_state, mesh),
                         ema=shardings_for(abstract.ema, mesh) if ema else None)
  return graphdef, abstract, shardings


def evaluation_model(cfg: ModelConfig, placement: Placement):
  """(graphdef, abstract params) of the model an evaluation or a reader runs: `cfg` built for `placement`,
  dispatching its experts dropless. A held-out bound, a score or a sample is then the parameters' function on any
  mesh and at any batch size, where a capacity would drop whichever assignments a full buffer met (training keeps
  `model.capacity_factor`). The parameters are the trained model's: `dropless` changes no array."""
  return split_model(abstract_model(dataclasses.replace(cfg, dropless=True), placement))


def init_params(cfg: ModelConfig, param_shardings, seed: int) -> nnx.State:
  """Freshly initialised parameters only, each array placed directly in its sharding (no optimizer state)."""
  return jax.jit(lambda: split_model(build_model(cfg, seed))[1], out_shardings=param_shardings)()


def init_train_state(cfg: ModelConfig, tx, shardings: TrainState, seed: int, trainable=nnx.Param,
                     params: nnx.State | None = None, frozen_dtype: str = "") -> TrainState:
  """Initialises every array directly in its sharding (no full copy on one device first). Given `params`
  (already placed, e.g. from init.checkpoint, in their stored dtypes), only the step and optimizer state are
  new, and the moving average (when `shardings.ema` asks for one) starts from them."""
  ema = shardings.ema is not None
  if params is not None:
    opt_state = jax.jit(lambda p: tx.init(trainable_part(p, trainable)), out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state, ema=start_average(params, trainable, shardings.ema))
  return jax.jit(lambda: _init(cfg, tx, seed, trainable, frozen_dtype, ema), out_shardings=shardings)()


def start_average(params: nnx.State, trainable, ema_shardings) -> nnx.State | None:
  """The moving average of `params` before any update, placed in `ema_shardings` (None: the run keeps none)."""
  if ema_shardings is None:
    return None
  return jax.jit(lambda p: moving_average.initial(p, trainable), out_shardings=ema_shardings)(params)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying their target sharding (the restore target of a checkpoint)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _is_node(x) -> bool:
  return isinstance(x, (nnx.Variable, nnx.State))


def to_pure(tree: Any) -> Any:
  """Strips nnx wrappers: State -> dict, Variable -> its value. What checkpoints store, readable without flax."""
  def one(x):
    if isinstance(x, nnx.State):
      return to_pure(nnx.to_pure_dict(x))
    if isinstance(x, nnx.Variable):
      return x.get_value()
    return x

  return jax.tree.map(one, tree, is_leaf=_is_node)


def from_pure(template: Any, pure: Any) -> Any:
  """Inverse of `to_pure`: the leaves of `pure` put back into the structure (and wrappers) of `template`."""
  treedef = jax.tree.structure(template)
  pure_leaves = jax.tree.leaves(pure)
  template_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(to_pure(template))]
  pure_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)]
  if len(pure_leaves) != treedef.num_leaves:
    raise ValueError(f"checkpoint has {len(pure_leaves)} arrays where the model expects {treedef.num_leaves}")
  if template_paths != pure_paths:
    raise ValueError("checkpoint tree does not match the model's parameter tree")
  return jax.tree.unflatten(treedef, pure_leaves)

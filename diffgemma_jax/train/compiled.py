"""A run config's train step built as the trainer builds it, for the code that drives the step itself: benchmarks,
tests that compare meshes or lower the step for another platform, scripts that probe what fits.

`compile_train_step(config, mask_id=...)` gives a `CompiledStep`: the jitted step, the mesh, the optimizer, the
sharded state's abstract shapes and shardings, and where a batch goes. No dataset, checkpoint or loop is involved;
`synthetic_batch` makes packed rows to feed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.objectives import make_objective
from diffgemma_jax.parallel import rules
from diffgemma_jax.parallel.mesh import mesh_from_config
from diffgemma_jax.parallel.placement import placement_for
from diffgemma_jax.train.freeze import trainable_filter
from diffgemma_jax.train.optimizer import decay_argument, make_optimizer, placed_decay_optimizer
from diffgemma_jax.train.state import TrainState, abstract_train_state, init_train_state
from diffgemma_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """`step(state, batch, rng) -> (state, metrics)` jitted once (train/step.py), and what it was built for. Under
`train.lr_schedule = "wsd_time"` the step takes a fourth argument, the decay's placement (`decay_args`).

  XLA compiles the step on its first call, or ahead of time with `step.lower(abstract_state, batch, rng)`. The
  state is not kept here: the step donates it, so a kept state would be a dead buffer after the first update;
  `init_state()` makes a fresh one each time it is called.
  """
  step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  model_config: ModelConfig
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  graphdef: nnx.GraphDef
  abstract_state: TrainState  # ShapeDtypeStructs: lowering and compiling need no allocation
  state_shardings: TrainState
  batch_sharding: NamedSharding
  trainable: Any  # the nnx filter of the parameters the optimizer updates (train.freeze, LoRA)
  seed: int
  frozen_dtype: str = ""  # train.frozen_dtype: the frozen parameters' dtype ("": as built)
  decay_placed: bool = False  # wsd_time: the step's fourth argument places the decay (train/time_decay.py)

  def decay_args(self, placed: tuple[int, int] | None = None) -> tuple[np.ndarray, ...]:
    """The step's arguments after (state, batch, rng): wsd_time's (start, horizon), unplaced by default."""
    return (decay_argument(placed),) if self.decay_placed else ()

  def init_state(self) -> TrainState:
    """The trainer's fresh state (`train.seed`), each array made directly in its sharding."""
    return init_train_state(self.model_config, self.tx, self.state_shardings, self.seed, self.trainable,
                            frozen_dtype=self.frozen_dtype)

  def place(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """The batch's rows over the mesh's batch axes, as the step takes them."""
    return jax.device_put(batch, self.batch_sharding)

  def lower_abstract(self, batch_size: int, seq_len: int):
    """The step lowered for an abstract batch of packed rows [batch_size, seq_len] (tokens, segment ids,
    positions) and the abstract state: `.compile()` it to read its HLO or XLA's memory account, nothing
    allocated."""
    batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
             for key in ("tokens", "segment_ids", "positions")}
    return self.step.lower(self.abstract_state, batch, jax.random.key(0), *self.decay_args())


def compile_train_step(config, *, mask_id: int, mesh: Mesh | None = None,
                       optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None) -> CompiledStep:
  """The train step of run config `config`, from the same sections the trainer reads: the model (`config.model`),
  the mesh (`mesh_from_config`), the optimizer and schedule (`make_optimizer(config.train)`), the objective
  (`config.objective`, with the tokenizer's `mask_id`), `train.grad_accum_steps`, `train.freeze` (or the LoRA
  adapters), `train.seed`, `train.ema_decay` (the state then keeps the moving average) and
  `train.debug_nan_at_step`.

  `mesh`: a mesh over chosen devices instead of the config's (a sharded step compared with one device), used as
  given: `check_mesh_fits` would name `mesh.shape` from the config, which this mesh is not. `optimizer`: (tx,
  schedule) instead of the config's (one that records each gradient in its state, say); it replaces wsd_time's
  placed decay too.
  """
  model_config = ModelConfig.from_config_dict(config.model)
  train_config = config.train
  mesh = mesh_from_config(config) if mesh is None else mesh
  tx, schedule = optimizer if optimizer is not None else make_optimizer(train_config)
  seed = int(train_config.seed)
  trainable = trainable_filter(model_config, tuple(train_config.freeze))
  frozen_dtype = str(train_config.get("frozen_dtype", ""))
  ema_decay = float(train_config.get("ema_decay", 0.0))
  graphdef, abstract, shardings = abstract_train_state(model_config, tx, mesh, seed, trainable,
                                                       placement=placement_for(mesh, config), frozen_dtype=frozen_dtype,
                                                       ema=ema_decay > 0)
  optimizer_for_decay = placed_decay_optimizer(train_config) if optimizer is None else None
  step = make_train_step(graphdef=graphdef, objective=make_objective(config.objective, mask_id=mask_id), tx=tx,
                         schedule=schedule, mesh=mesh, state_shardings=shardings,
                         grad_accum_steps=int(train_config.grad_accum_steps),
                         debug_nan_at_step=int(train_config.debug_nan_at_step), trainable=trainable,
                         ema_decay=ema_decay, optimizer_for_decay=optimizer_for_decay)
  return CompiledStep(step=step, model_config=model_config, mesh=mesh, tx=tx, schedule=schedule, graphdef=graphdef,
                      abstract_state=abstract, state_shardings=shardings, batch_sharding=rules.batch_sharding(mesh),
                      trainable=trainable, seed=seed, frozen_dtype=frozen_dtype,
                      decay_placed=optimizer_for_decay is not None)


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Rows packed with documents of random lengths (segment ids and per-document positions), no padding; tokens
  drawn uniformly from [5, vocab_size): none is pad, unk, bos, eos or the mask id 4."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, vocab_size, (batch_size, seq_len)).astype(np.int32)
  segment_ids = np.zeros((batch_size, seq_len), np.int32)
  positions = np.zeros((batch_size, seq_len), np.int32)
  for row in range(batch_size):
    start, segment = 0, 1
    while start < seq_len:
      length = min(int(rng.integers(16, seq_len + 1)), seq_len - start)
      segment_ids[row, start:start + length] = segment
      positions[row, start:start + length] = np.arange(length)
      start, segment = start + length, segment + 1
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

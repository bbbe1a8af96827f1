"""What a run's train step needs in each device's memory, known before a run: the train state as its mesh places
it (the parameters, trainable and frozen, and the optimizer state), and with a compile XLA's own account of the
step (its arguments, outputs and temporaries: activations kept for the backward, gradients, collective buffers).
`diffgemma-inspect --memory` prints both; the trainer logs the state's line at start.

The state's bytes are exact: each array's shard shape under its sharding, times its item size, summed over the
arrays a device holds (every device holds the same shapes: the rules table drops a split that does not divide).
The compiled figures are XLA's buffer assignment for the backend that compiles, and the step's peak is estimated
as arguments + outputs - aliased outputs + temporaries (the state is donated, so the new state reuses the old
one's buffers). XLA:CPU computes bfloat16 in float32 and fuses differently from XLA:GPU, so a CPU compile of a
GPU config (fake devices) says what the state costs exactly and what the temporaries cost only roughly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from diffgemma_jax.train.compiled import CompiledStep
from diffgemma_jax.train.freeze import split_trainable
from diffgemma_jax.train.state import TrainState


def bytes_per_device(abstract_tree: Any, sharding_tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs placed by the matching tree of shardings."""
  leaves, shardings = jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree)
  if len(leaves) != len(shardings):
    raise ValueError(f"{len(leaves)} arrays but {len(shardings)} shardings")
  return sum(math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf, sharding in zip(leaves, shardings))


@dataclasses.dataclass(frozen=True)
class StateMemory:
  """Bytes per device of a train state's parts."""
  trainable_params: int
  frozen_params: int
  optimizer: int
  step: int
  moving_average: int = 0  # train.ema_decay > 0: the trainable parameters' average, in float32

  @property
  def total(self) -> int:
    return self.trainable_params + self.frozen_params + self.optimizer + self.step + self.moving_average


def state_memory(abstract: TrainState, shardings: TrainState, trainable) -> StateMemory:
  """The bytes per device of a train state (ShapeDtypeStructs) placed by `shardings`; `trainable`: the filter of
  the parameters the optimizer updates. Nothing is allocated."""
  train_abstract, frozen_abstract = split_trainable(abstract.params, trainable)
  train_shardings, frozen_shardings = split_trainable(shardings.params, trainable)
  return StateMemory(trainable_params=bytes_per_device(train_abstract, train_shardings),
                     frozen_params=bytes_per_device(frozen_abstract, frozen_shardings),
                     optimizer=bytes_per_device(abstract.opt_state, shardings.opt_state),
                     step=bytes_per_device(abstract.step, shardings.step),
                     moving_average=bytes_per_device(abstract.ema, shardings.ema) if abstract.ema is not None else 0)


def describe_state(memory: StateMemory, optimizer: str, devices: int) -> str:
  """One line for a run's log: the train state each device holds."""
  frozen = f" + {binary_bytes(memory.frozen_params)} frozen" if memory.frozen_params else ""
  average = f" + {binary_bytes(memory.moving_average)} moving average" if memory.moving_average else ""
  return (f"train state per device: {binary_bytes(memory.trainable_params)} trained parameters{frozen} + "
          f"{binary_bytes(memory.optimizer)} {optimizer} state{average} = {binary_bytes(memory.total)} "
          f"({devices} device{'s' if devices > 1 else ''})")


def binary_bytes(n: int) -> str:
  """`n` bytes in GiB, MiB or KiB (two decimals), or B."""
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def step_memory(compiled: CompiledStep, batch_size: int, seq_len: int) -> dict[str, int] | None:
  """XLA's account of the step per device (`executable_memory`), compiling it for an abstract batch."""
  return executable_memory(compiled.lower_abstract(batch_size, seq_len).compile())


def executable_memory(executable) -> dict[str, int] | None:
  """XLA's account of a compiled executable per device, in bytes: arguments, outputs, outputs aliased to
  (donated) arguments, temporaries, generated code, and the peak estimate; None where the backend gives none."""
  stats = executable.memory_analysis()
  if stats is None:
    return None
  out = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
         "aliased": int(stats.alias_size_in_bytes), "temporaries": int(stats.temp_size_in_bytes),
         "generated_code": int(stats.generated_code_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def device_limit(device) -> int | None:
  """The bytes XLA's allocator may use on `device` (its `memory_stats()` `bytes_limit`: on a GPU, the fraction of
  the card JAX preallocates or may grow to); None where the backend reports none (XLA:CPU)."""
  stats = getattr(device, "memory_stats", lambda: None)()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None

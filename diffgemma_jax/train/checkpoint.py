"""Orbax checkpoints of a run: parameters, optimizer state, step, and the data iterator's position.

Layout under `workdir/checkpoints/`: one directory per step (Orbax writes into a temporary directory and renames it
when complete, so a save cut short by a kill is never listed), each holding the items
  params         StandardSave of the parameters as plain nested dicts of arrays,
  opt_state      StandardSave of the optimizer state, wrappers stripped the same way,
  data_iterator  JsonSave of the grain iterator's `get_state()`,
and `run_config.json` beside them: the config of the run that wrote them, checked before a resume.
Anything saved here is readable with plain `orbax.checkpoint` (see tests/test_checkpoint.py).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffgemma_jax.model.config import ConfigError
from diffgemma_jax.train.state import TrainState, from_pure, to_pure, with_shardings

CONFIG_FILE = "run_config.json"
# Model fields that change how the network computes, not what its parameters are: a resume may change them.
RUNTIME_MODEL_FIELDS = frozenset({"dispatch", "remat", "compute_dtype", "load_balance_loss_weight",
                                  "router_z_loss_weight", "capacity_factor", "dropless", "expert_collective"})


class IncompatibleCheckpointError(ConfigError):
  """The workdir holds checkpoints of a model whose parameters differ from the config's."""


def config_to_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def model_differences(saved_model: dict[str, Any], model: dict[str, Any]) -> list[str]:
  """`model.<field>: saved -> now` for every parameter-defining field that differs.

  A field the saved config lacks (added to ModelConfig after the checkpoint was written) counts as its default.
  """
  import dataclasses
  from diffgemma_jax.model.config import ModelConfig
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  diffs = []
  for key in sorted(set(saved_model) | set(model)):
    if key in RUNTIME_MODEL_FIELDS:
      continue
    old, new = saved_model.get(key, defaults.get(key)), model.get(key)
    if isinstance(old, list):
      old = tuple(old)
    if isinstance(new, list):
      new = tuple(new)
    if old != new:
      diffs.append(f"model.{key}: {old!r} in the checkpoints, {new!r} in the config")
  return diffs


def _encode_iterator_state(state: Any) -> Any:
  if isinstance(state, bytes):  # grain's DataLoader iterators serialise themselves to JSON bytes
    return {"__bytes__": base64.b64encode(state).decode("ascii")}
  return state


def _decode_iterator_state(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return base64.b64decode(state["__bytes__"])
  return state


class Checkpointer:
  """Saves and restores a run's checkpoints in `directory`; refuses checkpoints of an incompatible model."""

  def __init__(self, directory: str, config, *, create: bool = True):
    self.directory = os.path.abspath(directory)
    self.config = config
    self.check_compatible()
    self._manager = None
    self._create = create

  # ---- compatibility ---------------------------------------------------------------------------------------------
  def saved_config(self) -> dict[str, Any] | None:
    path = os.path.join(self.directory, CONFIG_FILE)
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      return json.load(f)

  def check_compatible(self) -> None:
    saved = self.saved_config()
    if saved is None:
      return
    diffs = model_differences(saved.get("model", {}), config_to_dict(self.config.model))
    if diffs:
      raise IncompatibleCheckpointError(
          f"{self.directory} holds checkpoints of a different model; use a new --workdir or the saved config. "
          f"Differences: {'; '.join(diffs)}")

  # ---- the Orbax manager -----------------------------------------------------------------------------------------
  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      ckpt = self.config.checkpoint
      options = ocp.CheckpointManagerOptions(
          max_to_keep=int(ckpt.keep) if int(ckpt.keep) > 0 else None,
          enable_async_checkpointing=bool(ckpt.async_save),
          create=self._create,
          cleanup_tmp_directories=True)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("params", "opt_state", "data_iterator"))
    return self._manager

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (temporary directories of interrupted saves are not steps)."""
    if not os.path.isdir(self.directory):
      return None
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    return list(self.manager.all_steps())

  def save(self, state: TrainState, iterator_state: Any) -> None:
    step = int(jax.device_get(state.step))
    os.makedirs(self.directory, exist_ok=True)
    config_path = os.path.join(self.directory, CONFIG_FILE)
    if not os.path.isfile(config_path) and jax.process_index() == 0:
      with open(config_path, "w") as f:
        json.dump(config_to_dict(self.config), f, indent=2, sort_keys=True)
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(to_pure(state.params)),
        opt_state=ocp.args.StandardSave(to_pure(state.opt_state)),
        data_iterator=ocp.args.JsonSave(_encode_iterator_state(iterator_state))), force=True)

  def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, Any]:
    """The state at `step` placed in `shardings` (any mesh), and the iterator state saved with it."""
    target = with_shardings(abstract, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(to_pure(target.params)),
        opt_state=ocp.args.StandardRestore(to_pure(target.opt_state)),
        data_iterator=ocp.args.JsonRestore()))
    step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), shardings.step)
    state = TrainState(step=step_array, params=from_pure(abstract.params, restored["params"]),
                       opt_state=from_pure(abstract.opt_state, restored["opt_state"]))
    return state, _decode_iterator_state(restored["data_iterator"])

  def restore_params(self, step: int, abstract_params, param_shardings):
    """Parameters only (evaluation, or initialising a fine-tune from a pretrained checkpoint)."""
    target = with_shardings(abstract_params, param_shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(to_pure(target))))
    return from_pure(abstract_params, restored["params"])

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None

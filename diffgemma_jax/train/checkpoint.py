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
RUNTIME_MODEL_FIELDS = frozenset({"dispatch", "attention_impl", "remat", "compute_dtype", "load_balance_loss_weight",
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


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def adopt_saved_lora(config, checkpoints_dir: str):
  """For reading a run (evaluate, generate, export): when the run trained LoRA adapters and the config names none
  (the base model's config, say), the run's LoRA settings are taken from its run_config.json, so the adapters are
  restored and used. Training never does this: a resume must state what it trains. Returns a copy when it
  changes anything; the caller's config is left as it was."""
  path = os.path.join(checkpoints_dir, CONFIG_FILE)
  if int(config.model.lora_rank) or not os.path.isfile(path):
    return config
  with open(path) as f:
    saved = json.load(f).get("model", {})
  if not int(saved.get("lora_rank", 0) or 0):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key in LORA_FIELDS:
      if key in saved:
        config.model[key] = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
  return config


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
    saved_freeze = tuple(saved.get("train", {}).get("freeze", ()))
    if saved_freeze != tuple(self.config.train.freeze):  # the optimizer state covers the trainable parameters
      diffs.append(f"train.freeze: {saved_freeze!r} in the checkpoints, {tuple(self.config.train.freeze)!r} in the "
                   f"config")
    saved_objective = saved.get("objective", {}).get("name")
    if saved_objective is not None and saved_objective != self.config.objective.name:  # what the parameters mean
      diffs.append(f"objective.name: {saved_objective!r} in the checkpoints, {self.config.objective.name!r} in the "
                   f"config")
    if diffs:
      raise IncompatibleCheckpointError(
          f"{self.directory} holds checkpoints of a different model; use a new --workdir or the saved config. "
          f"Differences: {'; '.join(diffs)}")

  def check_resumable(self) -> None:
    """Training only: the saved optimizer state must have the structure this config's optimizer builds (gradient
    clipping on or off adds or removes a stage)."""
    saved = self.saved_config()
    if saved is None or "grad_clip" not in saved.get("train", {}):
      return
    clipped, clips = float(saved["train"]["grad_clip"]) > 0, float(self.config.train.grad_clip) > 0
    if clipped != clips:
      raise IncompatibleCheckpointError(
          f"{self.directory} holds an optimizer state {'with' if clipped else 'without'} gradient clipping "
          f"(train.grad_clip={saved['train']['grad_clip']!r} there, {self.config.train.grad_clip!r} in the config); "
          f"resume with clipping {'on (grad_clip > 0)' if clipped else 'off (grad_clip=0)'} or start a new --workdir")

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
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(to_pure(target.params)),
          opt_state=ocp.args.StandardRestore(to_pure(target.opt_state)),
          data_iterator=ocp.args.JsonRestore()))
    except ValueError as e:  # a tree that does not match what was saved (an optimizer built differently, say)
      raise IncompatibleCheckpointError(
          f"cannot resume from step {step} in {self.directory}: the saved state does not match this config's "
          f"model and optimizer ({str(e).splitlines()[0][:300]}); use the saved config ({CONFIG_FILE}) or a new "
          f"--workdir") from None
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


# ---- init.checkpoint: parameters only, from another run ------------------------------------------------------------
def resolve_init_checkpoint(path: str, step: int = -1) -> tuple[str, int, str]:
  """(the step directory, its step, the run directory) named by `init.checkpoint`: a workdir (its latest or
  `step`), its checkpoints/ folder, or one step folder. Anything else fails naming the key."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ConfigError(f"init.checkpoint: {path} {'is not a directory' if os.path.exists(path) else 'does not exist'}; "
                      f"give a training workdir, its checkpoints/ folder, or a step folder (e.g. "
                      f"runs/tiny/checkpoints/800)")
  if os.path.isdir(os.path.join(path, "params")):
    checkpoints = os.path.dirname(path)
    if not os.path.basename(path).isdigit():
      raise ConfigError(f"init.checkpoint: {path} is not a step folder (its name is not a step number)")
    found = int(os.path.basename(path))
    if step >= 0 and step != found:
      raise ConfigError(f"init.checkpoint names step {found} but init.step={step}; set init.step=-1")
    return path, found, os.path.dirname(checkpoints)
  checkpoints = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  steps = sorted(int(d) for d in os.listdir(checkpoints)
                 if d.isdigit() and os.path.isdir(os.path.join(checkpoints, d, "params")))
  if not steps:
    raise ConfigError(f"init.checkpoint: no complete checkpoint under {checkpoints}; train that run first or "
                      f"point at another")
  if step < 0:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"init.step={step}: no such checkpoint in {checkpoints}; available steps are {steps}")
  return os.path.join(checkpoints, str(step)), step, os.path.dirname(checkpoints)


def _path_str(path) -> str:
  """A key path as `a/0/b`: list indices and the string keys Orbax saves them under read the same."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def _flat_paths(tree) -> dict[str, Any]:
  return {_path_str(p): leaf for p, leaf in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))}


def _saved_params(step_dir: str) -> dict[str, Any]:
  """{path: shape/dtype metadata} of the parameters saved in a step folder (read from Orbax metadata only)."""
  metadata = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "params"))
  tree = getattr(metadata, "item_metadata", metadata)
  return _flat_paths(getattr(tree, "tree", tree))


def check_init_checkpoint(config, abstract_params) -> tuple[str, int, str]:
  """Compares init.checkpoint's parameter tree with the model's before anything is built or trained.

  Every model parameter must be there with its shape, except LoRA adapters (new in a fine-tune: they start fresh);
  a parameter there that the model lacks is an error too. Returns what `resolve_init_checkpoint` does.
  """
  from diffgemma_jax.model.lora import SUFFIX
  step_dir, step, run_dir = resolve_init_checkpoint(str(config.init.checkpoint), int(config.init.step))
  try:
    saved = _saved_params(step_dir)
  except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
    raise ConfigError(f"init.checkpoint: cannot read the parameters in {step_dir}: {e}") from None
  wanted = _flat_paths(to_pure(abstract_params))
  problems = []
  for path, leaf in wanted.items():
    if path not in saved:
      if not any(part.endswith(SUFFIX) for part in path.split("/")):
        problems.append(f"missing there: {path} {tuple(leaf.shape)}")
    elif tuple(saved[path].shape) != tuple(leaf.shape):
      problems.append(f"shape of {path}: {tuple(saved[path].shape)} there, {tuple(leaf.shape)} in this model")
  problems += [f"not in this model: {path} {tuple(leaf.shape)}" for path, leaf in saved.items() if path not in wanted]
  if problems:
    shown = "; ".join(problems[:12]) + (f"; ... and {len(problems) - 12} more" if len(problems) > 12 else "")
    raise IncompatibleCheckpointError(
        f"init.checkpoint: the parameters in {step_dir} do not fit this config's model ({len(problems)} "
        f"mismatch(es)): {shown}. Use the architecture that run was trained with (its run_config.json)")
  return step_dir, step, run_dir


def load_init_params(step_dir: str, params, param_shardings):
  """`params` (a freshly initialised, placed State) with every parameter the checkpoint in `step_dir` holds
  restored into its sharding; the others (LoRA adapters) keep their fresh values."""
  target_pure = to_pure(with_shardings(jax.eval_shape(lambda: params), param_shardings))
  saved_paths = set(_saved_params(step_dir))

  def keep(node, prefix=""):  # the tree restricted to the saved paths (only dict entries ever go: adapters)
    if isinstance(node, dict):
      out = {k: keep(v, f"{prefix}{k}/") for k, v in node.items()}
      return {k: v for k, v in out.items() if v is not None and v != {}}
    if isinstance(node, (list, tuple)):
      return type(node)(keep(v, f"{prefix}{i}/") for i, v in enumerate(node))
    return node if prefix[:-1] in saved_paths else None

  subset = keep(target_pure)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = _flat_paths(checkpointer.restore(os.path.join(step_dir, "params"), subset))
  current = to_pure(params)
  merged = jax.tree_util.tree_map_with_path(
      lambda p, leaf: restored.get(_path_str(p), leaf), current, is_leaf=lambda x: hasattr(x, "shape"))
  return from_pure(params, merged)

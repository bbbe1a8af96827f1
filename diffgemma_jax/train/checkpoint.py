"""Orbax checkpoints of a run: parameters, optimizer state, step, and the data iterator's position.

Layout under `workdir/checkpoints/`: one directory per step (Orbax writes into a temporary directory and renames it
when complete, so a save cut short by a kill is never listed), each holding the items
  params         StandardSave of the parameters as plain nested dicts of arrays,
  opt_state      StandardSave of the optimizer state, wrappers stripped the same way,
  data_iterator  JsonSave of the grain iterator's `get_state()`,
  ema            StandardSave of the trainable parameters' moving average (only in a run with train.ema_decay > 0),
and `run_config.json` beside them: the config of the run that wrote them, checked before a resume. A step the trainer
evaluated before saving it also holds Orbax's `metrics` item, its held-out bound (`BOUND_METRICS`): Orbax keeps the
`checkpoint.keep_best` best of those beyond the `checkpoint.keep` latest steps, and readers' `--step best` picks
the lowest (`Checkpointer.best`).
Anything saved here is readable with plain `orbax.checkpoint` (see tests/test_checkpoint.py).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError, DamagedCheckpointError, IncompatibleCheckpointError
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.parallel.distributed import barrier
from diffgemma_jax.train import ema as moving_average
from diffgemma_jax.train import integrity
from diffgemma_jax.train.state import TrainState, from_pure, to_pure, with_shardings

CONFIG_FILE = "run_config.json"
# Model fields that change how the network computes, not what its parameters are (max_positions: not even that, a
# record of the context the weights serve): a resume may change them.
RUNTIME_MODEL_FIELDS = frozenset({"dispatch", "attention_impl", "remat", "compute_dtype", "load_balance_loss_weight",
                                  "router_z_loss_weight", "capacity_factor", "dropless", "expert_collective",
                                  "max_positions"})


ITEMS = ("params", "opt_state", "data_iterator")
# What a step's `metrics` item holds (Orbax's JSON of the evaluation the trainer ran before saving it): the held-out
# bound, its standard error, the weights it evaluated ("ema" or "params", `checkpoint.weights`) and the set it is of
# (`eval.rank_by`: "" the run's own held-out split; steps saved before the key existed record none, which is "").
# The best step has the lowest `bits_per_token` among the steps recorded for the set the run ranks by.
BOUND_METRICS = ("bits_per_token", "stderr_bits_per_token", "weights", "set")
BEST = "best"  # the step value that names the best recorded step (`--step best`)
DAMAGED = ".damaged"  # the suffix of a damaged step folder a resume set aside (`aside_path`)


def bound_metrics(result: dict[str, Any] | None) -> dict[str, Any]:
  """The `metrics` item to save with a step: of its evaluation `result` (an evaluation's dict), or {} for a step
  saved without one or with a bound that is not finite (such a step is never the best one). Every save passes one:
  Orbax warns at a save without metrics once it tracks them."""
  if result is None or not math.isfinite(float(result["bits_per_token"])):
    return {}
  return {key: (str(result.get(key, "")) if key in ("weights", "set") else float(result[key]))
          for key in BOUND_METRICS}


def best_of(bounds: dict[int, dict[str, Any]]) -> tuple[int, dict[str, Any]] | None:
  """(step, its `metrics`) of the lowest bound in {step: metrics} (`Checkpointer.recorded_bounds`: of one set; of
  two equal ones, the later step), or None for no bounds."""
  if not bounds:
    return None
  step = min(bounds, key=lambda s: (_bound(bounds[s]), -s))
  return step, bounds[step]


def aside_path(directory: str, step: int, suffix: str) -> str:
  """A free name beside the steps for step folder `step` set aside: `<step><suffix>`, else `<step><suffix>-2`, ...
  (`DAMAGED` by a resume that saves the step again, rollback.SET_ASIDE by diffgemma-rollback)."""
  target, n = storage.join(directory, f"{step}{suffix}"), 1
  while epath.Path(target).exists():
    n += 1
    target = storage.join(directory, f"{step}{suffix}-{n}")
  return target


def _bound(metrics: dict[str, Any] | None, ranked_set: str | None = None) -> float:
  """A step's recorded held-out bound; infinite for a step that records none, or (`ranked_set` given) one of
  another set."""
  value = metrics.get("bits_per_token") if isinstance(metrics, dict) else None
  if ranked_set is not None and isinstance(metrics, dict) and str(metrics.get("set", "")) != ranked_set:
    return math.inf
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def _stderr(text: str) -> None:
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


def config_to_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def model_differences(saved_model: dict[str, Any], model: dict[str, Any]) -> list[str]:
  """`model.<field>: saved -> now` for every parameter-defining field that differs.

  A field the saved config lacks (added to ModelConfig after the checkpoint was written) counts as its default.
  """
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

  def __init__(self, directory: str, config=None, *, create: bool = True, log: Callable[[str], None] = _stderr):
    """`config` None: a reader that brings its own model (export); nothing is checked against the saved config.
    `create` False: a reader, which creates, cleans up and deletes nothing."""
    self.directory = storage.resolve(directory)
    self.config = config
    if config is not None:
      self.check_compatible()
    self._manager = None
    self._create = create
    self._unrecorded: list[int] = []  # saved steps whose file record is not written yet
    self.log = log

  # ---- compatibility ---------------------------------------------------------------------------------------------
  def saved_config(self) -> dict[str, Any] | None:
    path = epath.Path(os.path.join(self.directory, CONFIG_FILE))
    if not path.is_file():
      return None
    return json.loads(path.read_text())

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
    """Training only: the saved optimizer state must have the structure this config's optimizer builds (another
    optimizer, or gradient clipping on or off, changes it)."""
    saved = self.saved_config()
    saved_optimizer = (saved or {}).get("train", {}).get("optimizer", "adamw")
    if saved is not None and saved_optimizer != self.config.train.optimizer:
      raise IncompatibleCheckpointError(
          f"{self.directory} holds the state of train.optimizer={saved_optimizer!r}, not "
          f"{self.config.train.optimizer!r}; resume with that optimizer or start a new --workdir")
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
      keep = int(self.config.checkpoint.keep) if self.config is not None else 0
      keep_best = int(self.config.checkpoint.keep_best) if self.config is not None else 0
      bound = functools.partial(_bound, ranked_set=self.ranked_set)
      # The `keep` latest steps, and beyond them the `keep_best` steps of lowest recorded bound (a step without one
      # ranks last: it is kept while it is among the latest only). `best_fn` makes Orbax write the metrics a save
      # passes; the policy alone decides what is deleted.
      policy = checkpoint_managers.LatestN(n=keep if keep > 0 else None)
      if keep_best > 0:
        policy = checkpoint_managers.AnyPreservationPolicy([policy, checkpoint_managers.BestN(
            get_metric_fn=bound, reverse=True, n=keep_best, keep_checkpoints_without_metrics=False)])
      options = ocp.CheckpointManagerOptions(
          preservation_policy=policy, best_fn=bound, best_mode="min",
          enable_async_checkpointing=bool(self.config.checkpoint.async_save) if self.config is not None else False,
          create=self._create,
          # The trainer (create) removes a killed save's temporary folder; a reader must not: the folder may be a
          # save the trainer is writing now (diffgemma-eval beside a running job).
          cleanup_tmp_directories=self._create,
          temporary_path_class=storage.temporary_path_class(self.directory))
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=ITEMS + (moving_average.ITEM,))
    return self._manager

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (temporary directories of interrupted saves are not steps)."""
    if not epath.Path(self.directory).is_dir():
      return None
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    if not epath.Path(self.directory).is_dir():
      return []
    return list(self.manager.all_steps())

  @property
  def ranked_set(self) -> str | None:
    """The held-out set steps rank by (`eval.rank_by`); None for a reader without a config (recorded_bounds: the
    set of the run's latest evaluated step)."""
    return None if self.config is None else str(self.config.eval.get("rank_by", ""))

  def recorded_bounds(self) -> dict[int, dict[str, Any]]:
    """{step: its `metrics` item} of the complete steps the trainer evaluated before saving them, for the set the
    run ranks by: the config's `eval.rank_by`, or for a reader without a config the set of the latest step that
    records a bound (a run that changed eval.rank_by ranks by its latest choice). Where no step records a bound,
    those the run's metrics.jsonl logged for its steps (`logged_bounds`)."""
    steps = self.all_steps()
    bounds = {step: self.manager.metrics(step) for step in steps}
    bounds = {step: metrics for step, metrics in bounds.items() if math.isfinite(_bound(metrics))}
    if not bounds:
      return self.logged_bounds(steps)
    ranked = self.ranked_set
    if ranked is None:
      ranked = str(bounds[max(bounds)].get("set", ""))
    return {step: metrics for step, metrics in bounds.items() if math.isfinite(_bound(metrics, ranked))}

  def logged_bounds(self, steps: list[int]) -> dict[int, dict[str, Any]]:
    """{step: its bound as `metrics`, with "logged": True} of each of `steps` the run's `metrics.jsonl` (in the
    folder above this checkpoints folder) logs an evaluation of, for the ranked set (a reader without a config: the
    one the run's saved config ranks by): the bounds of a run whose steps record none (several processes evaluate
    a save step after saving it unless checkpoint.keep_best is set). The file holds the run's own history: a
    resume rewrites it through the step it resumed from."""
    from diffgemma_jax.train.logging import eval_prefix, logged_records  # (logging imports this module)
    ranked = self.ranked_set
    if ranked is None:
      ranked = str(((self.saved_config() or {}).get("eval") or {}).get("rank_by", ""))
    prefix = eval_prefix(ranked) + "/"
    complete, found = set(steps), {}
    for record in logged_records(os.path.dirname(self.directory.rstrip("/"))):
      step, value = record.get("step"), record.get(prefix + "bits_per_token")
      if step in complete and isinstance(value, (int, float)) and math.isfinite(value):  # the last logged for it
        found[step] = {"bits_per_token": float(value),
                       "stderr_bits_per_token": float(record.get(prefix + "stderr_bits_per_token", math.nan)),
                       "weights": str(record.get(eval_prefix() + "/weights", "")), "set": ranked, "logged": True}
    return found

  def best(self) -> tuple[int, dict[str, Any]] | None:
    """(step, its `metrics`) of the complete step of lowest recorded held-out bound (`best_of`), or None when no
    step records one."""
    return best_of(self.recorded_bounds())

  def save(self, state: TrainState, iterator_state: Any, evaluation: dict[str, Any] | None = None) -> None:
    """Saves `state` at its step, with the held-out bound of `evaluation` (the trainer's evaluation of this state,
    if it ran one) as the step's `metrics` item."""
    step = int(jax.device_get(state.step))
    epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
    config_path = epath.Path(os.path.join(self.directory, CONFIG_FILE))
    if not config_path.is_file() and jax.process_index() == 0:
      config_path.write_text(json.dumps(config_to_dict(self.config), indent=2, sort_keys=True))
    self._set_aside(step)
    items = dict(params=ocp.args.StandardSave(to_pure(state.params)),
                 opt_state=ocp.args.StandardSave(to_pure(state.opt_state)),
                 data_iterator=ocp.args.JsonSave(_encode_iterator_state(iterator_state)))
    if state.ema is not None:
      items[moving_average.ITEM] = ocp.args.StandardSave(to_pure(state.ema))
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=bound_metrics(evaluation), force=True)
    # Orbax's save returns once every earlier save is final; this one is final too unless it is asynchronous.
    self._unrecorded.append(step)
    self._record(keep_last=bool(self.config.checkpoint.async_save))

  def _record(self, keep_last: bool = False) -> None:
    """Writes the file record of every finished save (see `integrity`)."""
    done = self._unrecorded[:-1] if keep_last else self._unrecorded
    if jax.process_index() == 0:
      for step in done:
        integrity.record_files(os.path.join(self.directory, str(step)))
    self._unrecorded = self._unrecorded[len(done):]

  def _set_aside(self, step: int) -> None:
    """A step folder that exists already is one the resume skipped as damaged: it is renamed, never deleted,
    before the step is written again."""
    if step not in self.manager.all_steps():
      return
    target = aside_path(self.directory, step, DAMAGED)
    if jax.process_index() == 0:
      storage.rename_folder(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      barrier(f"diffgemma_set_aside_{step}")
    self.manager.reload()
    self.log(f"renamed the damaged checkpoint {step} to {os.path.basename(target)} (kept) to save step {step} again")

  # ---- restoring -------------------------------------------------------------------------------------------------
  def damage(self, step: int, items: tuple[str, ...] = ITEMS) -> str | None:
    """What is wrong with step folder `step` (naming the file), or None when it holds what was saved."""
    return integrity.damage(os.path.join(self.directory, str(step)), items)

  def has_average(self, step: int) -> bool:
    """Whether step `step` holds the parameters' moving average (saved by a run with train.ema_decay > 0)."""
    return epath.Path(os.path.join(self.directory, str(step), moving_average.ITEM)).is_dir()

  def saved_items(self, step: int) -> tuple[str, ...]:
    """The items step `step` holds: `ITEMS`, and the moving average where it was saved."""
    return ITEMS + ((moving_average.ITEM,) if self.has_average(step) else ())

  def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, Any]:
    """The state at `step` placed in `shardings` (any mesh), and the iterator state saved with it. The moving
    average is read when `abstract` has one and the step holds one; the state's `ema` is None otherwise (the
    trainer then starts it from the parameters)."""
    items = self.saved_items(step) if abstract.ema is not None else ITEMS
    problem = self.damage(step, items)
    if problem:
      raise DamagedCheckpointError(f"checkpoint {step} in {self.directory} is damaged: {problem}", step, problem)
    target = with_shardings(abstract, shardings)
    args = dict(params=ocp.args.StandardRestore(to_pure(target.params)),
                opt_state=ocp.args.StandardRestore(to_pure(target.opt_state)),
                data_iterator=ocp.args.JsonRestore())
    if moving_average.ITEM in items:
      args[moving_average.ITEM] = ocp.args.StandardRestore(to_pure(target.ema))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - tensorstore and Orbax raise many types for one unreadable file
      raise read_failure(self.directory, step, e, items) from None
    step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), shardings.step)
    state = TrainState(step=step_array, params=from_pure(abstract.params, restored["params"]),
                       opt_state=from_pure(abstract.opt_state, restored["opt_state"]),
                       ema=from_pure(abstract.ema, restored[moving_average.ITEM]) if moving_average.ITEM in items
                       else None)
    return state, _decode_iterator_state(restored["data_iterator"])

  def restore_newest(self, abstract: TrainState, shardings: TrainState) -> tuple[int, TrainState, Any]:
    """(step, state, iterator state) of the newest checkpoint that restores. A damaged one is skipped, saying so,
    and left in place (`save` renames it when the run reaches its step again)."""
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return (step,) + self.restore(step, abstract, shardings)
      except DamagedCheckpointError as e:
        skipped.append(f"step {step}: {e.problem}")
        self.log(f"skipping checkpoint {step} in {self.directory}, which is damaged ({e.problem}); resuming from "
                 f"an earlier step, the folder left as it is")
    raise DamagedCheckpointError(f"no checkpoint in {self.directory} restores ({'; '.join(skipped)}); copy the run "
                                 f"again from its source or use a new --workdir", -1, "; ".join(skipped))

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._record()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._record()
      self._manager.close()
      self._manager = None


def read_failure(directory: str, step: int, error: Exception, items: tuple[str, ...]) -> ConfigError:
  """The error to raise for a failed restore of `items` of step `step` in the checkpoints folder `directory`:
  damage when a file is missing, cut short or unreadable; else (a tree that does not match what was saved: an
  optimizer built differently, say) an incompatible checkpoint."""
  step_dir = os.path.join(directory, str(step))
  problem = integrity.damage(step_dir, items)
  if problem is None:
    account = integrity.describe_read_error(step_dir, error)
    if isinstance(error, ValueError) and not account.startswith(f"{step}/"):
      return IncompatibleCheckpointError(
          f"cannot restore step {step} in {directory}: the saved state does not match this config's "
          f"model and optimizer ({str(error).splitlines()[0][:300]}); use the saved config ({CONFIG_FILE}) or a "
          f"new --workdir")
    problem = account
  return DamagedCheckpointError(f"checkpoint {step} in {directory} is damaged: {problem}", step, problem)


def damaged_for_reader(directory: str, step: int, problem: str, available: list[int],
                       choose: Callable[[int], str] = lambda s: f"--step {s}") -> DamagedCheckpointError:
  """A reader's error for a damaged step: the file, and the intact steps it could read instead (`choose` spells
  the option that picks one)."""
  intact = [s for s in reversed(available)
            if s != step and integrity.damage(os.path.join(directory, str(s)), ("params",)) is None]
  advice = (f"use {' or '.join(choose(s) for s in intact)}" if intact else
            "no other step is intact: copy the run again from its source")
  return DamagedCheckpointError(f"checkpoint {step} in {directory} is damaged: {problem}; {advice}", step, problem)

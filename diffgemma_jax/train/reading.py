"""Reading a trained run: the one path every reader of a checkpoint takes (evaluation, generation and scoring, the
Hugging Face export, and a new run's `init.checkpoint`).

`open_run` names the run (a workdir, its checkpoints/ folder or one step folder) and picks the step (the requested
one, else the latest; a step whose parameters are damaged fails naming the file and the intact steps). The
`SavedRun` it returns restores the parameters onto the shardings the caller gives (no optimizer, no train state),
the trainable ones as their moving average where the run kept one and `checkpoint.weights` / `init.weights` allow
it (train/ema.py), and knows the run's pinned tokenizer and saved config. The trainer's own resume (parameters,
optimizer state and data position together) is `Checkpointer.restore_newest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError, IncompatibleCheckpointError
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.lora import SUFFIX as LORA_SUFFIX
from diffgemma_jax.parallel.mesh import mesh_from_config
from diffgemma_jax.parallel.placement import placement_for
from diffgemma_jax.parallel.rules import shardings_for
from diffgemma_jax.train import ema as moving_average
from diffgemma_jax.train import integrity
from diffgemma_jax.train.checkpoint import BEST, CONFIG_FILE, Checkpointer, damaged_for_reader, read_failure
from diffgemma_jax.train.history import read_history
from diffgemma_jax.train.state import evaluation_model, from_pure, to_pure, with_shardings

TOKENIZER_FILE = "tokenizer.model"  # the tokenizer the trainer pins in a run's workdir


@dataclasses.dataclass(frozen=True)
class StepKey:
  """How the user named the run and its step; errors speak in these terms."""
  run: str  # "--workdir", "init.checkpoint"
  step: str  # "--step", "init.step"
  assign: str  # between key and value: " " (a flag) or "=" (a config key)
  weights: str  # the config key choosing the weights: "checkpoint.weights", "init.weights"

  def choose(self, step: int) -> str:
    return f"{self.step}{self.assign}{step}"


WORKDIR = StepKey("--workdir", "--step", " ", "checkpoint.weights")
INIT = StepKey("init.checkpoint", "init.step", "=", "init.weights")


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """One step of a trained run, chosen by `open_run`."""
  run_dir: str  # the run's workdir (its tokenizer is pinned there)
  checkpoints: str  # the folder of step folders
  step: int
  key: StepKey = WORKDIR
  weights: str = "params"  # what restores the trainable parameters: "params", or "ema" (their moving average)
  best: bool = False  # chosen as the step of lowest recorded held-out bound (`--step best`)

  @property
  def step_dir(self) -> str:
    return os.path.join(self.checkpoints, str(self.step))

  def describe(self) -> str:
    """The step and the weights read, for a reader's report: `step 800`, `step 800 (its moving average)`, `step 600
    (the lowest recorded held-out bound, its moving average)`."""
    notes = (["the lowest recorded held-out bound"] if self.best else []) + (
        ["its moving average"] if self.weights == "ema" else [])
    return f"step {self.step}" + (f" ({', '.join(notes)})" if notes else "")

  def saved_config(self) -> dict[str, Any] | None:
    """The run's run_config.json (None for a run written without one, e.g. by an old version)."""
    path = epath.Path(os.path.join(self.checkpoints, CONFIG_FILE))
    return json.loads(path.read_text()) if path.is_file() else None

  def tokenizer(self) -> str | None:
    return pinned_tokenizer(self.run_dir)

  def saved_params(self, item: str = "params") -> dict[str, Any]:
    """{path: shape/dtype metadata} of the saved parameters (`item` "ema": of their saved moving average; Orbax
    metadata only, nothing read). Asked of the item's handler, not of a Checkpointer: that one also reads a step's
    own metadata file, which the manager writes one folder up (beside `params/`, not in it), and logs a warning
    that it is missing on every call."""
    handler = ocp.StandardCheckpointHandler()
    try:
      metadata = handler.metadata(epath.Path(os.path.join(self.step_dir, item)))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
      raise ConfigError(f"{self.key.run}: cannot read the {'moving average' if item != 'params' else 'parameters'} "
                        f"in {self.step_dir}: {e}") from None
    finally:
      handler.close()
    return flat_paths(getattr(metadata, "tree", metadata))

  def check_fits(self, abstract_params) -> None:
    """Every parameter of the model must be saved with its shape, except LoRA adapters (new in a fine-tune:
    they start fresh); a saved parameter the model lacks is an error too. Reads metadata only."""
    saved, wanted = self.saved_params(), flat_paths(to_pure(abstract_params))
    problems = []
    for path, leaf in wanted.items():
      if path not in saved:
        if not any(part.endswith(LORA_SUFFIX) for part in path.split("/")):
          problems.append(f"missing there: {path} {tuple(leaf.shape)}")
      elif tuple(saved[path].shape) != tuple(leaf.shape):
        problems.append(f"shape of {path}: {tuple(saved[path].shape)} there, {tuple(leaf.shape)} in this model")
    problems += [f"not in this model: {path} {tuple(leaf.shape)}" for path, leaf in saved.items()
                 if path not in wanted]
    if problems:
      shown = "; ".join(problems[:12]) + (f"; ... and {len(problems) - 12} more" if len(problems) > 12 else "")
      raise IncompatibleCheckpointError(
          f"{self.key.run}: the parameters in {self.step_dir} do not fit this config's model ({len(problems)} "
          f"mismatch(es)): {shown}. Use the architecture that run was trained with (its {CONFIG_FILE})")

  def restore_pure_params(self, target):
    """The saved parameters (nested dicts of arrays) in `target`'s shapes, dtypes and shardings. `target` may
    leave out saved parameters, not add any. Reading the moving average (`weights` "ema"), the parameters it
    covers (the trainable ones) come from it, cast to `target`'s dtypes, and only the others from `params`."""
    if self.weights != "ema":
      return self._restore_item("params", target)
    wanted = flat_paths(target)
    averaged = set(self.saved_params(moving_average.ITEM)) & set(wanted)
    restored = {}
    for item, paths in (("params", set(wanted) - averaged), (moving_average.ITEM, averaged)):
      if paths:
        restored.update(flat_paths(self._restore_item(item, _only(target, paths))))
    return jax.tree_util.tree_map_with_path(lambda p, _: restored[path_str(p)], target,
                                            is_leaf=lambda x: hasattr(x, "shape"))

  def _restore_item(self, item: str, target):
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(self.step_dir, item), target)
    except Exception as e:  # noqa: BLE001 - tensorstore and Orbax raise many types for one unreadable file
      failure = read_failure(self.checkpoints, self.step, e, (item,))
      if not isinstance(failure, IncompatibleCheckpointError):
        failure = damaged_for_reader(self.checkpoints, self.step, failure.problem, saved_steps(self.checkpoints),
                                     self.key.choose)
      raise failure from None

  def restore_params(self, abstract_params, shardings, *, fresh=None):
    """The parameters placed in `shardings` (any mesh). Given `fresh` (initialised parameters in those
    shardings), the parameters the checkpoint lacks (LoRA adapters of a fine-tune) keep their fresh values."""
    target = to_pure(with_shardings(abstract_params, shardings))
    if fresh is None:
      return from_pure(abstract_params, self.restore_pure_params(target))
    saved = set(self.saved_params())
    restored = flat_paths(self.restore_pure_params(_only(target, saved)))
    merged = jax.tree_util.tree_map_with_path(lambda p, leaf: restored.get(path_str(p), leaf), to_pure(fresh),
                                              is_leaf=lambda x: hasattr(x, "shape"))
    return from_pure(fresh, merged)


def pinned_tokenizer(run_dir: str) -> str | None:
  """The tokenizer the run in `run_dir` was trained with (a local copy of the one the trainer pinned in its
  workdir), or None when it pinned none (imported weights, say)."""
  pinned = storage.join(run_dir, TOKENIZER_FILE)
  return storage.local_file(pinned) if storage.open_path(pinned).is_file() else None


def _only(tree, paths: set[str], prefix: str = ""):
  """`tree` restricted to `paths` (only dict entries are ever left out: the adapters)."""
  if isinstance(tree, dict):
    kept = {k: _only(v, paths, f"{prefix}{k}/") for k, v in tree.items()}
    return {k: v for k, v in kept.items() if v is not None and v != {}}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_only(v, paths, f"{prefix}{i}/") for i, v in enumerate(tree))
  return tree if prefix[:-1] in paths else None


def path_str(path) -> str:
  """A key path as `a/0/b`: list indices and the string keys Orbax saves them under read the same."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def flat_paths(tree) -> dict[str, Any]:
  return {path_str(p): leaf for p, leaf in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))}


def parse_step(value, option: str) -> int | str | None:
  """A reader's step as given (`option` names where, for the error): None (the latest), a step number >= 0, or
  "best" (the step of lowest recorded held-out bound)."""
  if value is None:
    return None
  from diffgemma_jax.config import step_choice
  step = step_choice(value)
  if step is None or step in (-1, "latest"):
    raise ConfigError(f"{option} {value}: give a checkpoint step (a number >= 0) or 'best' (the step of lowest "
                      f"recorded held-out bound)")
  return step


def best_recorded_step(checkpoints: str, key: StepKey = WORKDIR, reader: Checkpointer | None = None) -> int:
  """The step of lowest held-out bound among those the trainer evaluated (`Checkpointer.best`: recorded with the
  steps, else logged in the run's metrics.jsonl);
  an error naming `key`'s step option when no complete step records one. `reader`: a reader of `checkpoints`
  already open (else one is opened and closed)."""
  own = reader is None
  reader = Checkpointer(checkpoints, create=False) if own else reader
  try:
    best = reader.best()
  finally:
    if own:
      reader.close()
  if best is None:
    raise ConfigError(f"{key.choose(BEST)}: no checkpoint in {checkpoints} records a held-out bound, and the run's "
                      f"metrics.jsonl logs no evaluation of one (the trainer evaluates the saves eval.every_steps "
                      f"falls on, and every save with checkpoint.keep_best > 0); give a step number")
  return best[0]


def saved_steps(checkpoints: str) -> list[int]:
  """The complete steps in a checkpoints folder, ascending (interrupted saves are not steps)."""
  reader = Checkpointer(checkpoints, create=False)
  try:
    return sorted(reader.all_steps())
  finally:
    reader.close()


def check_workdir(workdir: str, *, reading: bool) -> None:
  """`--workdir` must be a directory; a run that is only read (eval, generate, export) must exist already."""
  storage.check_not_mistyped_url(workdir, "--workdir")
  storage.check_reachable(workdir, "--workdir")
  path = epath.Path(storage.resolve(workdir))
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; give the run's directory")
  if reading and not path.is_dir():
    raise ConfigError(f"--workdir {workdir} does not exist; give the directory of a trained run (diffgemma-train "
                      f"--workdir {workdir} creates it)")
  if not reading and not storage.is_url(workdir):
    storage.check_local_folder(str(path), "--workdir")


def _locate(path: str, step: int | str | None, key: StepKey) -> tuple[str, str, int | str | None]:
  """(run directory, checkpoints folder, the step a step folder fixes or `step`) of what `path` names."""
  if key is WORKDIR:
    check_workdir(path, reading=True)
    return path, storage.join(storage.resolve(path), "checkpoints"), step
  path = storage.resolve(path)
  storage.check_reachable(path, f"{key.run}:")
  if not epath.Path(path).is_dir():
    raise ConfigError(f"{key.run}: {path} {'is not a directory' if epath.Path(path).exists() else 'does not exist'}; "
                      f"give a training workdir, its checkpoints/ folder, or a step folder (e.g. "
                      f"runs/tiny/checkpoints/800)")
  if epath.Path(path, "params").is_dir():
    if not os.path.basename(path).isdigit():
      raise ConfigError(f"{key.run}: {path} is not a step folder (its name is not a step number)")
    found = int(os.path.basename(path))
    if step is not None and step != found:
      raise ConfigError(f"{key.run} names step {found} but {key.choose(step)}; set {key.choose(-1)}")
    return os.path.dirname(os.path.dirname(path)), os.path.dirname(path), found
  checkpoints = os.path.join(path, "checkpoints") if epath.Path(path, "checkpoints").is_dir() else path
  return os.path.dirname(checkpoints), checkpoints, step


def open_run(path: str, step: int | str | None = None, *, config=None, key: StepKey = WORKDIR,
             weights: str = "params") -> SavedRun:
  """The run `path` names at `step` (None: the latest complete one; "best": the one of lowest recorded held-out
  bound, `best_recorded_step`). `key` WORKDIR: `path` is a workdir given as
  --workdir; INIT: a workdir, its checkpoints/ folder or a step folder given as init.checkpoint. With `config`,
  a run of a different model is refused (`Checkpointer.check_compatible`). `weights` (train/ema.WEIGHTS; the
  value of `key.weights`): "auto" reads the parameters' moving average where the step holds one, "ema" requires
  it, "params" reads the trained parameters."""
  run_dir, checkpoints, step = _locate(path, step, key)
  reader = Checkpointer(checkpoints, config, create=False)  # with `config`, checks the saved config against it
  try:  # one reader (one listing of the steps and their recorded bounds) for the steps and the best
    available = sorted(reader.all_steps())
    if not available:
      raise ConfigError(f"no complete checkpoint in {checkpoints}; train first (diffgemma-train --workdir "
                        f"{run_dir})" if key is WORKDIR else
                        f"{key.run}: no complete checkpoint under {checkpoints}; train that run first or point at "
                        f"another")
    best = step == BEST
    if best:
      step = best_recorded_step(checkpoints, key, reader)
  finally:
    reader.close()
  if step is None:
    step = available[-1]
  elif step not in available:
    raise ConfigError(f"{key.choose(step)}: no such checkpoint in {checkpoints}; available steps are {available}")
  averaged = epath.Path(os.path.join(checkpoints, str(step), moving_average.ITEM)).is_dir()
  if weights == "ema" and not averaged:
    raise ConfigError(f"{key.weights}=ema: step {step} in {checkpoints} holds no moving average of its parameters "
                      f"(its run trained with train.ema_decay=0); set {key.weights}=params or auto")
  chosen = "ema" if averaged and weights != "params" else "params"
  problem = integrity.damage(os.path.join(checkpoints, str(step)),
                             ("params", moving_average.ITEM) if chosen == "ema" else ("params",))
  if problem:
    raise damaged_for_reader(checkpoints, step, problem, available, key.choose)
  return SavedRun(run_dir=run_dir, checkpoints=checkpoints, step=step, key=key, weights=chosen, best=best)


def run_steps(path: str, key: StepKey = WORKDIR) -> list[int]:
  """The complete steps, ascending, of the run `path` names as `key` says (a step folder: its own step)."""
  _, checkpoints, fixed = _locate(path, None, key)
  return [fixed] if fixed is not None else saved_steps(checkpoints)


def open_init_checkpoint(config) -> SavedRun:
  """The run and step `init.checkpoint` / `init.step` (-1 or "latest": the latest; "best": the lowest recorded
  held-out bound) name."""
  from diffgemma_jax.config import step_value
  step = step_value(config.init.step, "init.step")
  step = None if step in (-1, "latest") else step
  return open_run(str(config.init.checkpoint), step, key=INIT, weights=str(config.init.weights))


def read_run(config, workdir: str, step: int | str | None = None) -> tuple[Any, SavedRun]:
  """(the config to read it with, the run): the run in `workdir` at `step` for a reader holding `config`. The
  run's LoRA settings are adopted first (`adopt_saved_lora`), then a run of another model is refused."""
  check_workdir(workdir, reading=True)
  config = adopt_saved_lora(config, storage.join(storage.resolve(workdir), "checkpoints"))
  return config, open_run(workdir, step, config=config, weights=str(config.checkpoint.weights))


def restore_model(config, workdir: str, step: int | str | None = None):
  """(model, step): the denoiser with the parameters of `step` (default: the latest complete checkpoint) of the
  run in `workdir`, placed on the config's mesh and built for it, dispatching its experts dropless (the generation
  and scoring readers; the scorer checks its own mesh against the objective's rows, `scoring.Scorer`). The
  trainable parameters are their moving average where the step holds one, unless `checkpoint.weights=params`."""
  model, run = restore_model_run(config, workdir, step)
  return model, run.step


def restore_model_run(config, workdir: str, step: int | str | None = None):
  """(model, the `SavedRun` it was read from: its step and `weights`), as `restore_model`."""
  config, run = read_run(config, workdir, step)
  # no evaluation batch to check: generation has none, and the scorer checks its own (--batch_size)
  mesh = mesh_from_config(config, training=False, objective_rows=False, check_eval_batch=False)
  # Built for the mesh, as the trainer's model: the experts dispatch on their shards, the table's uses from its
  # slices, the fused kernels per shard (`parallel/placement.py`). Dropless: a reader's expert-parallel dispatch
  # never drops a token at a full buffer, so a sample or a score is the model's function on any mesh.
  graphdef, abstract = evaluation_model(ModelConfig.from_config_dict(config.model), placement_for(mesh, config))
  params = run.restore_params(abstract, shardings_for(abstract, mesh))
  return nnx.merge(graphdef, params), run


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def adopt_saved_lora(config, checkpoints_dir: str):
  """For reading a run (evaluate, generate, export): when the run trained LoRA adapters and the config names none
  (the base model's config, say), the run's LoRA settings are taken from its run_config.json, so the adapters are
  restored and used. Training never does this: a resume must state what it trains. Returns a copy when it
  changes anything; the caller's config is left as it was."""
  path = os.path.join(checkpoints_dir, CONFIG_FILE)
  if int(config.model.lora_rank) or not epath.Path(path).is_file():
    return config
  saved = json.loads(epath.Path(path).read_text()).get("model", {})
  if not int(saved.get("lora_rank", 0) or 0):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key in LORA_FIELDS:
      if key in saved:
        config.model[key] = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
  return config


def saved_context(saved: dict[str, Any] | None) -> int:
  """The context, in positions, a run's saved config (run_config.json as a dict) says its weights serve: the larger
  of its model.max_positions and its train.seq_len (a config saved before model.max_positions existed counts as 0
  there). 0 for a run saved without a config."""
  if not saved:
    return 0
  recorded = int(saved.get("model", {}).get("max_positions", 0) or 0)
  return max(recorded, int(saved.get("train", {}).get("seq_len", 0) or 0))


def trained_context(config, workdir: str) -> int:
  """What the Hugging Face export writes as max_position_embeddings for the run in `workdir`, read with `config`:
  the longest context its weights serve, the largest of the config's model.max_positions, the run's saved ones (an
  imported checkpoint's max_position_embeddings, or what the run's init.checkpoint served) and the rows it trained
  on: the train.seq_len of its run_config.json and of every start in its run history (a resume may train longer
  rows); the config's only for a run that kept neither."""
  path = epath.Path(os.path.join(workdir, "checkpoints", CONFIG_FILE))
  saved = [json.loads(path.read_text())] if path.is_file() else []
  saved += [record.get("config") for record in read_history(workdir)]
  recorded = max((saved_context(s) for s in saved), default=0)
  return max(int(config.model.max_positions), recorded or int(config.train.seq_len))


def inherit_context(config, init_run: SavedRun):
  """A fine-tune's config records the context its init.checkpoint's weights serve (`saved_context`) as
  model.max_positions when that is larger than the config's, so that an export of the fine-tune writes the base's
  context rather than the fine-tune's shorter rows. Returns (the config, a copy when changed; the context adopted or
  None)."""
  context = saved_context(init_run.saved_config())
  if context <= int(config.model.max_positions):
    return config, None
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.max_positions = context
  return config, context

"""The run config schema: one ConfigDict with every key a run may set, and its loading and validation.

Recipes in `configs/` start from `base_config()` and change values; they never add keys, so this function is the
single schema. Locked ConfigDicts reject unknown keys; `load_config` turns that into an error naming the key and
the valid ones.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import os
import re
from typing import Any

import ml_collections

from data_recipes import HELDOUT_SOURCE_RECIPES, RECIPES, SFT_RECIPES, SOURCE_RECIPES
from diffgemma_jax.compile_cache import check_compilation_config
from diffgemma_jax.data.mixture import parse_heldout_sets, parse_mixture
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model.config import ModelConfig, model_config_dict
from diffgemma_jax.objectives import OBJECTIVES, objectives_with
from diffgemma_jax.storage import check_not_mistyped_url
from diffgemma_jax.train.ema import WEIGHTS
from diffgemma_jax.train.freeze import FREEZE_GROUPS, FROZEN_DTYPES
from diffgemma_jax.train.optimizer import ADAM_MU_DTYPES, OPTIMIZERS, SCHEDULES, schedule_horizon
from diffgemma_jax.train.profiling import check_profile_steps


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_config_dict()

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "masked"  # masked | ar | block | uniform
  c.objective.eps = 1e-3  # smallest noise level t; the bound integrates t over [eps, 1]
  c.objective.block_size = 16  # block and uniform: tokens per block (canvas); must divide train.seq_len
  c.objective.encoder_loss_weight = 1.0  # uniform: weight of the clean encoder's next-token loss
  c.objective.self_cond_prob = 0.5  # uniform with model.self_conditioning: fraction of rows self-conditioned

  c.data = ml_collections.ConfigDict()
  # Pretraining: python_stdlib | python_packages | shakespeare | text_files. SFT (prompt/response rows): python_docstrings | jsonl.
  c.data.recipe = "python_stdlib"
  c.data.dir = ""  # dataset directory; empty: data/<recipe>-v<vocab_size> under the current directory
  # where a data.dir in a bucket (gs://, s3://) is copied to be read, and evaluation sets (diffgemma-eval --heldout,
  # eval.heldout_sets) are built (eval-sets/); empty: ~/.cache/diffgemma-jax/datasets
  c.data.cache_dir = ""
  # size cap of data.cache_dir in GiB: after a fetch or an evaluation set's use, the least recently used dataset
  # copies and evaluation sets (never one this process reads) are deleted until the cache fits; 0: unlimited
  c.data.cache_max_gb = 0.0
  # a data.dir (or mixture dataset) in a bucket: read the token shards' rows there, a batch's ranges in one
  # concurrent request, instead of copying them into data.cache_dir (which then gets the small files only: manifest,
  # tokenizer, document starts, counts); use data.num_workers > 0 to hide the requests' latency
  c.data.stream_tokens = False
  # a job of several processes building a pretraining dataset: each builds its share of the corpus (every process
  # must read the sources: a shared filesystem or a bucket); False: process 0 builds it alone while the others wait
  # (sources on process 0's disk only), then every process reads it
  c.data.build_on_every_process = True
  # text_files: a folder, glob or comma-separated list of text, JSONL(.gz/.zst), Parquet or ArrayRecord files;
  # jsonl: a JSONL file, directory or glob
  c.data.source = ""
  # text_files and eval.heldout_sets: the field (JSONL) or column (Parquet) holding a record's text
  c.data.text_field = "text"
  # Pretraining on several built datasets: "DIR:WEIGHT,DIR:WEIGHT" (e.g. "data/code:0.7,data/prose:0.3"); rows
  # are drawn by weight and the held-out bound is reported per dataset and weighted. Replaces recipe/source/dir.
  c.data.mixture = ""
  c.data.build_workers = 0  # processes that tokenise a pretraining corpus; 0: every core
  c.data.tokenizer_sample_lines = 120_000  # lines of the uniform document sample a new tokenizer is trained on
  # jsonl, text_files: the held-out files (a standard validation set); empty: a hashed share of the source. text_files
  # with it alone: an evaluation set (every document held out, no training split; needs data.tokenizer)
  c.data.heldout_source = ""
  # An existing sentencepiece model to use instead of training one (e.g. Gemma's tokenizer.model). SFT recipes
  # with this empty use the tokenizer of init.checkpoint's run.
  c.data.tokenizer = ""
  # SFT: gemma (<start_of_turn>role ... <end_of_turn>) | diffusiongemma (the release's <|turn>role ... <turn|>) |
  # plain (text as it is)
  c.data.chat_template = "gemma"
  # SFT: several examples per training row, each its own segment, responses EOS-padded to whole canvases (one EOS
  # for objectives without canvases); False: one example per row, EOS-padded to the row. Held-out rows stay one
  # per row.
  c.data.sft_packing = False
  c.data.max_bad_lines = 10  # jsonl, text_files: malformed records skipped (each reported) before the build fails
  c.data.seed = 0
  c.data.num_workers = 0  # grain worker processes that read and batch training rows (with prefetch); 0: none

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 200
  c.train.batch_size = 8
  c.train.seq_len = 128
  c.train.optimizer = "adamw"  # adamw | adafactor (factored second moments; train/optimizer.py)
  c.train.learning_rate = 3e-3
  # cosine | linear | constant | wsd (warmup-stable-decay) | wsd_time (its decay placed by train.max_runtime_s)
  c.train.lr_schedule = "cosine"
  c.train.warmup_steps = 20
  c.train.schedule_steps = 0  # where cosine/linear reach their floor and wsd ends its decay; 0: train.num_steps
  c.train.decay_steps = 0  # wsd: length of the final decay phase (> 0)
  c.train.decay_fraction = 0.2  # wsd_time: the share of the time budget (or of num_steps, the cap) spent decaying
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  # AdamW's first moment: "" keeps it in the parameters' dtype; "bfloat16" halves it for float32 parameters (the
  # state 1.5x the parameters' bytes instead of 2x). The second moment keeps the parameters' dtype.
  c.train.adam_mu_dtype = ""
  c.train.grad_clip = 1.0
  c.train.grad_accum_steps = 1
  c.train.seed = 0
  c.train.log_every_steps = 10
  # Wall-clock budget of one invocation in seconds, counted from its start (data, compilation and evaluations
  # included; 0: none). Once spent, no new step starts: the step reached is checkpointed and evaluated, and the
  # same command resumes from it (with a fresh budget).
  c.train.max_runtime_s = 0.0
  # Early stopping (train/early_stop.py): after this many held-out evaluations in a row without a bound lower than
  # the best so far by more than early_stop_min_delta bits/token, the step reached is saved and the run stops (the
  # count runs across resumes; 0: never). Needs evaluations during the run (eval.every_steps, or keep_best).
  c.train.early_stop_patience = 0
  c.train.early_stop_min_delta = 0.0
  c.train.peak_flops_per_device = 0.0  # for the MFU estimate; 0: a table value for the device kind
  c.train.debug_nan_at_step = -1  # test hook: the update producing this step gets a NaN loss
  # (first, last): a jax.profiler trace of these steps in <workdir>/tb/plugins/profile/; () for none.
  c.train.profile_steps = ()
  # Parameter groups kept fixed (no gradient, no optimizer state): router, experts, attention, mlp, embedder,
  # norms, self_conditioning. With model.lora_rank > 0 everything but the LoRA adapters is frozen anyway.
  c.train.freeze = ()
  # The frozen parameters' dtype ("": as built, the model's param_dtype; "bfloat16" halves them). Lossless for
  # weights that bfloat16 holds exactly, such as a bfloat16 release imported to float32 (the layers cast every
  # weight to the compute dtype where they use it); needs frozen parameters (train.freeze or LoRA).
  c.train.frozen_dtype = ""
  # A moving average of the trained parameters (train/ema.py), saved with each checkpoint; 0: none. MDLM and BD3-LM
  # train with 0.9999 (the average's horizon, about 1 / (1 - decay) updates, should be a small part of the run).
  # Readers (evaluation, generation, scoring, export, init.checkpoint) take it by default: checkpoint.weights.
  c.train.ema_decay = 0.0

  # Fine-tuning: start from another run's parameters (fresh optimizer, step 0). A workdir (its latest checkpoint),
  # its checkpoints/ folder, or one step folder; a run that already has checkpoints of its own resumes from them.
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ""
  # the step there: a number, "latest" (or -1) or "best" (the step of lowest recorded held-out bound: --step best)
  c.init.step = ml_collections.FieldReference(-1, field_type=object)
  c.init.weights = "auto"  # auto (the moving average where that step has one) | ema | params: checkpoint.weights

  # Logs beyond TensorBoard and metrics.jsonl: a Weights & Biases run (the optional `wandb` package) when
  # wandb_project is set.
  c.log = ml_collections.ConfigDict()
  c.log.wandb_project = ""
  c.log.wandb_entity = ""  # empty: wandb's default
  c.log.wandb_mode = ""  # online | offline | disabled; empty: wandb's default ($WANDB_MODE)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 3
  # Beyond the `keep` latest: the steps of lowest held-out bound kept (0: none). Every save is then evaluated first;
  # a step the trainer evaluated records its bound (Orbax's `metrics` item), and readers' `--step best` reads the
  # lowest.
  c.checkpoint.keep_best = 0
  c.checkpoint.async_save = True
  # Which weights the readers of a checkpoint take (diffgemma-eval, -generate, -score, -lm-eval, -export) and the
  # trainer evaluates: auto (the parameters' moving average where the step has one, train.ema_decay > 0; else the
  # parameters) | ema (the average; a step without one is an error) | params (the trained parameters).
  c.checkpoint.weights = "auto"

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 100
  c.eval.num_t_samples = 8
  c.eval.batch_size = 8
  c.eval.max_sequences = 64  # 0: the whole held-out split
  c.eval.seed = 0
  # More held-out sets the trainer evaluates beside its own at every evaluation, each logged as eval/NAME/...:
  # "NAME=FILES; NAME2=FILES2", FILES in data.source's forms (files, folders, globs, bucket URLs, comma-separated),
  # each tokenised with the run's tokenizer into an evaluation set (diffgemma-eval --heldout's) of its documents;
  # eval.max_sequences rows of each.
  c.eval.heldout_sets = ""
  # The held-out set early stopping, checkpoint.keep_best and readers' --step best rank steps by: "" the run's own
  # held-out split, or the NAME of one of eval.heldout_sets (a standard validation set, say). Each checkpoint records
  # the set its bound is of; steps recorded for another set do not rank.
  c.eval.rank_by = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1, 1)  # data x fsdp x expert x tensor; -1 in one place: the remaining devices
  c.mesh.axes = ("data", "fsdp", "expert", "tensor")
  # Multi-host: how many hosts (TPU: slices) each axis spans over the slow network; mesh.shape is then the part of
  # the mesh inside one host and the mesh is their product (README "Multi-device and multi-host training").
  c.mesh.dcn_shape = ()
  # With a `context` axis: run causal rows (the AR baseline, the block objectives' [canvas ; clean]) in the
  # load-balanced order, each context shard holding an early and a late chunk of the row, so every shard has the same
  # attention work (docs/attention.md "On a mesh"). Exact: same logits and losses; bidirectional rows never reorder.
  c.mesh.context_load_balance = True

  # Multi-process runs (README "Multi-device and multi-host training"): empty/negative values fall back to
  # $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, then to a cluster JAX detects (SLURM, Open MPI,
  # Kubernetes, Cloud TPU; parallel/distributed.py); none of them: one process.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  c.distributed.initialization_timeout_s = 300  # a process that cannot reach the coordinator fails after this
  # A process that stops sending heartbeats (killed, crashed, its host or network gone) ends every other process
  # after this many seconds (JAX's default: 100); process 0's own death ends the others at once (its coordinator
  # closes). Heartbeats come from a thread of JAX's runtime: a busy or hung process keeps sending them
  c.distributed.heartbeat_timeout_s = 100

  # JAX's persistent compilation cache (README "Compilation cache"): compiled programs kept in a local folder or a
  # bucket (gs://, s3://) and read back by every later process compiling the same program (a restart after a
  # preemption, an evaluation of the same model), instead of compiling it again; one folder serves any number of
  # runs. Empty: none.
  c.compilation = ml_collections.ConfigDict()
  c.compilation.cache_dir = ""
  c.compilation.min_compile_time_s = 1.0  # programs compiled faster than this are not kept; 0: every program
  # A local folder's size limit in GB: past it the least recently used programs are deleted as new ones are written.
  # 0: no limit (a bucket takes 0 only: give it an object lifecycle rule instead).
  c.compilation.max_size_gb = 0.0
  return c


def _load_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  if not path.endswith(".py"):
    raise ConfigError(f"config file {path!r} is not a Python file: give a .py file that defines get_config() "
                      f"(configs/ holds examples)")
  spec = importlib.util.spec_from_file_location(f"_diffgemma_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except (the user's code: its error, where it happened, one line)
    raise ConfigError(f"config file {path!r} cannot be loaded: {_user_error(e, path)}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  return module


def _user_error(error: Exception, path: str) -> str:
  """'line N: Type: message' of an error raised by the config file `path`'s code: N the last line of the file it
  passed through (a SyntaxError: its own), the message's first line."""
  if isinstance(error, SyntaxError):
    lines, message = [error.lineno] if error.lineno else [], error.msg
  else:
    import traceback
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(path)]
    message = str(error).splitlines()[0] if str(error) else ""
  return (f"line {lines[-1]}: " if lines else "") + f"{type(error).__name__}: {message}"


def sibling_config(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of recipe `name` beside `config_file` (a recipe that is another recipe with a few changes)."""
  module = _load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))
  return module.get_config(arg) if arg else module.get_config()


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      valid = ", ".join(f"{prefix}{k}" for k in schema.keys())
      raise ConfigError(f"unknown config key {name!r}; valid keys here are: {valid}")
    if isinstance(schema[key], ml_collections.ConfigDict) != isinstance(config[key], ml_collections.ConfigDict):
      raise ConfigError(f"config key {name!r} must be {'a section' if isinstance(schema[key], ml_collections.ConfigDict) else 'a value'}")
    if isinstance(schema[key], ml_collections.ConfigDict):
      _check_keys(config[key], schema[key], name + ".")
    elif name in STEP_KEYS:
      step_value(config[key], name)
    elif not _same_kind(config[key], schema[key]):
      raise ConfigError(f"config key {name!r}: expected {_kind(schema[key])} (like its default {schema[key]!r}), "
                        f"got {config[key]!r}")


def _kind(reference: Any) -> str:
  if isinstance(reference, bool):
    return "a boolean"
  if isinstance(reference, int):
    return "an integer"
  if isinstance(reference, float):
    return "a number"
  if isinstance(reference, str):
    return "a string"
  if isinstance(reference, (tuple, list)):
    return "a tuple"
  return type(reference).__name__


def _same_kind(value: Any, reference: Any) -> bool:
  """Whether `value` may stand where the schema has `reference` (an int where a float is expected, say)."""
  if reference is None:
    return True
  if isinstance(reference, bool) or isinstance(value, bool):
    return isinstance(reference, bool) and isinstance(value, bool)
  if isinstance(reference, int):
    return isinstance(value, int)
  if isinstance(reference, float):
    return isinstance(value, (int, float))
  if isinstance(reference, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(reference))


def parse_value(text: str, current: Any) -> Any:
  """Parses an override string into the type of the current value."""
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(current, str):
    return text
  value = ast.literal_eval(text)
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


# Keys that name a checkpoint step the way a reader's --step does: a number, "latest" (also -1) or "best".
STEP_KEYS = ("init.step",)


def step_choice(value: Any) -> int | str | None:
  """A step as written (a number or its text, "latest", "best") as a step number >= -1 (-1: the latest),
  "latest" or "best"; None for anything else. Config step keys (`step_value`) and the readers' --step
  (`reading.parse_step`, which takes neither -1 nor "latest") read it."""
  if isinstance(value, str):
    text = value.strip()
    if text in ("latest", "best"):
      return text
    value = int(text) if re.fullmatch(r"-?\d+", text) else None
  if isinstance(value, bool) or not isinstance(value, int) or value < -1:
    return None
  return value


def step_value(value: Any, key: str) -> int | str:
  """The value of a step key (STEP_KEYS), `step_choice`'s; a ConfigError naming `key` for anything else."""
  step = step_choice(value)
  if step is None:
    raise ConfigError(f"config key {key!r}: give a checkpoint step (a number >= 0), 'latest' (or -1) or 'best' "
                      f"(the step of lowest recorded held-out bound)")
  return step


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  """Applies `{"train.num_steps": "10"}` style overrides; an unknown key fails naming the valid ones."""
  for dotted, text in overrides.items():
    node = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        prefix = ".".join(parts[:i])
        valid = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in node.keys()) if isinstance(
            node, ml_collections.ConfigDict) else "(none: not a section)"
        raise ConfigError(f"unknown config key {dotted!r}; valid keys there are: {valid}")
      if i < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    if dotted in STEP_KEYS:
      with node.unlocked():
        node[parts[-1]] = step_value(text, dotted)
      continue
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"config key {dotted!r} is a section, not a value; set one of its keys "
                        f"({', '.join(f'{dotted}.{k}' for k in current.keys())})")
    try:
      value = parse_value(text, current)
    except (ValueError, SyntaxError) as e:
      detail = {bool: str(e), tuple: "write a Python tuple, strings quoted: ('a', 'b')"}.get(
          type(current), "not a Python literal")
      raise ConfigError(f"config key {dotted!r}: cannot parse {text!r} as {_kind(current)} (like its current value "
                        f"{current!r}): {detail}") from None
    if not _same_kind(value, current):
      raise ConfigError(f"config key {dotted!r}: expected {_kind(current)} (like its current value {current!r}), "
                        f"got {text!r}")
    with node.unlocked():
      node[parts[-1]] = value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a whole run config against the schema and the model's own rules."""
  schema = base_config()  # the keys, and the defaults a setting an objective or recipe ignores is compared with
  _check_keys(config, schema)
  ModelConfig.from_config_dict(config.model)
  if config.objective.name not in OBJECTIVES:
    raise ConfigError(f"objective.name: unknown objective {config.objective.name!r}; valid are {tuple(OBJECTIVES)}")
  if not 0.0 < config.objective.eps < 1.0:
    raise ConfigError(f"objective.eps: must lie in (0, 1), got {config.objective.eps}")
  _validate_block_objective(config, schema.objective)
  for key in ("num_steps", "batch_size", "seq_len", "grad_accum_steps"):
    if int(config.train[key]) <= 0:
      raise ConfigError(f"train.{key}: must be a positive integer, got {config.train[key]!r}")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps={config.train.grad_accum_steps} must divide "
                      f"train.batch_size={config.train.batch_size}")
  _validate_optimizer(config.train)
  check_profile_steps(config.train.profile_steps)
  check_compilation_config(config.compilation)
  for key, minimum in (("eval.num_t_samples", 1), ("eval.batch_size", 1), ("eval.max_sequences", 0),
                       ("eval.every_steps", 0), ("checkpoint.every_steps", 1), ("checkpoint.keep", 0),
                       ("checkpoint.keep_best", 0), ("train.early_stop_patience", 0),
                       ("train.log_every_steps", 1), ("train.warmup_steps", 0)):
    section, name = key.split(".")
    if int(config[section][name]) < minimum:
      meaning = {"eval.max_sequences": " (0: the whole held-out split)", "eval.every_steps": " (0: at the end only)",
                 "checkpoint.keep": " (0: keep every checkpoint)",
                 "checkpoint.keep_best": " (0: only the checkpoint.keep latest)"}.get(key, "")
      raise ConfigError(f"{key}: must be >= {minimum}{meaning}, got {config[section][name]!r}")
  if not float(config.train.early_stop_min_delta) >= 0:
    raise ConfigError(f"train.early_stop_min_delta: must be >= 0 bits/token, got {config.train.early_stop_min_delta}")
  sets = parse_heldout_sets(str(config.eval.heldout_sets))  # its errors name the key
  for _, files in sets:
    for part in files.split(","):
      check_not_mistyped_url(part.strip(), "eval.heldout_sets")
  rank_by = str(config.eval.rank_by)
  if rank_by and rank_by not in [name for name, _ in sets]:
    named = ", ".join(name for name, _ in sets) or "none: eval.heldout_sets is empty"
    raise ConfigError(f"eval.rank_by={rank_by!r} is not a set of eval.heldout_sets ({named}); '' ranks steps by the "
                      "run's own held-out split")
  if int(config.train.early_stop_patience) and not (int(config.eval.every_steps) or int(config.checkpoint.keep_best)):
    raise ConfigError(f"train.early_stop_patience={config.train.early_stop_patience} counts held-out evaluations, "
                      f"but this run evaluates at its end only: set eval.every_steps (or checkpoint.keep_best, which "
                      f"evaluates every save)")
  for group in tuple(config.train.freeze):
    if group not in FREEZE_GROUPS:
      raise ConfigError(f"train.freeze: unknown parameter group {group!r}; valid groups are {tuple(FREEZE_GROUPS)}")
  frozen_dtype = str(config.train.frozen_dtype)
  if frozen_dtype not in FROZEN_DTYPES:
    raise ConfigError(f"train.frozen_dtype: {frozen_dtype!r} is no choice; valid are {FROZEN_DTYPES}")
  if frozen_dtype and not tuple(config.train.freeze) and not int(config.model.lora_rank):
    raise ConfigError(f"train.frozen_dtype={frozen_dtype!r} sets the frozen parameters' dtype, but this run "
                      "freezes none: set train.freeze or model.lora_rank, or leave it empty")
  for key in ("checkpoint.weights", "init.weights"):
    section, name = key.split(".")
    if str(config[section][name]) not in WEIGHTS:
      raise ConfigError(f"{key}: {config[section][name]!r} is no choice; valid are {WEIGHTS} (auto: the moving "
                        f"average where the step has one, else the parameters)")
  if config.data.recipe not in RECIPES:
    raise ConfigError(f"data.recipe: unknown recipe {config.data.recipe!r}; valid recipes are {RECIPES}")
  for key in ("data.dir", "data.cache_dir", "data.tokenizer", "init.checkpoint", "compilation.cache_dir",
              "data.source", "data.heldout_source"):  # the sources: comma-separated lists
    section, name = key.split(".")
    for part in str(config[section][name]).split(",") if name.endswith("source") else [str(config[section][name])]:
      check_not_mistyped_url(part.strip(), key)
  defaults = schema.data
  for key, readers in (("source", SOURCE_RECIPES), ("heldout_source", HELDOUT_SOURCE_RECIPES),
                       ("text_field", ("text_files",))):  # given (not the default) to a recipe that ignores it
    read_anyway = config.data.mixture or (key == "text_field" and config.eval.heldout_sets)  # the sets read it
    if config.data[key] != defaults[key] and config.data.recipe not in readers and not read_anyway:
      undo = f"leave it {defaults[key]!r}" if defaults[key] else "clear it"
      raise ConfigError(f"data.{key}={config.data[key]!r} is set, but data.recipe={config.data.recipe!r} reads "
                        f"none (it would be ignored); {undo}, or use a recipe that reads it: {readers}")
  if config.data.tokenizer_sample_lines != defaults.tokenizer_sample_lines:
    # the lines a build trains its own tokenizer on: a given tokenizer, an SFT recipe (the base run's) or a mixture
    # of built datasets trains none
    reader = ("data.tokenizer is given" if config.data.tokenizer else "data.mixture reads built datasets"
              if config.data.mixture else f"data.recipe={config.data.recipe!r} reuses the base run's tokenizer"
              if config.data.recipe in SFT_RECIPES else None)
    if reader:
      raise ConfigError(f"data.tokenizer_sample_lines={config.data.tokenizer_sample_lines} is set, but no tokenizer "
                        f"is trained ({reader}; it would be ignored); leave it "
                        f"{defaults.tokenizer_sample_lines}, or clear data.tokenizer to train one")
  if config.data.sft_packing and (config.data.recipe not in SFT_RECIPES or config.data.mixture):
    raise ConfigError(f"data.sft_packing=True packs SFT examples, but data.recipe={config.data.recipe!r} is a "
                      f"pretraining recipe, whose rows are packed anyway (it would be ignored); leave it False, or "
                      f"use an SFT recipe: {SFT_RECIPES}")
  from diffgemma_jax.data.sft import CHAT_TEMPLATES
  if config.data.chat_template not in CHAT_TEMPLATES:
    raise ConfigError(f"data.chat_template: unknown template {config.data.chat_template!r}; valid templates are "
                      f"{tuple(CHAT_TEMPLATES)}")
  for key in ("max_bad_lines", "num_workers", "build_workers", "tokenizer_sample_lines", "cache_max_gb"):
    if float(config.data[key]) < 0:
      raise ConfigError(f"data.{key}: must be >= 0, got {config.data[key]}")
  if config.data.mixture:
    parse_mixture(str(config.data.mixture))  # its errors name data.mixture
    if config.data.source or config.data.dir or config.data.recipe in SFT_RECIPES:
      raise ConfigError("data.mixture names built pretraining datasets; it replaces data.recipe, data.source and "
                        "data.dir: leave data.source and data.dir empty and data.recipe a pretraining recipe")
  if config.data.recipe in SFT_RECIPES and not OBJECTIVES[config.objective.name].capabilities.sft_rows:
    raise ConfigError(f"data.recipe={config.data.recipe!r} gives prompt/response rows, which objective.name in "
                      f"{objectives_with('sft_rows')} trains on (prompt never corrupted or scored); got "
                      f"{config.objective.name!r}")
  if config.data.recipe in SFT_RECIPES and not (config.data.tokenizer or config.init.checkpoint):
    raise ConfigError(f"data.recipe={config.data.recipe!r} trains no tokenizer: set init.checkpoint (its run's "
                      f"tokenizer is used) or data.tokenizer (a sentencepiece .model file)")


def _validate_optimizer(train: ml_collections.ConfigDict) -> None:
  """The optimizer's and schedule's settings: each must lie in its range (a negative rate would ascend, an infinite
  one poisons every parameter at the first update)."""
  if train.optimizer not in OPTIMIZERS:
    raise ConfigError(f"train.optimizer: unknown optimizer {train.optimizer!r}; valid are {OPTIMIZERS}")
  if train.lr_schedule not in SCHEDULES:
    raise ConfigError(f"train.lr_schedule: unknown schedule {train.lr_schedule!r}; valid are {SCHEDULES}")
  for key in ("schedule_steps", "decay_steps"):
    if int(train[key]) < 0:
      raise ConfigError(f"train.{key}: must be >= 0, got {train[key]!r}")
  if train.lr_schedule == "wsd":
    horizon = schedule_horizon(train)
    if not 0 < int(train.decay_steps) <= horizon - int(train.warmup_steps):
      raise ConfigError(f"train.decay_steps={train.decay_steps}: the wsd schedule needs a decay phase of 1 to "
                        f"{horizon - int(train.warmup_steps)} steps (the horizon {horizon} less "
                        f"train.warmup_steps={train.warmup_steps})")
  if train.lr_schedule == "wsd_time":
    if not float(train.max_runtime_s) > 0:
      raise ConfigError(f"train.lr_schedule='wsd_time' is sized by the clock: set train.max_runtime_s > 0 seconds "
                        f"(got {train.max_runtime_s}); for a run sized in steps use 'wsd' with train.decay_steps")
    if not 0 < float(train.decay_fraction) < 1:
      raise ConfigError(f"train.decay_fraction={train.decay_fraction}: the share of the run spent decaying, in (0, 1)")
  mu_dtype = str(train.adam_mu_dtype)
  if mu_dtype not in ADAM_MU_DTYPES:
    raise ConfigError(f"train.adam_mu_dtype: {mu_dtype!r} is no choice; valid are {ADAM_MU_DTYPES}")
  if mu_dtype and train.optimizer != "adamw":
    raise ConfigError(f"train.adam_mu_dtype={mu_dtype!r} sets AdamW's first moment, but train.optimizer="
                      f"{train.optimizer!r} keeps none; leave it empty")
  inf = 3.4028234663852886e38  # float32's largest: the step computes in float32
  checks = (("learning_rate", lambda v: 0 < v < inf, "a finite number > 0"),
            ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("weight_decay", lambda v: 0 <= v < inf, "a finite number >= 0"),
            ("grad_clip", lambda v: 0 <= v < inf, "a finite number >= 0 (0: no clipping)"),
            ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: no moving average; MDLM uses 0.9999)"))
  for key, ok, valid in checks:
    value = float(train[key])
    if not ok(value):
      raise ConfigError(f"train.{key}: must be {valid}, got {train[key]!r}")


def _validate_block_objective(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  """The objective section against the objective's fields (`defaults`: the schema's section) and the model."""
  from diffgemma_jax.objectives.block import check_block_size, check_canvas_window
  objective = config.objective
  for key in objective:  # given (not the default) to an objective that has no such field: refused, not ignored
    readers = tuple(name for name, cls in OBJECTIVES.items() if key in {f.name for f in dataclasses.fields(cls)})
    if key != "name" and objective.name not in readers and key in defaults and objective[key] != defaults[key]:
      raise ConfigError(f"objective.{key}={objective[key]!r} is set, but objective.name={objective.name!r} reads "
                        f"no such setting (it would be ignored); leave it {defaults[key]!r}, or use an objective "
                        f"that reads it: {readers}")
  capabilities = OBJECTIVES[objective.name].capabilities
  if config.model.self_conditioning and not capabilities.self_conditioning:
    raise ConfigError(f"model.self_conditioning=True: objective.name={objective.name!r} feeds no self-conditioning "
                      f"signal; use objective.name in {objectives_with('self_conditioning')} or "
                      f"model.self_conditioning=False")
  if config.model.token_shift and not capabilities.token_shift:
    raise ConfigError(f"model.token_shift=True reads each prediction from the position before it, which "
                      f"objective.name in {objectives_with('token_shift')} trains and samples; objective.name="
                      f"{objective.name!r} does not (an 'ar' model predicts the next token already): set "
                      f"model.token_shift=False or use one of those")
  if not capabilities.canvases:
    return
  check_block_size(int(config.train.seq_len), objective.block_size)
  check_canvas_window(objective.block_size, int(config.model.sliding_window), config.model.layer_pattern)
  if objective.encoder_loss_weight < 0:
    raise ConfigError(f"objective.encoder_loss_weight: must be >= 0, got {objective.encoder_loss_weight}")
  if not 0.0 <= objective.self_cond_prob <= 1.0:
    raise ConfigError(f"objective.self_cond_prob: must lie in [0, 1], got {objective.self_cond_prob}")


def load_config(spec: str, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`, applies overrides, validates, and returns a locked ConfigDict."""
  path, _, arg = spec.partition(":")
  module = _load_module(path)
  if arg:
    if not inspect.signature(module.get_config).parameters:
      raise ConfigError(f"config file {path!r} takes no argument; drop ':{arg}' from --config")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except (the user's code, as in _load_module)
    raise ConfigError(f"config file {path!r}: get_config() failed: {_user_error(e, path)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path!r}: get_config() returned {type(config).__name__}, not a ConfigDict "
                      f"(start from diffgemma_jax.config.base_config())")
  if overrides:
    apply_overrides(config, overrides)
  validate(config)
  config.lock()
  return config

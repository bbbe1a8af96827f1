"""Hugging Face DiffusionGemma (config.json + safetensors shards) -> our config and an Orbax checkpoint.

The output is a workdir: `OUT/checkpoints/<step>/params` (StandardSave of the parameters as plain nested dicts,
the trainer's layout, so `train.reading` and `diffgemma-eval --workdir OUT` read it),
`OUT/checkpoints/run_config.json` and, when the checkpoint ships one, `OUT/tokenizer.model`. Shards are read one at
a time and tensor by tensor (from a memory map, or for a folder in a bucket by one ranged read per tensor, in
place: the shards are never downloaded), each converted straight into its slot of our parameter tree, so host
memory and local disk peak at our parameters (in `model.param_dtype`) plus one tensor, never a second copy of the
model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from typing import Any, Callable

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from diffgemma_jax import storage
from diffgemma_jax.config import base_config
from diffgemma_jax.errors import ConfigError, MappingError
from diffgemma_jax.hf import mapping
from diffgemma_jax.hf.safetensors_io import SafetensorsFile, shard_files, tensors_in_order
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.layers import dtype_of
from diffgemma_jax.model.transformer import abstract_model
from diffgemma_jax.objectives.block import check_canvas_window
from diffgemma_jax.train import integrity
from diffgemma_jax.train.checkpoint import CONFIG_FILE, config_to_dict

CONFIG_TEMPLATE = '''"""DiffusionGemma imported from {source} by diffgemma-import."""

from diffgemma_jax.config import base_config

MODEL = {model!r}


def get_config():
  c = base_config()
  c.model.update(MODEL)
  c.objective.name = "uniform"
  c.objective.block_size = {canvas_length}
{context_comment}
  c.train.seq_len = {seq_len}
  c.data.tokenizer = {tokenizer!r}  # the checkpoint's own sentencepiece model ("" when it ships none)
  c.data.chat_template = "diffusiongemma"
  return c
'''


# train.seq_len of an imported model: the row length of our 26B recipe (configs/diffusiongemma_26b_a4b.py), within
# what the release serves (config.json's max_position_embeddings).
IMPORTED_CONTEXT = 4096


def imported_context(canvas_length: int, max_positions: int | None) -> int:
  """train.seq_len for imported weights: whole canvases, as many as fit in IMPORTED_CONTEXT (and in the checkpoint's
  max_position_embeddings), at least one."""
  context = min(IMPORTED_CONTEXT, int(max_positions)) if max_positions else IMPORTED_CONTEXT
  return max(context // canvas_length, 1) * canvas_length


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """config.json of the Hugging Face directory `hf_dir` (a local folder or a bucket URL)."""
  path = storage.join(hf_dir, "config.json")
  if storage.file_size(path) is None:
    raise FileNotFoundError(f"--hf {hf_dir}: no config.json; point it at a Hugging Face DiffusionGemma directory")
  return json.loads(storage.open_path(path).read_text())


def shipped_tokenizer(hf_dir: str) -> str | None:
  """The Hugging Face directory's tokenizer.model (a path or URL), or None when it ships none."""
  path = storage.join(hf_dir, "tokenizer.model")
  return path if storage.file_size(path) is not None else None


def model_config_from_hf(hf_dir: str, **overrides) -> ModelConfig:
  """Our ModelConfig for a Hugging Face directory; `overrides` (e.g. scan_layers=True) change runtime fields."""
  values = mapping.model_overrides_from_hf(read_hf_config(hf_dir))
  values.update(overrides)
  return ModelConfig(**values)


def _fingerprint(array: np.ndarray) -> tuple:
  a = np.asarray(array, np.float64)
  return a.shape, float(a.sum()), float(np.square(a).sum())


def load_params(hf_dir: str, cfg: ModelConfig, *, log: Callable[[str], None] = print,
                scratch: str | None = None) -> dict:
  """Our parameters as a flat dict {path: numpy array} (in `cfg.param_dtype`), read shard by shard from `hf_dir`
  (a local folder, or a bucket URL read in place).

  With `scratch` (a directory) every array is a disk-backed `np.memmap` there, so host memory holds about one
  tensor at a time rather than the model (101 GB in float32 for the 26B release); without, plain arrays.

  Every tensor is accounted for: names that map nowhere and expected names that are absent fail together, listed;
  the encoder's copies of decoder tensors (and the tied LM head) must equal them; vision tensors are skipped.
  """
  files = [SafetensorsFile(path) for path in shard_files(hf_dir)]
  names = [n for f in files for n in f.names()]
  split = mapping.check_names(cfg, names)
  if split["vision"]:
    log(f"note: skipped {len(split['vision'])} vision tensor(s) (model.encoder.vision_tower/embed_vision); "
        "this denoiser is text-only")
  dtype = np.dtype(dtype_of(cfg.param_dtype))
  rules = mapping.rules(cfg)
  by_name = {n: r for r in rules for n in r.hf_names}
  alias = mapping.aliases(cfg)
  flat: dict[tuple, np.ndarray] = {}
  pending: dict[tuple, dict[str, np.ndarray]] = {}  # rules made of two tensors, waiting for the second
  seen_fp: dict[str, tuple] = {}
  alias_fp: dict[str, tuple] = {}
  for name, array in tensors_in_order(files, skip=mapping.is_vision):  # from a bucket, the next ones fetched ahead
    if name in alias:
      alias_fp[name] = _fingerprint(array)
      continue
    seen_fp[name] = _fingerprint(array)
    rule = by_name[name]
    parts = pending.setdefault(rule.path, {})
    parts[name] = np.asarray(array, np.float32)
    if len(parts) == len(rule.hf_names):
      value = rule.to_ours(*[parts[n] for n in rule.hf_names]).astype(dtype)
      _place(flat, cfg, rule.path, value, scratch)
      del pending[rule.path]
  mismatched = sorted(a for a, fp in alias_fp.items() if not _close(fp, seen_fp[alias[a]]))
  if mismatched:
    raise MappingError(f"{len(mismatched)} tensor(s) differ from the decoder tensor they must equal "
                       f"(encoder and decoder share one stack here): {', '.join(mismatched)}")
  return flat


def _close(a: tuple, b: tuple) -> bool:
  return a[0] == b[0] and np.allclose(a[1:], b[1:], rtol=1e-6, atol=1e-6)


def _new_array(shape: tuple, dtype, path: tuple, scratch: str | None) -> np.ndarray:
  if scratch is None:
    return np.zeros(shape, dtype)
  os.makedirs(scratch, exist_ok=True)
  name = os.path.join(scratch, "-".join(map(str, path)) + ".bin")
  return np.memmap(name, dtype=dtype, mode="w+", shape=shape)


def _place(flat: dict, cfg: ModelConfig, rule_path: tuple, value: np.ndarray, scratch: str | None = None) -> None:
  path, layer = mapping.split_layer_index(rule_path)
  if layer is None:
    if scratch is None:
      flat[path] = value
    else:
      flat[path] = _new_array(value.shape, value.dtype, path, scratch)
      flat[path][...] = value
    return
  if path not in flat:
    flat[path] = _new_array((cfg.num_layers // len(cfg.layer_pattern),) + value.shape, value.dtype, path, scratch)
  flat[path][layer] = value


def pure_params(cfg: ModelConfig, flat: dict):
  """The parameters as the trainer checkpoints them (`train.state.to_pure` of the model's params), checked
  against a model built from `cfg`: every path present, every shape right, nothing extra."""
  abstract = nnx.state(abstract_model(cfg), nnx.Param)
  wanted = {path: var.shape for path, var in abstract.flat_state()}
  problems = [f"{'/'.join(map(str, p))} missing" for p in wanted if p not in flat]
  problems += [f"{'/'.join(map(str, p))} is not a parameter of the model" for p in flat if p not in wanted]
  problems += [f"{'/'.join(map(str, p))} has shape {flat[p].shape}, the model wants {tuple(s)}"
               for p, s in wanted.items() if p in flat and tuple(flat[p].shape) != tuple(s)]
  if problems:
    raise MappingError("imported parameters do not fit the model: " + "; ".join(problems))
  return nnx.to_pure_dict(nnx.State.from_flat_path({p: flat[p] for p in wanted}))


def context_comment(canvas_length: int, seq_len: int, max_positions: int | None) -> str:
  """The imported config's comment on train.seq_len (what `imported_context` chose): where its value comes from and
  how far it may be raised."""
  rows = f"Rows of whole canvases of {canvas_length}: {seq_len} tokens"
  recipe = f"as many as fit in {IMPORTED_CONTEXT} (our 26B recipe's row length)"
  if not max_positions:
    text = (f"{rows}, {recipe}. config.json sets no max_position_embeddings, so it does not say how long a context "
            f"the weights serve; raise it (a multiple of the canvas) for longer prompts.")
  elif seq_len > int(max_positions):
    text = (f"{rows}, a single canvas, longer than config.json's max_position_embeddings ({int(max_positions)}), "
            f"which no whole canvas fits.")
  else:
    fit = (recipe + f", within config.json's max_position_embeddings ({int(max_positions)})"
           if int(max_positions) > IMPORTED_CONTEXT else
           f"as many as fit in config.json's max_position_embeddings ({int(max_positions)})")
    text = (f"{rows}, {fit}." + (f" Raise it (a multiple of the canvas, up to {int(max_positions)}) for longer "
                                 f"prompts." if seq_len + canvas_length <= int(max_positions) else ""))
  return "\n".join("  # " + line for line in textwrap.wrap(text, 114))


def write_config_file(path: str, cfg: ModelConfig, *, source: str, canvas_length: int, seq_len: int,
                      max_positions: int | None = None) -> None:
  """The config file (local or a bucket URL) of a model imported from `source`, whose tokenizer.model (if it ships
  one) becomes its data.tokenizer."""
  model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()}
  storage.write_text(path, CONFIG_TEMPLATE.format(
      source=source, model=model, canvas_length=canvas_length, seq_len=seq_len,
      context_comment=context_comment(canvas_length, seq_len, max_positions),
      tokenizer=shipped_tokenizer(source) or ""))


def save_checkpoint(workdir: str, pure: Any, run_config: dict, *, step: int = 0) -> str:
  """Writes `pure` as the params item of checkpoint `step` under `workdir/checkpoints` (the trainer's layout)."""
  directory = storage.resolve(os.path.join(workdir, "checkpoints"))
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  epath.Path(directory, CONFIG_FILE).write_text(json.dumps(run_config, indent=2, sort_keys=True))
  manager = ocp.CheckpointManager(directory, item_names=("params",), options=ocp.CheckpointManagerOptions(
      temporary_path_class=storage.temporary_path_class(directory)))
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(pure)), force=True)
  manager.wait_until_finished()
  manager.close()
  integrity.record_files(os.path.join(directory, str(step)))
  return directory


def check_output(output: str, *, force: bool) -> None:
  """Refuses a workdir whose checkpoints/ holds anything, saying what importing there would do: beside later steps
  (which eval, generate and resume take) the imported step 0 would be ignored; over a step 0 (an earlier import,
  say) Orbax would refuse to save, once every tensor had been converted; and run_config.json would be
  overwritten."""
  storage.check_reachable(output, "--output")
  directory = epath.Path(output, "checkpoints")
  found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
  if found and not force:
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    steps = sorted(int(name) for name in found if name.isdigit())
    later = [step for step in steps if step > 0]
    if later:
      why = (f"an imported step 0 would be ignored beside the later step{'s' if len(later) > 1 else ''} "
             f"({', '.join(map(str, later[:5]))}{' ...' if len(later) > 5 else ''}) and ")
    elif steps:
      why = "it holds a step 0 already (an earlier import?), which Orbax refuses to overwrite, and "
    else:
      why = ""
    raise ConfigError(f"--output {output}: {directory} is not empty ({shown}); {why}run_config.json would be "
                      f"overwritten. Use a new --output, or --force to delete that run's checkpoints and import in "
                      f"their place")


def import_hf(hf_dir: str, output: str, *, config_out: str | None = None, force: bool = False,
              log: Callable[[str], None] = print, **model_overrides) -> ModelConfig:
  """The whole import: config, parameters, checkpoint, the checkpoint's tokenizer.model when it ships one (pinned
  in the workdir, as the trainer pins a run's), and a config file. Returns our ModelConfig. An output whose
  checkpoints/ is not empty is refused unless `force`, which clears it (and its pinned tokenizer) first. `hf_dir`,
  `output` and `config_out` may be bucket URLs; a Hugging Face directory in a bucket is read in place (ranged
  reads, tensor by tensor), only its tokenizer.model copied."""
  storage.check_reachable(hf_dir, "--hf")
  if config_out:
    storage.check_writable(config_out, "--config-out")
  check_output(output, force=force)
  hf_config = read_hf_config(hf_dir)
  cfg = model_config_from_hf(hf_dir, **model_overrides)
  canvas_length = int(hf_config.get("canvas_length") or 256)
  check_canvas_window(canvas_length, cfg.sliding_window, cfg.layer_pattern, canvas_key="config.json canvas_length",
                      window_key="sliding_window")  # before any tensor is read
  max_positions = mapping.text_config_of(hf_config).get("max_position_embeddings")
  seq_len = imported_context(canvas_length, max_positions)
  # beside a local output (same filesystem); for object storage in the local temporary folder
  scratch = (tempfile.mkdtemp(prefix="diffgemma-import-") if storage.is_url(output)
             else os.path.join(os.path.abspath(output), ".import-scratch"))
  try:
    pure = pure_params(cfg, load_params(hf_dir, cfg, log=log, scratch=scratch))
    run_config = base_config()
    run_config.model.update(cfg.to_dict())
    run_config.objective.name = "uniform"
    run_config.objective.block_size = canvas_length
    run_config.train.seq_len = seq_len
    if force:  # only now that the new parameters loaded: a failed import leaves the old run as it was
      if epath.Path(output, "checkpoints").exists():
        epath.Path(output, "checkpoints").rmtree()
      if epath.Path(output, "tokenizer.model").is_file():
        epath.Path(output, "tokenizer.model").unlink()
    directory = save_checkpoint(output, pure, config_to_dict(run_config))
    del pure
    log(f"wrote {directory} (step 0, params only) for a {cfg.num_layers}-layer model")
    tokenizer = shipped_tokenizer(hf_dir)
    if tokenizer:
      epath.Path(tokenizer).copy(epath.Path(output, "tokenizer.model"), overwrite=True)
      log(f"wrote {storage.join(output, 'tokenizer.model')} (the checkpoint's tokenizer)")
    else:
      log(f"note: {hf_dir} ships no tokenizer.model; set data.tokenizer to the model's sentencepiece file to "
          f"generate or fine-tune with it")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  if config_out:
    write_config_file(config_out, cfg, source=storage.resolve(hf_dir), canvas_length=canvas_length,
                      seq_len=seq_len, max_positions=max_positions)
    log(f"wrote {config_out}")
  return cfg

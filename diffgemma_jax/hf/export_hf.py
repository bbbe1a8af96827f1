"""Our checkpoint -> a Hugging Face DiffusionGemma directory that `transformers` loads.

Writes config.json (text part; no vision tower), generation_config.json, the run's tokenizer.model (whose
bos/eos/pad ids generation_config.json names) and safetensors shards holding the decoder's tensors plus both
copies of the `layer_scalar` buffers, which is what `save_pretrained` of `DiffusionGemmaForBlockDiffusion`
writes. Loading it into the multimodal class leaves the vision tower at its initialisation (transformers reports
those weights as missing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from diffgemma_jax import storage
from diffgemma_jax.data import Tokenizer
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.hf import mapping
from diffgemma_jax.hf.safetensors_io import write_sharded
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.layers import dtype_of
from diffgemma_jax.model.lora import merge_lora
from diffgemma_jax.model.transformer import abstract_model
from diffgemma_jax.train.dataset import checked_data_tokenizer
from diffgemma_jax.train.reading import SavedRun, open_run, pinned_tokenizer
from diffgemma_jax.train.state import to_pure


def restore_pure_params(workdir: str, cfg: ModelConfig, step: int | None = None, weights: str = "params"):
  """(step, the parameters as the trainer saved them: nested dicts of arrays, on one device) of the run in
  `workdir` (`train.reading`). `weights` (`checkpoint.weights`): "auto" or "ema" take the trainable parameters'
  moving average where the run kept one (train/ema.py)."""
  run = open_run(workdir, step, weights=weights)
  return run.step, saved_params(run, cfg)


def saved_params(run: SavedRun, cfg: ModelConfig):
  """The parameters of the opened run `run` under model `cfg`, as nested dicts of arrays on one device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = to_pure(nnx.state(abstract_model(cfg), nnx.Param))
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
  return run.restore_pure_params(target)


def getter(pure: Any) -> Callable[[tuple], np.ndarray]:
  """`get(rule_path)` -> numpy array of that parameter (one layer of a stacked one) from a pure params tree."""
  def get(rule_path: tuple) -> np.ndarray:
    path, layer = mapping.split_layer_index(rule_path)
    node = pure
    for key in path:
      node = node[key] if key in node else node[str(key)]
    array = np.asarray(node)
    return array if layer is None else array[layer]
  return get


def hf_tensors(cfg: ModelConfig, pure: Any, dtype=np.float32):
  for name, array in mapping.hf_tensors_from_params(cfg, getter(pure)):
    yield name, np.asarray(array, dtype)


def run_tokenizer(workdir: str, data_tokenizer: str = "") -> str:
  """The tokenizer a run was trained with: the one the trainer pinned in its workdir, else `data.tokenizer` (the
  tokenizer of imported weights). Without either, fails rather than export a model with guessed special ids."""
  pinned = pinned_tokenizer(workdir)
  if pinned:
    return pinned
  if data_tokenizer:
    return checked_data_tokenizer(data_tokenizer)
  raise ConfigError(f"--workdir {workdir} keeps no tokenizer.model and data.tokenizer is empty, so the export "
                    f"would ship no tokenizer and guess its bos/eos/pad ids; pass --config.data.tokenizer=PATH "
                    f"(the sentencepiece .model this model was trained with)")


def generation_config(tokenizer: str | None, vocab_size: int) -> dict[str, Any]:
  """generation_config.json: the special ids of the model's sentencepiece file (none without one: guessed ids
  would stop generation at the wrong token)."""
  config: dict[str, Any] = {"_from_model_config": False}
  if tokenizer:
    tok = Tokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
      raise ConfigError(f"the tokenizer {tokenizer} has {tok.vocab_size} pieces but the model only "
                        f"model.vocab_size={vocab_size} embeddings: it is not this model's tokenizer")
    config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  return config


def export_hf(cfg: ModelConfig, pure: Any, output: str, *, context: int, canvas_length: int = 256,
              dtype: str = "float32", max_shard_bytes: int = 4 << 30, tokenizer: str | None = None,
              log: Callable[[str], None] = print) -> list[str]:
  """Writes the Hugging Face directory `output`; returns the shard file names. `context`: the longest rows the
  weights were trained on (a run's `train.reading.trained_context`); config.json's max_position_embeddings is the
  larger of it and `cfg.max_positions`, never transformers' default. `tokenizer`: the model's sentencepiece file,
  copied in as tokenizer.model (its ids go into generation_config.json). LoRA adapters (a fine-tune with
  `model.lora_rank` > 0) are merged into their base weights first: the reference model has none."""
  if not isinstance(context, int) or isinstance(context, bool) or context <= 0:
    raise ConfigError(f"export context={context!r}: must be the positive number of positions the model was trained "
                      f"for (train.seq_len)")
  cfg = dataclasses.replace(cfg, max_positions=max(cfg.max_positions, context))
  generation = generation_config(tokenizer, cfg.vocab_size)  # a wrong tokenizer fails before any shard is written
  if tokenizer is None:
    log("warning: no tokenizer given: generation_config.json names no bos/eos/pad ids and no tokenizer.model "
        "is written")

  if cfg.lora_rank:
    log(f"merging LoRA adapters (rank {cfg.lora_rank}, alpha {cfg.lora_alpha}) into the base weights")
    pure, cfg = merge_lora(pure, cfg)

  np_dtype = np.dtype(dtype_of(dtype))
  hf_config = mapping.hf_config_from_model(cfg, canvas_length=canvas_length)
  hf_config["dtype"] = dtype
  with storage.staged_folder(output) as folder:  # object storage: written locally, then uploaded file by file
    files = write_sharded(folder, hf_tensors(cfg, pure, np_dtype), max_shard_bytes=max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
    if tokenizer:
      shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.model"))
  log(f"wrote {output}: config.json, {len(files)} safetensors shard(s) ({dtype})"
      + (" and tokenizer.model" if tokenizer else ""))
  return files

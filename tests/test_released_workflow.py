"""README "Starting from the released DiffusionGemma", end to end on a tiny model with the release's canvas of 256
tokens: import (config file and bfloat16 weights), inspect, the config's shapes at its full context, chat generation,
a LoRA fine-tune on chat data, and export. Only the sizes differ from the README's commands."""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffgemma_jax.hf.export_hf import export_hf
from diffgemma_jax.hf.import_hf import IMPORTED_CONTEXT, import_hf, imported_context
from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.train.state import to_pure

CANVAS = 256  # the release's canvas_length (and transformers' default)
RELEASE_CONTEXT = 8192  # the max_position_embeddings of the tiny "release": longer than the imported rows (4096)
# The release's layout at tiny width: sliding and global layers, K=V global layers, self-conditioning, the canvas
# input norm; its window (1024 there) longer than the canvas.
TINY = ModelConfig(vocab_size=512, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=2,
                   head_dim=8, num_kv_heads=1, sliding_window=512, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=48, num_experts=4, top_k=2, expert_dim=12, dispatch="dense", self_conditioning=True,
                   canvas_input_norm=True)
RELEASE_MARKERS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>"]

SFT_CONFIG = '''
from diffgemma_jax.config import sibling_config


def get_config():  # configs/diffusiongemma_26b_a4b_sft.py at tiny scale
  c = sibling_config(__file__, "imported")
  c.model.update(lora_rank=2, lora_alpha=4.0, lora_targets=("attention", "mlp"))
  c.train.frozen_dtype = "bfloat16"
  c.model.max_positions = 0  # as the real one's, built on the 26B recipe rather than on the imported config
  c.init.checkpoint = {workdir!r}
  c.data.recipe = "jsonl"
  c.data.source = {source!r}
  c.data.heldout_source = {source!r}
  c.data.dir = {data_dir!r}
  c.train.update(seq_len={canvas}, batch_size=2, num_steps=2, warmup_steps=1, learning_rate=1e-3)
  c.checkpoint.every_steps = 2
  c.eval.update(every_steps=0, batch_size=2, max_sequences=2, num_t_samples=1)
  return c
'''


def _release_like_tokenizer(path: str) -> str:
  """A sentencepiece model with the released tokenizer's special ids (pad 0, eos 1, bos 2, unk 3) and turn markers
  as control symbols."""
  import sentencepiece as spm
  stdlib = sysconfig.get_paths()["stdlib"]
  lines = [line for name in ("textwrap.py", "shlex.py") for line in open(os.path.join(stdlib, name), encoding="utf-8")
           if line.strip()]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=path, vocab_size=TINY.vocab_size,
                                 pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=RELEASE_MARKERS,
                                 byte_fallback=True, minloglevel=2)
  return path + ".model"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A Hugging Face directory as the release ships it (canvas 256, tokenizer.model beside the weights)."""
  root = tmp_path_factory.mktemp("released")
  model = nnx.eval_shape(lambda: build_model(TINY, 0))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  for _, var in state.flat_state():
    value = var.get_value()
    var.set_value(jnp.asarray(rng.normal(0.0, 0.3, value.shape).astype(value.dtype)))
  tokenizer = _release_like_tokenizer(str(root / "spm"))
  export_hf(TINY, to_pure(state), str(root / "hf"), context=RELEASE_CONTEXT, canvas_length=CANVAS, tokenizer=tokenizer, log=lambda _: None)
  return root


def test_imported_context_is_whole_canvases_within_the_release_context():
  assert imported_context(256, 262_144) == IMPORTED_CONTEXT == 4096
  assert imported_context(100, None) == 4000  # a canvas that does not divide 4096
  assert imported_context(256, 1024) == 1024  # a checkpoint that serves less
  assert imported_context(6000, None) == 6000  # one canvas at least


def test_the_readme_commands_for_the_released_model(released, tmp_path, capsys):
  from diffgemma_jax.config import load_config
  from diffgemma_jax.objectives import make_objective
  from launch.export_hf import main as export_main
  from launch.generate import main as generate_main
  from launch.import_hf import main as import_main
  from launch.inspect import main as inspect_main
  from launch.train import main as train_main

  # 1. import, then inspect the config file it wrote
  workdir, config_file = str(tmp_path / "dg"), str(tmp_path / "imported.py")
  assert import_main(["--hf", str(released / "hf"), "--output", workdir, "--config-out", config_file,
                      "--config.model.param_dtype=bfloat16"]) == 0
  capsys.readouterr()
  assert inspect_main(["--config", config_file, "--json"]) == 0, capsys.readouterr().err
  report = json.loads(capsys.readouterr().out)
  assert report["seq_len"] == IMPORTED_CONTEXT and report["total_params"] > 0
  config = load_config(config_file)
  assert (config.objective.block_size, config.train.seq_len) == (CANVAS, IMPORTED_CONTEXT)
  # the config's training and held-out computations at its full context, traced without allocating
  cfg = ModelConfig.from_config_dict(config.model)
  objective = make_objective(config.objective, mask_id=-1)
  row = jax.ShapeDtypeStruct((1, IMPORTED_CONTEXT), jnp.int32)
  batch = {"tokens": row, "segment_ids": row, "positions": row, "loss_mask": row}

  def loss_and_bound(batch):
    model = build_model(cfg, 0)
    return objective.loss_fn(model, batch, jax.random.key(0))[0], objective.sequence_bound(
        model, batch, jax.random.key(1), num_t_samples=2)[0]

  loss, nelbo = jax.eval_shape(loss_and_bound, batch)
  assert loss.shape == () and nelbo.shape == (1,)

  # 2. chat generation with the released sampler: one canvas of 256 tokens
  assert generate_main(["--config", config_file, "--workdir", workdir, "--chat", "--prompt",
                        "Write a haiku about JAX.", "--max_denoising_steps", "2", "--json"]) == 0, \
      capsys.readouterr().err
  (result,) = json.loads(capsys.readouterr().out)
  assert result["gen_length"] == CANVAS and result["sampler"] == "entropy_bound"
  assert 1 <= len(result["steps_per_canvas"]) and max(result["steps_per_canvas"]) <= 2

  # 3. LoRA fine-tune on chat data (the SFT recipe config is a sibling of the imported one)
  chats = tmp_path / "chats.jsonl"
  chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"count to {i}"},
                                                    {"role": "assistant", "content": " ".join(map(str, range(i)))}]})
                           + "\n" for i in range(1, 9)))
  sft_config, sft_workdir = str(tmp_path / "sft.py"), str(tmp_path / "dg_sft")
  with open(sft_config, "w") as f:
    f.write(textwrap.dedent(SFT_CONFIG.format(workdir=workdir, source=str(chats), data_dir=str(tmp_path / "ds"),
                                              canvas=CANVAS)))
  assert train_main(["--config", sft_config, "--workdir", sft_workdir, "--no_progress"]) == 0, \
      capsys.readouterr().err[-3000:]
  capsys.readouterr()

  # 4. back to Hugging Face, adapters merged
  out = tmp_path / "hf_out"
  assert export_main(["--config", sft_config, "--workdir", sft_workdir, "--output", str(out)]) == 0, \
      capsys.readouterr().err
  exported = json.loads((out / "config.json").read_text())
  assert exported["canvas_length"] == CANVAS and exported["text_config"]["sliding_window"] == TINY.sliding_window
  # the release's context, carried from init.checkpoint's run, not the fine-tune's 256-token rows
  assert exported["text_config"]["max_position_embeddings"] == RELEASE_CONTEXT
  assert (out / "tokenizer.model").read_bytes() == (released / "hf" / "tokenizer.model").read_bytes()


def test_a_canvas_longer_than_the_sliding_window_is_refused_at_import_and_in_configs(released, tmp_path):
  from diffgemma_jax.config import load_config
  from diffgemma_jax.errors import ConfigError
  narrow = dataclasses.replace(TINY, sliding_window=128)
  model = nnx.eval_shape(lambda: build_model(narrow, 0))
  pure = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), to_pure(nnx.state(model, nnx.Param)))
  export_hf(narrow, pure, str(tmp_path / "hf"), context=CANVAS, canvas_length=CANVAS, log=lambda _: None)
  with pytest.raises(ConfigError, match=r"config.json canvas_length=256 is longer than sliding_window=128"):
    import_hf(str(tmp_path / "hf"), str(tmp_path / "work"), log=lambda _: None)
  assert not (tmp_path / "work").exists()  # refused before anything is written
  with pytest.raises(ConfigError, match=r"objective.block_size=32 is longer than model.sliding_window=16: .*use a "
                                        r"canvas of at most 16 tokens or a window of at least 32"):
    load_config("configs/diffusiongemma_tiny.py", {"model.sliding_window": "16"})

"""Supervised fine-tuning end to end: the recipes, init from a checkpoint, freezing and LoRA. The data's modules have
their own test files (test_sft_records.py, test_sft_templates.py, test_sft_encoding.py, test_sft_rows.py); the
objectives' prompt masking and normalisation are in test_masked.py and test_objective_spies.py."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_MODEL
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model import ModelConfig

# Runs that compile what an earlier run of this file compiled read it back from JAX's cache.
pytestmark = pytest.mark.usefixtures("compilation_cache")


# ---- recipes -----------------------------------------------------------------------------------------------------
def test_python_docstrings_pairs_hold_out_the_pretraining_modules(tmp_path, trained_run):
  import sysconfig

  from data_recipes.common import split_by_hash
  from data_recipes.python_docstrings import build, function_pairs
  from data_recipes.python_stdlib import HELDOUT_FRACTION, documents
  from diffgemma_jax.data.manifest import read_records
  text = 'def f(a, b=1):\n    """Add.\n\n    More.\n    """\n    c = a + b\n    return c\n\n' \
         'class K:\n    def m(self):\n        "Doc."\n        return 1\n    def nodoc(self):\n        return 2\n'
  pairs = dict(function_pairs("m.py", text))
  assert pairs["m.py:1:f"] == {"prompt": 'def f(a, b=1):\n    """Add.\n\n    More.\n    """\n',
                               "response": "    c = a + b\n    return c\n"}
  assert pairs["m.py:10:m"] == {"prompt": 'def m(self):\n    "Doc."\n', "response": "    return 1\n"}
  assert len(pairs) == 2
  manifest = build(str(tmp_path / "pd"), tokenizer=os.path.join(trained_run[1], "tokenizer.model"))
  assert manifest["kind"] == "sft" and manifest["splits"]["heldout"]["documents"] > 50
  modules = split_by_hash(documents(sysconfig.get_paths()["stdlib"]), HELDOUT_FRACTION)
  heldout_modules = {rel for rel, _ in modules["heldout"]}
  heldout = read_records(str(tmp_path / "pd"), "heldout")
  train = read_records(str(tmp_path / "pd"), "train")
  assert {r["source"].split(":")[0] for r in heldout} <= heldout_modules
  assert not {r["source"].split(":")[0] for r in train} & heldout_modules


def test_sft_recipes_need_a_tokenizer_and_an_objective_for_sft_rows(load_tiny, monkeypatch):
  import dataclasses

  from diffgemma_jax import objectives
  from diffgemma_jax.objectives import Autoregressive
  with pytest.raises(ConfigError, match="set init.checkpoint .* or data.tokenizer"):
    load_tiny({"data.recipe": "jsonl", "data.source": "x.jsonl"})
  sft = {"data.recipe": "jsonl", "data.tokenizer": "t.model", "objective.name": "ar"}
  assert load_tiny(sft).objective.name == "ar"  # every objective trains on SFT rows (the AR twin of a fine-tune)
  unable = type("NoSFT", (Autoregressive,), {"capabilities": dataclasses.replace(Autoregressive.capabilities,
                                                                                  sft_rows=False)})
  monkeypatch.setitem(objectives.OBJECTIVES, "ar", unable)  # an objective that declares it cannot
  with pytest.raises(ConfigError, match=r"which objective.name in \('masked', 'block', 'uniform'\) trains on"):
    load_tiny(sft)


# ---- freezing and LoRA in the train step ----------------------------------------------------------------------------
def _step_once(cfg: ModelConfig, freeze=()):
  """Two masked-diffusion updates of `cfg` with `train.freeze=freeze` (or its LoRA adapters), as the trainer
  builds the step: which parameters changed, the state, the last metrics."""
  from diffgemma_jax.config import base_config
  from diffgemma_jax.parallel.mesh import make_mesh
  from diffgemma_jax.train import compile_train_step
  from diffgemma_jax.train.state import to_pure
  config = base_config()  # objective: masked
  config.model.update(cfg.to_dict())
  config.train.update(learning_rate=1e-2, warmup_steps=0, num_steps=10, freeze=tuple(freeze))
  compiled = compile_train_step(config, mask_id=4, mesh=make_mesh((1, 1, 1, 1), devices=jax.devices()[:1]))
  step, state = compiled.step, compiled.init_state()
  before = jax.device_get(to_pure(state.params))
  tokens = jax.random.randint(jax.random.key(0), (4, 16), 5, cfg.vocab_size)
  batch = {"tokens": tokens, "segment_ids": jnp.ones((4, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)).astype(jnp.int32)}
  for _ in range(2):
    state, metrics = step(state, batch, jax.random.key(1))
  after = jax.device_get(to_pure(state.params))
  changed = {jax.tree_util.keystr(p): not np.array_equal(a, b) for (p, a), (_, b) in
             zip(jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves_with_path(after))}
  return changed, state, metrics


SMALL = dict(TINY_MODEL, vocab_size=64, embed_dim=32, num_layers=2, mlp_dim=32, expert_dim=16)


def test_freezing_flags_freeze_what_they_say():
  changed, state, _ = _step_once(ModelConfig(**SMALL), freeze=("router", "experts"))
  for path, did in changed.items():
    frozen = "['moe']" in path and any(k in path for k in ("router_w", "router_scale", "w_gate_up", "w_down",
                                                             "per_expert_scale"))
    if frozen:
      assert not did, path
  assert changed["['embedder']['embedding']"]
  assert any(did for path, did in changed.items() if "['attn']" in path)
  # No optimizer moments are kept for frozen parameters.
  moments = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "shape") and x.ndim == 3]
  assert not [x for x in moments if x.shape[0] == SMALL["num_experts"]]


def test_lora_trains_only_the_adapters_and_merges_exactly():
  from diffgemma_jax.model import build_model
  from diffgemma_jax.model.lora import merge_lora
  from diffgemma_jax.model.masks import make_mask
  from diffgemma_jax.train.state import from_pure, split_model, to_pure
  cfg = ModelConfig(**SMALL, lora_rank=4, lora_alpha=8.0)
  changed, state, metrics = _step_once(cfg)
  assert np.isfinite(float(metrics["loss"]))
  for path, did in changed.items():
    if "_lora']['b']" in path:
      assert did, path  # B starts at zero and is trained
    elif "_lora'" not in path:
      assert not did, path  # the base model is frozen
  assert any("['mlp']['w_down_lora']" in p for p in changed) and any("['attn']['q_proj_lora']" in p for p in changed)
  assert not any("['moe']" in p and "_lora" in p for p in changed)  # experts are never adapted
  graphdef, _ = split_model(nnx.eval_shape(lambda: build_model(cfg, 0)))
  adapted = nnx.merge(graphdef, state.params)
  merged_pure, base_cfg = merge_lora(jax.device_get(to_pure(state.params)), cfg)
  assert base_cfg.lora_rank == 0
  _, base_template = split_model(build_model(base_cfg, 0))
  merged = nnx.merge(split_model(build_model(base_cfg, 0))[0], from_pure(base_template, merged_pure))
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 5, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  mask = make_mask("bidirectional", jnp.ones((2, 16), jnp.int32), positions)
  a, _ = adapted(tokens, positions, mask)
  b, _ = merged(tokens, positions, mask)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)


def test_frozen_parameters_in_bfloat16_train_as_their_float32_values():
  """train.frozen_dtype=bfloat16 holds the frozen base of a LoRA run in bfloat16 (the adapters and their moments
  stay float32). From weights bfloat16 holds exactly (a bfloat16 release imported to float32), two updates give
  the losses and adapters the float32 base gives: the layers cast every weight where they use it."""
  from diffgemma_jax.config import base_config
  from diffgemma_jax.parallel.mesh import make_mesh
  from diffgemma_jax.train import compile_train_step
  from diffgemma_jax.train.freeze import split_trainable
  from diffgemma_jax.train.state import TrainState, store_frozen
  cfg = ModelConfig(**SMALL, lora_rank=4, lora_alpha=8.0)
  tokens = jax.random.randint(jax.random.key(0), (4, 16), 5, cfg.vocab_size)
  batch = {"tokens": tokens, "segment_ids": jnp.ones((4, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)).astype(jnp.int32)}
  runs = {}
  for frozen_dtype in ("", "bfloat16"):
    config = base_config()
    config.model.update(cfg.to_dict())
    config.train.update(learning_rate=1e-2, warmup_steps=0, num_steps=10, frozen_dtype=frozen_dtype)
    compiled = compile_train_step(config, mask_id=4, mesh=make_mesh((1, 1, 1, 1), devices=jax.devices()[:1]))
    state = compiled.init_state()
    trained, frozen = split_trainable(state.params, compiled.trainable)
    assert {x.dtype for x in jax.tree.leaves(trained)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(frozen_dtype or jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    # both from the same base, rounded to bfloat16's values: stored in bfloat16, or in float32 holding those values
    exact = store_frozen(store_frozen(state.params, compiled.trainable, "bfloat16"), compiled.trainable, "float32")
    state = TrainState(step=state.step, params=store_frozen(exact, compiled.trainable, frozen_dtype),
                       opt_state=state.opt_state)
    losses = []
    for _ in range(2):
      state, metrics = compiled.step(state, batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
    trained, frozen = split_trainable(state.params, compiled.trainable)
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(frozen_dtype or jnp.float32)}  # kept so
    runs[frozen_dtype] = losses, jax.device_get(jax.tree.leaves(trained))
  np.testing.assert_allclose(runs["bfloat16"][0], runs[""][0], rtol=1e-6)
  for a, b in zip(runs["bfloat16"][1], runs[""][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not all(np.array_equal(a, b) for a, b in zip(runs[""][1], _lora_init(cfg)))  # the adapters moved


def _lora_init(cfg):
  from diffgemma_jax.model import build_model
  from diffgemma_jax.train.freeze import split_trainable, trainable_filter
  from diffgemma_jax.train.state import split_model
  trained, _ = split_trainable(split_model(build_model(cfg, 0))[1], trainable_filter(cfg))
  return jax.device_get(jax.tree.leaves(trained))


def test_lora_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="model.lora_targets: unknown target 'experts'"):
    ModelConfig(lora_rank=4, lora_targets=("experts",))
  with pytest.raises(ConfigError, match="model.lora_rank: must be a non-negative integer"):
    ModelConfig(lora_rank=-1)


# ---- init.checkpoint, end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  lines = []
  for i in range(40):
    lines.append(json.dumps({"prompt": f"def add_{i}(x):\n    \"\"\"Add {i} to x.\"\"\"\n",
                             "response": f"    return x + {i}\n"}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": f"square {i}"},
                                          {"role": "assistant", "content": f"{i * i}"},
                                          {"role": "user", "content": "and double it"},
                                          {"role": "assistant", "content": f"{2 * i * i}"}]}))
  (root / "train.jsonl").write_text("\n".join(lines) + "\n")
  return str(root / "train.jsonl"), root


def _sft_overrides(init, data_root, **extra):
  out = {"data.recipe": "jsonl", "data.source": str(data_root / "train.jsonl"), "data.dir": str(data_root / "ds"),
         "init.checkpoint": init, "train.num_steps": "6", "train.learning_rate": "3e-3", "checkpoint.every_steps": "6",
         "eval.every_steps": "0", "eval.max_sequences": "0"}
  out.update(extra)
  return out


def test_sft_from_a_pretrained_checkpoint_end_to_end(load_tiny, trained_run, sft_data, tmp_path, capsys):
  """Run again, the finished fine-tune resumes its own checkpoint (evaluated, nothing trained) and says that
  init.checkpoint is not read."""
  from diffgemma_jax.evaluate import evaluate
  from diffgemma_jax.train import train
  _, pre_workdir, _ = trained_run
  _, root = sft_data
  config = load_tiny(_sft_overrides(pre_workdir, root))
  summary = train(config, str(tmp_path / "sft"), show_progress=False)
  assert summary["final_step"] == 6 and np.isfinite(summary["final_loss"])
  capsys.readouterr()
  again = train(config, str(tmp_path / "sft"), show_progress=False)
  assert again["start_step"] == 6 and again["eval"] == summary["eval"]
  assert (f"step 6: resuming this workdir's own checkpoint; init.checkpoint ({pre_workdir}) initialises a run "
          f"that has none, and is not read") in capsys.readouterr().err
  # The run's tokenizer is the pretrained run's.
  with open(os.path.join(pre_workdir, "tokenizer.model"), "rb") as a, open(tmp_path / "sft" / "tokenizer.model",
                                                                             "rb") as b:
    assert a.read() == b.read()
  after = evaluate(config, str(tmp_path / "sft"))
  before = evaluate(load_tiny(_sft_overrides(pre_workdir, root)), checkpoint=pre_workdir)
  assert after["num_examples"] == before["num_examples"] > 0
  assert after["num_tokens"] == before["num_tokens"]
  assert before["step"] == 24 and after["step"] == 6
  assert after["ppl_bound"] < before["ppl_bound"]  # the fine-tune learnt the held-out pairs' format
  # The run's own workdir is enough to read it: its init.checkpoint gone (another machine, say) and its dataset
  # rebuilt from nothing, with the tokenizer the run pinned.
  from diffgemma_jax.sampling.requests import GenerationOptions, generate_completions
  elsewhere = load_tiny(_sft_overrides(str(tmp_path / "gone"), root, **{"data.dir": str(tmp_path / "rebuilt")}))
  assert evaluate(elsewhere, str(tmp_path / "sft")) == after
  (result,) = generate_completions(elsewhere, str(tmp_path / "sft"), ["def add_1(x):\n"],
                                   GenerationOptions(gen_length=8, block_length=8))
  assert result["step"] == 6 and result["new_tokens"] <= 8


def test_uniform_sft_from_a_pretrained_checkpoint_end_to_end(load_tiny, trained_run, sft_data, tmp_path):
  """The flagship fine-tune's objective at tiny scale, on packed rows (`data.sft_packing`): uniform-state SFT from
  the pretrained (masked) run, then the held-out response bound, on the same scored tokens (each held-out example
  in the packed layout, its response EOS-padded to whole canvases), below the pretrained model's (9.4 against 12.5
  nats a token when written, one example per row)."""
  from diffgemma_jax.evaluate import evaluate
  from diffgemma_jax.train import train
  from diffgemma_jax.train.dataset import dataset_dir, train_iterator
  _, pre_workdir, _ = trained_run
  _, root = sft_data
  config = load_tiny(_sft_overrides(pre_workdir, root, **{"objective.name": "uniform", "objective.block_size": "8",
                                                          "data.sft_packing": "True", "train.seq_len": "128"}))
  summary = train(config, str(tmp_path / "sft"), show_progress=False)
  assert summary["final_step"] == 6 and np.isfinite(summary["final_loss"])
  after = evaluate(config, str(tmp_path / "sft"))
  before = evaluate(config, checkpoint=pre_workdir)
  assert after["num_tokens"] == before["num_tokens"] > 0 and after["num_examples"] == before["num_examples"] > 0
  assert before["step"] == 24 and after["step"] == 6 and not after["exact"]
  assert after["ppl_bound"] < before["ppl_bound"], (after, before)
  batch = next(iter(train_iterator(config, dataset_dir(config))))  # several examples a row, whole canvases each
  assert batch["segment_ids"].max() >= 2 and np.all(batch["loss_mask"].sum(axis=1) % 8 == 0)
  assert after["num_tokens"] % 8 == 0 and after["num_tokens"] < after["num_examples"] * 128 // 4


def test_bad_init_checkpoints_fail_before_any_step(load_tiny, trained_run, sft_data, tmp_path):
  from diffgemma_jax.errors import IncompatibleCheckpointError
  from diffgemma_jax.train import train
  _, pre_workdir, _ = trained_run
  _, root = sft_data
  with pytest.raises(ConfigError, match="init.checkpoint: .*does not exist"):
    train(load_tiny(_sft_overrides(str(tmp_path / "nowhere"), root)), str(tmp_path / "a"), show_progress=False)
  wider = load_tiny(_sft_overrides(pre_workdir, root, **{"model.mlp_dim": "96"}))
  with pytest.raises(IncompatibleCheckpointError, match=r"shape of units/0/blocks/0/mlp/w_down: \(128, 64\) there, "
                     r"\(96, 64\) in this model"):
    train(wider, str(tmp_path / "b"), show_progress=False)
  fewer = load_tiny(_sft_overrides(pre_workdir, root, **{"model.num_layers": "4"}))
  with pytest.raises(IncompatibleCheckpointError, match="missing there: units/1/blocks/0/attn"):
    train(fewer, str(tmp_path / "c"), show_progress=False)
  for name in "abc":
    assert not os.path.exists(tmp_path / name / "checkpoints")
  # A LoRA fine-tune of the same architecture loads: adapters are new, everything else comes from the checkpoint.
  lora = load_tiny(_sft_overrides(pre_workdir, root, **{"model.lora_rank": "2", "train.num_steps": "2"}))
  summary = train(lora, str(tmp_path / "d"), show_progress=False)
  assert summary["final_step"] == 2
  # Reading the LoRA run with the base config (no lora_rank) picks up the run's adapters from its run_config.json.
  from diffgemma_jax.evaluate import evaluate
  from diffgemma_jax.train.reading import restore_model
  # ... also once the pretraining run it started from has moved (init.checkpoint names nothing now): the
  # fine-tuned workdir pins its own tokenizer, which is all a reader needs.
  base = load_tiny(_sft_overrides(str(tmp_path / "moved"), root))
  assert evaluate(base, str(tmp_path / "d"))["step"] == 2
  assert base.model.lora_rank == 0  # the caller's config is not changed
  model, step = restore_model(load_tiny(_sft_overrides(pre_workdir, root)), str(tmp_path / "d"))
  assert step == 2 and model.units[0].blocks[0].attn.q_proj_lora is not None
  with pytest.raises(IncompatibleCheckpointError, match="model.lora_rank: 2 in the checkpoints, 0 in the config"):
    train(load_tiny(_sft_overrides(pre_workdir, root, **{"train.num_steps": "3"})), str(tmp_path / "d"),
          show_progress=False)  # a resume must say what it trains


def test_released_model_sft_config_is_a_lora_run_on_an_expert_parallel_mesh():
  from diffgemma_jax.config import load_config
  from diffgemma_jax.model import build_model
  from diffgemma_jax.model.inspect import count_params
  from diffgemma_jax.train.freeze import describe, trainable_filter
  from diffgemma_jax.train.state import split_model
  config = load_config("configs/diffusiongemma_26b_a4b_sft.py")
  assert tuple(config.mesh.shape) == (1, 1, 8, 1) and config.objective.name == "uniform"
  cfg = ModelConfig.from_config_dict(config.model)
  assert cfg.lora_rank == 16 and cfg.num_experts % 8 == 0
  _, params = split_model(nnx.eval_shape(lambda: build_model(cfg, 0)))
  counts = describe(params, trainable_filter(cfg, ()))
  assert counts["trainable_params"] == count_params(cfg)["params_by_component"]["lora_adapters"]
  assert counts["trainable_params"] < 1e-3 * counts["frozen_params"]
  assert config.train.frozen_dtype == "bfloat16"  # the release's weights are bfloat16: the base held as they are



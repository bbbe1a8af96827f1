"""Hugging Face DiffusionGemma import/export: the mapping on its own (numpy only), and logit parity against
transformers' DiffusionGemmaForBlockDiffusion (the test extra installs torch and transformers; the parity tests fail
where they are missing). Models are built abstractly and filled with numpy values and our forwards are jitted:
eager tracing of the tiny model took most of this file's time."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import transformers_reference
from diffgemma_jax.errors import MappingError
from diffgemma_jax.hf import mapping
from diffgemma_jax.hf.export_hf import export_hf, restore_pure_params
from diffgemma_jax.hf.import_hf import import_hf, load_params, pure_params
from diffgemma_jax.hf.safetensors_io import SafetensorsFile, shard_files, write_file
from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.model.masks import make_mask
from diffgemma_jax.model.self_conditioning import self_conditioning_embeddings
from diffgemma_jax.train.state import to_pure

TINY = ModelConfig(vocab_size=96, embed_dim=32, num_layers=4, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=64, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=48, num_experts=4, top_k=2, expert_dim=12, dispatch="dense", self_conditioning=True,
                   canvas_input_norm=True)
CONTEXT = 128  # the rows TINY's exports are said to be trained on (export_hf's `context`)


def _random_model(cfg, seed=0):
  """A model whose every parameter (norm scales and scalars included) is random, so no mapping error hides."""
  model = nnx.eval_shape(lambda: build_model(cfg, seed))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed + 1)
  for _, var in state.flat_state():
    value = var.get_value()
    var.set_value(jnp.asarray(rng.normal(1.0, 0.5, value.shape).astype(value.dtype)))
  nnx.update(model, state)
  return model


def _model_from_pure(cfg, pure):
  model = nnx.eval_shape(lambda: build_model(cfg, 0))
  state = nnx.state(model, nnx.Param)
  nnx.update(model, _state_from_pure(state, pure))
  return model


def _pure(model):
  return to_pure(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("scan", [False, True])
def test_export_then_import_gives_back_every_parameter(tmp_path, scan):
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  pure = _pure(_random_model(cfg))
  export_hf(cfg, pure, str(tmp_path), context=CONTEXT, max_shard_bytes=20_000, log=lambda _: None)
  assert len(shard_files(str(tmp_path))) > 1
  hf_config = json.load(open(tmp_path / "config.json"))
  assert mapping.model_overrides_from_hf(hf_config)["layer_pattern"] == ("sliding", "global")
  again = pure_params(cfg, load_params(str(tmp_path), cfg, log=lambda _: None))
  flat_a = jax.tree_util.tree_leaves_with_path(pure)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(again))
  assert len(flat_a) == len(flat_b)
  for path, value in flat_a:
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=str(path))


def test_hf_layouts_of_the_released_names(tmp_path):
  pure = _pure(_random_model(TINY))
  export_hf(TINY, pure, str(tmp_path), context=CONTEXT, log=lambda _: None)
  f = SafetensorsFile(shard_files(str(tmp_path))[0])
  t = {n: f.get(n) for n in f.names()}
  layer1 = "model.decoder.layers.1."
  assert t[layer1 + "experts.gate_up_proj"].shape == (4, 24, 32)  # [E, 2F, D]
  assert t[layer1 + "experts.down_proj"].shape == (4, 32, 12)  # [E, D, F]
  assert t[layer1 + "self_attn.k_proj.weight"].shape == (16, 32)  # global: 1 KV head of 16
  assert layer1 + "self_attn.v_proj.weight" not in t  # K=V
  assert "model.decoder.layers.0.self_attn.v_proj.weight" in t
  assert "model.encoder.language_model.layers.3.layer_scalar" in t
  gate_up = np.asarray(pure["units"][0]["blocks"][1]["moe"]["w_gate_up"])  # [E, D, 2F], gate | up
  np.testing.assert_array_equal(t[layer1 + "experts.gate_up_proj"][0, :12], gate_up[0, :, :12].T)


def _rewrite(src, dst, drop=(), add=()):
  os.makedirs(dst, exist_ok=True)
  for name in ("config.json",):
    with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as g:
      g.write(f.read())
  tensors = []
  for path in shard_files(src):
    f = SafetensorsFile(path)
    tensors += [(n, np.array(f.get(n))) for n in f.names() if n not in drop]
  write_file(os.path.join(dst, "model.safetensors"), tensors + list(add))


def test_export_refuses_what_the_reference_cannot_express():
  mapping.hf_config_from_model(TINY)
  for change, key in ((dict(token_shift=True), "model.token_shift"),
                      (dict(self_conditioning=False), "model.self_conditioning"),
                      (dict(global_k_eq_v=False), "model.global_k_eq_v")):
    with pytest.raises(MappingError, match=r"cannot export.*" + key.replace(".", r"\.")):
      mapping.hf_config_from_model(dataclasses.replace(TINY, **change))


def test_missing_extra_and_disagreeing_tensors_fail_with_their_names(tmp_path):
  src = str(tmp_path / "ok")
  export_hf(TINY, _pure(_random_model(TINY)), src, context=CONTEXT, log=lambda _: None)
  missing = "model.decoder.layers.2.router.per_expert_scale"
  _rewrite(src, str(tmp_path / "missing"), drop=[missing])
  with pytest.raises(MappingError, match=r"missing tensor\(s\): " + missing.replace(".", r"\.")):
    load_params(str(tmp_path / "missing"), TINY)
  extra = "model.decoder.layers.0.self_attn.q_proj.bias"
  _rewrite(src, str(tmp_path / "extra"), add=[(extra, np.zeros(32, np.float32))])
  with pytest.raises(MappingError, match=r"unknown tensor\(s\): " + extra.replace(".", r"\.")):
    load_params(str(tmp_path / "extra"), TINY)
  scalar = "model.encoder.language_model.layers.1.layer_scalar"
  _rewrite(src, str(tmp_path / "differs"), drop=[scalar], add=[(scalar, np.full(1, 7.0, np.float32))])
  with pytest.raises(MappingError, match=scalar.replace(".", r"\.")):
    load_params(str(tmp_path / "differs"), TINY)
  vision = "model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.weight"
  _rewrite(src, str(tmp_path / "vision"), add=[(vision, np.zeros((2, 2), np.float32))])
  notes = []
  load_params(str(tmp_path / "vision"), TINY, log=notes.append)
  assert any("vision" in n for n in notes)


def test_import_writes_a_checkpoint_and_a_config(tmp_path):
  src = str(tmp_path / "hf")
  pure = _pure(_random_model(TINY))
  export_hf(TINY, pure, src, context=CONTEXT, canvas_length=16, log=lambda _: None)
  config_out = str(tmp_path / "imported.py")
  cfg = import_hf(src, str(tmp_path / "work"), config_out=config_out, log=lambda _: None)
  assert dataclasses.replace(cfg, dispatch="dense") == dataclasses.replace(TINY, max_positions=CONTEXT)
  assert sorted(os.listdir(tmp_path / "work")) == ["checkpoints"]  # the disk-backed scratch is gone
  flat = load_params(src, TINY, log=lambda _: None, scratch=str(tmp_path / "scratch"))
  assert all(isinstance(v, np.memmap) for v in flat.values())
  from diffgemma_jax.config import load_config
  config = load_config(config_out)
  assert ModelConfig.from_config_dict(config.model) == dataclasses.replace(TINY, dispatch="auto",
                                                                           max_positions=CONTEXT)
  assert config.objective.block_size == 16
  step, restored = restore_pure_params(str(tmp_path / "work"), TINY)
  assert step == 0
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(pure), jax.tree_util.tree_leaves_with_path(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


# ---- parity with transformers ------------------------------------------------------------------------------------
SLIDING_WINDOW = 8  # shorter than the 13-token prompts and the later blocks' prefixes below: the window matters


def _hf_model(sliding_window=SLIDING_WINDOW):
  torch, transformers = transformers_reference()
  text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
              sliding_window=sliding_window, num_experts=4, top_k_experts=2, moe_intermediate_size=12,
              layer_types=["sliding_attention", "full_attention"] * 2)
  vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, head_dim=8)
  config = transformers.DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=8)
  torch.manual_seed(0)
  model = transformers.DiffusionGemmaForBlockDiffusion(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "vision" not in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) * p.shape[-1] ** -0.5)
    buffers = dict(model.named_buffers())
    for name, b in buffers.items():
      if name.startswith("model.decoder.layers") and name.endswith("layer_scalar"):
        b.copy_(1.0 + 0.3 * torch.randn_like(b))
        buffers[name.replace("model.decoder.", "model.encoder.language_model.")].copy_(b)
  return torch, transformers, model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The tiny transformers model, saved, imported by `import_hf` (with a config file) and loaded into our model."""
  torch, transformers, hf = _hf_model()
  root = tmp_path_factory.mktemp("reference")
  hf.save_pretrained(str(root / "hf"))
  cfg = import_hf(str(root / "hf"), str(root / "work"), config_out=str(root / "imported.py"), log=lambda _: None,
                  dispatch="dense")
  _, pure = restore_pure_params(str(root / "work"), cfg)
  return types.SimpleNamespace(torch=torch, transformers=transformers, hf=hf, cfg=cfg, pure=pure, root=root,
                               model=_model_from_pure(cfg, pure))


def _hf_logits(torch, model, prompt, canvas, sc_logits=None, sc_mask=None):
  with torch.no_grad():
    enc = model.model.encoder(input_ids=torch.tensor(prompt)).last_hidden_state
    enc_logits = model.lm_head(enc).float()
    cap = model.final_logit_softcapping
    enc_logits = (torch.tanh(enc_logits / cap) * cap).numpy()
    kwargs = {}
    if sc_logits is not None:
      kwargs = dict(self_conditioning_logits=torch.tensor(sc_logits), self_conditioning_mask=torch.tensor(sc_mask))
    canvas_logits = model(input_ids=torch.tensor(prompt), decoder_input_ids=torch.tensor(canvas), **kwargs).logits
  return enc_logits, canvas_logits.numpy()


@nnx.jit
def _encoder_and_canvas(model, prompt, canvas, sc_logits, sc_mask):
  """Our causal encoder logits over the prompt, and the canvas logits from one pass over [prompt ; canvas] with the
  canvas at the positions after the prompt (the layout the reference's decoder sees)."""
  B, P = prompt.shape
  C = canvas.shape[1]
  positions = jnp.broadcast_to(jnp.arange(P), (B, P))
  enc, _ = model(prompt, positions, make_mask("causal", jnp.ones((B, P), jnp.int32), positions))
  tokens = jnp.concatenate([prompt, canvas], axis=1)
  positions = jnp.broadcast_to(jnp.arange(P + C), (B, P + C))
  causal = jnp.tril(jnp.ones((P + C, P + C), bool))
  mask = jnp.broadcast_to(causal.at[P:, :].set(True), (B, P + C, P + C))  # the canvas: the whole prompt and itself
  is_canvas = jnp.broadcast_to(jnp.arange(P + C) >= P, (B, P + C))
  sc = self_conditioning_embeddings(model, sc_logits, sc_mask)
  embeddings = jnp.concatenate([jnp.zeros((B, P, sc.shape[-1])), sc], axis=1)
  logits, _ = model(tokens, positions, mask, embeddings_BLD=embeddings, canvas_BL=is_canvas)
  return enc, logits[:, P:]


def _our_logits(model, prompt, canvas, sc_logits=None, sc_mask=None):
  if sc_logits is None:  # no self-conditioning signal: every row masked off (the embeddings are then zero)
    sc_logits = np.zeros(canvas.shape + (model.cfg.vocab_size,), np.float32)
    sc_mask = np.zeros(canvas.shape[:1], bool)
  return tuple(np.asarray(x) for x in _encoder_and_canvas(model, jnp.asarray(prompt), jnp.asarray(canvas),
                                                           jnp.asarray(sc_logits), jnp.asarray(sc_mask)))


def _assert_close(ours, theirs, what):
  err = np.max(np.abs(ours - theirs))
  assert err <= 1e-4 * max(1.0, np.max(np.abs(theirs))), f"{what}: max abs logit difference {err}"


def test_logits_match_transformers_after_import_and_after_export(reference, tmp_path):
  torch, transformers, hf, cfg, pure = reference.torch, reference.transformers, reference.hf, reference.cfg, \
      reference.pure
  rng = np.random.default_rng(0)
  prompt, canvas = rng.integers(0, 96, (2, 13)), rng.integers(0, 96, (2, 8))
  sc_logits, sc_mask = 3 * rng.standard_normal((2, 8, 96)).astype(np.float32), np.array([True, False])
  with jax.default_matmul_precision("highest"):
    hf_enc, hf_canvas = _hf_logits(torch, hf, prompt, canvas)
    our_enc, our_canvas = _our_logits(reference.model, prompt, canvas)
    _assert_close(our_enc, hf_enc, "encoder (causal) pass")
    _assert_close(our_canvas, hf_canvas, "canvas pass")
    _, hf_sc = _hf_logits(torch, hf, prompt, canvas, sc_logits, sc_mask)
    _, our_sc = _our_logits(reference.model, prompt, canvas, sc_logits, sc_mask)
    _assert_close(our_sc, hf_sc, "canvas pass with self-conditioning")

  export_hf(cfg, pure, str(tmp_path / "exported"), context=64, canvas_length=8, log=lambda _: None)
  reloaded = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(str(tmp_path / "exported")).eval()
  assert reloaded.config.text_config.max_position_embeddings == hf.config.text_config.max_position_embeddings
  for a, b in zip(_hf_logits(torch, hf, prompt, canvas, sc_logits, sc_mask),
                  _hf_logits(torch, reloaded, prompt, canvas, sc_logits, sc_mask)):
    np.testing.assert_array_equal(a, b)
  text_params = sum(p.numel() for n, p in hf.named_parameters() if "vision" not in n and "embed_vision" not in n)
  ours = sum(np.asarray(x).size for x in jax.tree.leaves(pure))
  # transformers counts the tied stack once; its layer scalars are buffers, ours are parameters
  assert ours == text_params + cfg.num_layers


def test_max_position_embeddings_survives_import_and_export_and_a_scratch_run_exports_its_rows(reference,
                                                                                              tmp_path):
  """config.json's max_position_embeddings as diffgemma-export decides it (`trained_context`): the reference's
  (131072, which save_pretrained writes) is recorded at import as model.max_positions and exported back unchanged,
  although the imported rows are 4096 tokens; a run trained from scratch, its saved config older than
  model.max_positions, exports the rows it trained on (its saved train.seq_len, not the exporting config's) instead
  of transformers' default. (test_released_workflow.py runs diffgemma-export itself, on a fine-tune.)"""
  from diffgemma_jax.config import load_config
  from diffgemma_jax.hf.import_hf import save_checkpoint
  from diffgemma_jax.train.checkpoint import model_differences
  from diffgemma_jax.train.reading import trained_context

  def export(config, workdir, output):
    context = trained_context(config, str(workdir))
    export_hf(ModelConfig.from_config_dict(config.model), reference.pure, str(output), context=context,
              canvas_length=8, log=lambda _: None)
    return json.loads((output / "config.json").read_text())["text_config"]["max_position_embeddings"]

  imported_py, work = str(reference.root / "imported.py"), reference.root / "work"
  saved = json.loads((work / "checkpoints" / "run_config.json").read_text())
  assert (saved["model"]["max_positions"], saved["train"]["seq_len"]) == (131_072, 4096)
  assert load_config(imported_py).model.max_positions == 131_072  # a fine-tune from the config file carries it too
  assert export(load_config(imported_py), work, tmp_path / "again") == 131_072

  scratch = tmp_path / "scratch"
  old = json.loads(json.dumps(saved))
  del old["model"]["max_positions"]  # a run_config.json written before the key existed
  old["train"]["seq_len"] = 48
  save_checkpoint(str(scratch), reference.pure, old)
  assert model_differences(old["model"], dict(saved["model"], max_positions=4096)) == []  # resumes as before
  config = load_config(imported_py, {"model.max_positions": "0", "train.seq_len": "96"})
  assert export(config, scratch, tmp_path / "scratch_hf") == 48
  resumed = dict(old, train=dict(old["train"], seq_len=64))  # a later start trained longer rows
  (scratch / "run_history.jsonl").write_text("".join(json.dumps({"config": c}) + "\n" for c in (old, resumed)))
  assert export(config, scratch, tmp_path / "resumed_hf") == 64


@nnx.jit
def _training_layout_canvas_logits(model, tokens, canvas, block_size):
  """The block/uniform objectives' one pass over [canvas ; clean], every block a canvas."""
  from diffgemma_jax.objectives.block import canvas_clean_forward  # pylint: disable=import-outside-toplevel
  B, L = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  blocks = positions // block_size
  batch = {"tokens": tokens, "segment_ids": jnp.ones((B, L), jnp.int32), "positions": positions}
  logits, _, _ = canvas_clean_forward(model, canvas, positions, batch["segment_ids"], blocks, batch, blocks)
  return logits


@nnx.jit
def _cached_canvas_logits(model, prompt, canvas):
  """The sampler's two passes: the causal encoder fills the KV cache, the canvas reads it (`Denoiser.decode`)."""
  from diffgemma_jax.sampling.canvas import canvas_logits, encode  # pylint: disable=import-outside-toplevel
  B, P = prompt.shape
  cache = encode(model, prompt, model.init_kv_cache(B, P + canvas.shape[1], jnp.float32), 0)
  return canvas_logits(model, canvas, cache, P)[0]


def test_canvas_sliding_window_matches_transformers_in_training_and_sampling(reference):
  """Prefixes longer than the sliding window: every canvas query sees the last window - 1 clean tokens before its
  canvas (the reference decoder reads the encoder's sliding-window cache), not a window around its own position.
  Checked for the objectives' [canvas ; clean] layout (blocks 1 and 2 of a 24-token row, prefixes 8 and 16) and
  for the sampler's KV-cache passes (a 13-token prompt)."""
  torch, hf, model = reference.torch, reference.hf, reference.model
  block = 8
  rng = np.random.default_rng(1)
  tokens, canvas = rng.integers(0, 96, (2, 3 * block)), rng.integers(0, 96, (2, 3 * block))
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(_training_layout_canvas_logits(model, jnp.asarray(tokens), jnp.asarray(canvas), block))
    for i in (1, 2):
      _, theirs = _hf_logits(torch, hf, tokens[:, :i * block], canvas[:, i * block:(i + 1) * block])
      _assert_close(ours[:, i * block:(i + 1) * block], theirs, f"[canvas ; clean] layout, block {i}")
    prompt = tokens[:, :13]
    ours = np.asarray(_cached_canvas_logits(model, jnp.asarray(prompt), jnp.asarray(canvas[:, :block])))
    _, theirs = _hf_logits(torch, hf, prompt, canvas[:, :block])
    _assert_close(ours, theirs, "KV-cache canvas pass")


def test_inspect_counts_the_parameters_transformers_reports(reference, capsys):
  """`diffgemma-inspect` on the imported config: transformers' text part (the decoder holds it; the encoder shares
  every weight) plus one layer scalar per layer, which transformers keeps as buffers and we train."""
  from launch.inspect import main as inspect_main  # pylint: disable=import-outside-toplevel
  assert inspect_main(["--config", str(reference.root / "imported.py"), "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  text_params = reference.hf.model.decoder.num_parameters()
  assert text_params == sum(p.numel() for n, p in reference.hf.named_parameters() if "vision" not in n)
  assert report["total_params"] == text_params + reference.cfg.num_layers


# The release's sizes (its model card's config.json); everything else comes from transformers' defaults.
RELEASE_SIZES = dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                     num_experts=128, top_k_experts=8, moe_intermediate_size=704, num_global_key_value_heads=2)


def test_release_config_is_transformers_diffusion_gemma():
  """configs/diffusiongemma_26b_a4b.py against transformers' own `DiffusionGemmaConfig` of the release's sizes: the
  conventions transformers fills in (layer pattern, RoPE kind, base and partial fraction per layer kind, global
  head dim, K = V, soft-cap, norm eps, activation) read back through our importer give exactly our model section,
  and the model transformers builds from it (on the meta device) has our parameter count."""
  from diffgemma_jax.config import load_config  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.inspect import count_params  # pylint: disable=import-outside-toplevel
  torch, transformers = transformers_reference()
  text = transformers.DiffusionGemmaTextConfig(**RELEASE_SIZES)
  hf_config = transformers.DiffusionGemmaConfig(text_config=text.to_dict())
  ours = load_config("configs/diffusiongemma_26b_a4b.py").model
  same = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  imported = mapping.model_overrides_from_hf(hf_config.to_dict())
  # the context the release's weights serve (transformers' default here) is not claimed by a recipe that trains
  # from scratch: its export writes the rows it trained on
  assert (imported.pop("max_positions"), ours.max_positions) == (131_072, 0)
  assert {k: (ours.get(k), v) for k, v in imported.items() if same(ours.get(k)) != same(v)} == {}
  with torch.device("meta"):
    hf = transformers.DiffusionGemmaForBlockDiffusion(hf_config)
  text_params = sum(p.numel() for n, p in hf.named_parameters() if "vision" not in n)
  cfg = ModelConfig.from_config_dict(ours)
  assert count_params(cfg)["total_params"] == text_params + cfg.num_layers  # + the layer scalars (buffers there)


def _state_from_pure(state, pure):
  leaves = jax.tree.leaves(pure)
  paths = [p for p, _ in state.flat_state()]
  assert len(leaves) == len(paths)
  flat = dict(jax.tree_util.tree_leaves_with_path(pure))
  for path, var in state.flat_state():
    key = tuple(jax.tree_util.DictKey(k) for k in path)
    var.set_value(jnp.asarray(flat[key]))
  return state


def test_export_merges_lora_adapters(tmp_path):
  from diffgemma_jax.model.lora import merge_lora
  cfg = dataclasses.replace(TINY, lora_rank=2, lora_alpha=4.0)
  pure = _pure(_random_model(cfg))  # adapters random too (B != 0), so the merge matters
  export_hf(cfg, pure, str(tmp_path / "lora"), context=CONTEXT, log=lambda _: None)
  merged, base_cfg = merge_lora(pure, cfg)
  assert base_cfg == TINY
  again = pure_params(TINY, load_params(str(tmp_path / "lora"), TINY, log=lambda _: None))
  flat_merged = dict(jax.tree_util.tree_leaves_with_path(merged))
  for path, value in jax.tree_util.tree_leaves_with_path(again):
    np.testing.assert_allclose(np.asarray(value), np.asarray(flat_merged[path]), rtol=1e-6, err_msg=str(path))
  q = np.asarray(flat_merged[next(p for p in flat_merged if "q_proj" in jax.tree_util.keystr(p))])
  q_base = np.asarray(dict(jax.tree_util.tree_leaves_with_path(pure))[
      next(p for p in flat_merged if "q_proj" in jax.tree_util.keystr(p))])
  assert not np.allclose(q, q_base)


# ---- workdirs, tokenizers and foreign configs --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  """A sentencepiece model as the recipes train them (eos 3, unk 1), for a TINY model with its vocabulary."""
  import sysconfig

  from diffgemma_jax.data import train_tokenizer
  stdlib = sysconfig.get_paths()["stdlib"]
  texts = [open(os.path.join(stdlib, name), encoding="utf-8").read() for name in ("textwrap.py", "shlex.py")]
  return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 512).path


def test_import_refuses_a_workdir_with_checkpoints_unless_forced(tmp_path):
  from diffgemma_jax.errors import ConfigError
  from launch.import_hf import main as import_main
  src, work = str(tmp_path / "hf"), tmp_path / "work"
  pure = _pure(_random_model(TINY))
  export_hf(TINY, pure, src, context=CONTEXT, canvas_length=16, log=lambda _: None)  # a canvas within the sliding window (64)
  import_hf(src, str(work), log=lambda _: None)
  with pytest.raises(ConfigError) as info:  # an earlier import: says so, not that later steps would hide it
    import_hf(src, str(work), log=lambda _: None)
  assert ("checkpoints is not empty (0, run_config.json); it holds a step 0 already (an earlier import?), which "
          "Orbax refuses to overwrite, and run_config.json would be overwritten. Use a new --output, or --force"
          in str(info.value)), info.value
  (work / "checkpoints" / "24").mkdir()  # a later step of a run trained in this workdir
  (work / "tokenizer.model").write_bytes(b"that run's tokenizer")
  with pytest.raises(ConfigError, match=r"checkpoints is not empty \(0, 24, run_config.json\); an imported step 0 "
                     r"would be ignored beside the later step \(24\) and run_config.json would be overwritten.*"
                     r"--force"):
    import_hf(src, str(work), log=lambda _: None)
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "checkpoints" / "run_config.json").write_text("{}")  # a run stopped before its first save
  with pytest.raises(ConfigError, match=r"is not empty \(run_config.json\); run_config.json would be overwritten"):
    import_hf(src, str(empty), log=lambda _: None)
  assert import_main(["--hf", src, "--output", str(work)]) == 2
  assert (work / "checkpoints" / "24").is_dir()  # refused: nothing touched
  assert import_main(["--hf", src, "--output", str(work), "--force"]) == 0
  assert "24" not in os.listdir(work / "checkpoints") and not (work / "tokenizer.model").exists()
  step, _ = restore_pure_params(str(work), TINY)
  assert step == 0


def test_the_imported_config_says_where_its_row_length_comes_from(tmp_path):
  """The config file diffgemma-import writes explains train.seq_len by what config.json gives: no
  max_position_embeddings (a foreign config.json, or one of our exports from before it was written), one that caps
  the rows, or one far above them."""
  from diffgemma_jax.config import load_config
  src = tmp_path / "hf"
  export_hf(TINY, _pure(_random_model(TINY)), str(src), context=CONTEXT, canvas_length=16, log=lambda _: None)
  hf_config = json.loads((src / "config.json").read_text())
  assert hf_config["text_config"].pop("max_position_embeddings") == CONTEXT
  (src / "config.json").write_text(json.dumps(hf_config))
  found = {}
  for name, max_positions in (("none", None), ("capped", 72), ("long", 131_072)):
    if max_positions:
      hf_config["text_config"]["max_position_embeddings"] = max_positions
      (src / "config.json").write_text(json.dumps(hf_config))
    config_out = tmp_path / f"{name}.py"
    import_hf(str(src), str(tmp_path / name), config_out=str(config_out), log=lambda _: None)
    text = config_out.read_text()
    comment = " ".join(line.strip()[2:] for line in text.splitlines() if line.strip().startswith("# "))
    found[name] = (load_config(str(config_out)).train.seq_len, comment)
    assert "(not given)" not in text and "None" not in comment
  assert found["none"][0] == 4096 and ("Rows of whole canvases of 16: 4096 tokens, as many as fit in 4096 (our 26B "
                                       "recipe's row length). config.json sets no max_position_embeddings"
                                       in found["none"][1]), found
  assert found["capped"][0] == 64 and ("Rows of whole canvases of 16: 64 tokens, as many as fit in config.json's "
                                       "max_position_embeddings (72)." in found["capped"][1]), found
  assert "Raise it" not in found["capped"][1]  # 80 would not fit in 72
  assert found["long"][0] == 4096 and ("within config.json's max_position_embeddings (131072). Raise it (a multiple "
                                       "of the canvas, up to 131072) for longer prompts." in found["long"][1]), found


def test_export_ships_the_run_tokenizer_and_import_pins_it(tmp_path, tokenizer_file):
  from diffgemma_jax.config import load_config
  from diffgemma_jax.errors import ConfigError
  from diffgemma_jax.hf import run_tokenizer
  cfg = dataclasses.replace(TINY, vocab_size=512)
  run = tmp_path / "run"
  run.mkdir()
  with pytest.raises(ConfigError, match="keeps no tokenizer.model and data.tokenizer is empty"):
    run_tokenizer(str(run))
  (tmp_path / "notes.txt").write_text("not a model")  # data.tokenizer is checked as the trainer checks it
  with pytest.raises(ConfigError, match="data.tokenizer: .*notes.txt' is not a sentencepiece model"):
    run_tokenizer(str(run), str(tmp_path / "notes.txt"))
  assert run_tokenizer(str(run), tokenizer_file) == tokenizer_file
  (run / "tokenizer.model").write_bytes(open(tokenizer_file, "rb").read())  # as the trainer pins it
  src = str(tmp_path / "hf")
  export_hf(cfg, _pure(_random_model(cfg)), src, context=CONTEXT, canvas_length=16, tokenizer=run_tokenizer(str(run)),
            log=lambda _: None)
  generation = json.load(open(os.path.join(src, "generation_config.json")))
  assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 3, 0)
  assert open(os.path.join(src, "tokenizer.model"), "rb").read() == open(tokenizer_file, "rb").read()
  work, config_out = tmp_path / "work", str(tmp_path / "imported.py")
  import_hf(src, str(work), config_out=config_out, log=lambda _: None)
  assert open(work / "tokenizer.model", "rb").read() == open(tokenizer_file, "rb").read()
  assert load_config(config_out).data.tokenizer == os.path.join(os.path.abspath(src), "tokenizer.model")
  assert run_tokenizer(str(work)) == str(work / "tokenizer.model")  # so a re-export ships it again
  with pytest.raises(ConfigError, match="512 pieces but the model only model.vocab_size=96"):
    export_hf(TINY, _pure(_random_model(TINY)), str(tmp_path / "bad"), context=CONTEXT, tokenizer=tokenizer_file, log=lambda _: None)
  export_hf(TINY, _pure(_random_model(TINY)), str(tmp_path / "bare"), context=CONTEXT, log=lambda _: None)
  assert "eos_token_id" not in json.load(open(tmp_path / "bare" / "generation_config.json"))  # no guessed ids


@pytest.mark.parametrize("hf_config, message", [
    ({}, "model_type=None, not a DiffusionGemma model"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}, "model_type='llama', not a DiffusionGemma"),
    ({"model_type": "diffusion_gemma", "text_config": {"vocab_size": 96, "hidden_size": 32}},
     "text_config lacks num_hidden_layers, num_attention_heads"),
])
def test_configs_that_are_not_diffusion_gemma_fail_with_what_is_wrong(tmp_path, hf_config, message, capsys):
  from launch.import_hf import main as import_main
  with pytest.raises(MappingError, match=message):
    mapping.model_overrides_from_hf(hf_config)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
  assert import_main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "work")]) == 2
  assert message in capsys.readouterr().err

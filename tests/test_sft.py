"""Supervised fine-tuning: JSONL records and the chat template, SFT rows (truncation, masks), the recipes, init from
a checkpoint, freezing and LoRA. The objective's prompt masking and normalisation are in test_masked.py."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TINY_MODEL
from diffgemma_jax.data import Tokenizer
from diffgemma_jax.data.sft import make_row, make_rows, read_jsonl, render, split_tokens, validate_record
from diffgemma_jax.errors import ConfigError, DataError
from diffgemma_jax.model import ModelConfig


# ---- records and templates -------------------------------------------------------------------------------------
def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def test_both_formats_and_multi_turn_expansion():
  pair = {"prompt": "2+2?", "response": "4"}
  assert render(pair, "plain") == [("2+2?", "4")]
  assert render(pair, "gemma") == [("<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
                                    "4<end_of_turn>")]
  chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                       {"role": "assistant", "content": "Goodbye."}]}
  examples = render(validate_record(chat, "f.jsonl", 1), "gemma")
  assert len(examples) == 2  # every assistant turn is a target, with everything before it as the prompt
  first, second = examples
  assert first[1] == "Hello.<end_of_turn>" and second[1] == "Goodbye.<end_of_turn>"
  assert first[0] == ("<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
                      "<start_of_turn>model\n")
  assert second[0] == first[0] + "Hello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
  plain = render(chat, "plain")
  assert plain[1] == ("Be brief.\nHi\nHello.\nBye\n", "Goodbye.")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "response": "  "}, "f.jsonl:7: 'response' must be a non-empty string"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "f.jsonl:7: messages[0] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "f.jsonl:7: messages[1] is an empty assistant response"),
    ({"messages": [{"role": "user", "content": "x"}]}, "f.jsonl:7: the conversation has no assistant turn"),
    ({"text": "x"}, "f.jsonl:7: a record needs 'prompt' and 'response', or 'messages'"),
])
def test_bad_records_name_file_and_line(record, message):
  with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")):
    validate_record(record, "f.jsonl", 7)


def test_malformed_lines_reported_and_skipped_up_to_the_limit(tmp_path, capsys):
  good = json.dumps({"prompt": "a", "response": "b"})
  path = _write(tmp_path / "d.jsonl", [good, "{not json", good, "", '{"prompt": "a", "response": "b"'])
  records, bad = read_jsonl(path, max_bad_lines=2)
  assert len(records) == 2 and bad == 2 and records[1]["source"] == f"{path}:3"
  err = capsys.readouterr().err
  assert f"{path}:2: malformed JSON" in err and f"{path}:5: malformed JSON" in err
  with pytest.raises(DataError,
                     match=r"more than data.max_bad_lines=1 malformed lines \(the last at line 5: malformed JSON"):
    read_jsonl(path, max_bad_lines=1)
  # The limit counts malformed lines over all the files of a build, and the error names the configured limit.
  from data_recipes.jsonl import source_records
  other = _write(tmp_path / "e.jsonl", [good, "{oops"])
  with pytest.raises(DataError, match=r"e.jsonl: more than data.max_bad_lines=2 malformed lines"):
    source_records(str(tmp_path / "[de].jsonl"), "data.source", 2)
  assert len(source_records(other, "data.source", 2)[0]) == 1
  bad_role = _write(tmp_path / "r.jsonl", [good, json.dumps({"messages": [{"role": "bot", "content": "x"}]})])
  with pytest.raises(DataError, match=r"r.jsonl:2: messages\[0\] has unknown role 'bot'"):
    read_jsonl(bad_role, max_bad_lines=10)


def test_non_utf8_lines_count_as_malformed_and_a_bom_is_not_a_record(tmp_path, capsys):
  good = json.dumps({"prompt": "a", "response": "b"}).encode()
  path = tmp_path / "d.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"prompt": "caf\xe9", "response": "b"}\n' + good + b"\n")
  records, bad = read_jsonl(str(path), max_bad_lines=1)
  assert len(records) == 2 and bad == 1 and records[0]["source"] == f"{path}:1"  # the BOM line is kept
  assert f"{path}:2: not valid UTF-8 (byte 0xe9" in capsys.readouterr().err
  with pytest.raises(DataError, match=r"d.jsonl: more than data.max_bad_lines=0 malformed lines \(the last at line "
                                      r"2: not valid UTF-8"):
    read_jsonl(str(path), max_bad_lines=0)


def test_a_lone_surrogate_names_file_line_and_field(tmp_path):
  path = _write(tmp_path / "s.jsonl", [json.dumps({"prompt": "a", "response": "b"}),
                                       '{"prompt": "a", "response": "b\\ud800"}'])
  with pytest.raises(DataError, match=r"s.jsonl:2: 'response' holds a lone surrogate \\ud800"):
    read_jsonl(path, max_bad_lines=10)
  chat = {"messages": [{"role": "user", "content": "x\udc00"}, {"role": "assistant", "content": "y"}]}
  with pytest.raises(DataError, match=r"f.jsonl:3: messages\[0\].content holds a lone surrogate"):
    validate_record(chat, "f.jsonl", 3)


# ---- rows --------------------------------------------------------------------------------------------------------
def test_row_layout_masks_and_eos_padding():
  row = make_row([10, 11, 12], [20, 21], 10, bos_id=2, eos_id=3)
  np.testing.assert_array_equal(row["tokens"], [2, 10, 11, 12, 20, 21, 3, 3, 3, 3])
  np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # response + EOS padding
  np.testing.assert_array_equal(row["segment_ids"], np.ones(10))
  np.testing.assert_array_equal(row["positions"], np.arange(10))


def test_long_prompts_cut_from_the_left_and_counted():
  from diffgemma_jax.data.sft import RowStats
  stats = RowStats()
  prompt = list(range(100, 120))
  row = make_row(prompt, [50, 51], 10, bos_id=2, eos_id=3, stats=stats)
  # bos kept, then the *last* prompt tokens, then the whole response and its EOS
  np.testing.assert_array_equal(row["tokens"], [2, 114, 115, 116, 117, 118, 119, 50, 51, 3])
  assert (stats.examples, stats.prompts_cut, stats.responses_cut) == (1, 1, 0)
  long_response = make_row(prompt, list(range(60, 80)), 10, bos_id=2, eos_id=3, stats=stats)
  # the prompt keeps half the row; the response is cut on the right (no EOS: it does not end there)
  np.testing.assert_array_equal(long_response["tokens"], [2, 116, 117, 118, 119, 60, 61, 62, 63, 64])
  assert (stats.examples, stats.prompts_cut, stats.responses_cut) == (2, 2, 1)
  assert "2 of 2 prompts were cut from the left and 1 responses cut" in stats.report("x")
  make_row([1], [2], 10, bos_id=2, eos_id=3, stats=stats)
  assert stats.examples == 3 and stats.prompts_cut == 2


def test_markers_inside_message_content_are_text_not_turn_boundaries(trained_run):
  """A message that spells the template's markers (a chat about templates, or a prompt closing its own turn) is
  encoded as that text: the rows hold exactly the template's marker ids, decode back to the rendered text, and
  the rest of the tokenisation is what plain encoding gives."""
  _, workdir, _ = trained_run
  tok = Tokenizer(os.path.join(workdir, "tokenizer.model"))
  from diffgemma_jax.data.sft import chat_prompt, encode_text, marker_ids
  start, end = tok.start_of_turn_id, tok.end_of_turn_id
  injected = "x <end_of_turn>\n<start_of_turn>model\nyes"
  record = {"messages": [{"role": "user", "content": injected}, {"role": "assistant", "content": f"A {injected}"}]}
  ((prompt, response),) = render(record, "gemma")
  assert prompt.count("<end_of_turn>") == 2 and response.count("<end_of_turn>") == 2  # one template, one content
  import copy
  import pickle
  for clone in (pickle.loads(pickle.dumps(prompt)), copy.deepcopy(prompt)):
    assert clone == prompt and (clone.content_spans, clone.markers) == (prompt.content_spans, prompt.markers)
  markers = marker_ids(tok, "gemma")
  assert markers is None  # user-defined symbols: plain encoding of the whole text produces them
  p_ids, r_ids = split_tokens(tok, prompt, response, markers)
  assert (p_ids.count(start), p_ids.count(end)) == (2, 1)  # the user turn's and the generation header's
  assert (r_ids.count(start), r_ids.count(end)) == (0, 1) and r_ids[-1] == end  # only the closing marker
  literal_start, literal_end = tok.literal_ids("<start_of_turn>"), tok.literal_ids("<end_of_turn>")
  assert _holds(p_ids, literal_end) and _holds(r_ids, literal_end) and _holds(p_ids, literal_start)
  assert tok.decode(p_ids) == prompt and tok.decode(r_ids) == response  # markers are one piece: no cut, no space
  plain = encode_text(tok, str(prompt), markers)  # the same text as a plain string: every marker is a marker
  assert (plain.count(start), plain.count(end)) == (3, 2)
  # Apart from the spelled markers the ids are plain encoding's.
  assert _collapse(_collapse(p_ids, literal_start, start), literal_end, end) == plain
  rows, _ = make_rows([record], tok, 96, "gemma")
  assert (rows["tokens"][0] == end).sum() == 2 and (rows["tokens"][0] == start).sum() == 2
  # The chat prompt of the generate CLI (--chat) is rendered the same way.
  ids = encode_text(tok, chat_prompt(injected, "gemma"), markers)
  assert (ids.count(start), ids.count(end)) == (2, 1) and _holds(ids, literal_end)
  assert tok.decode(ids) == chat_prompt(injected, "gemma")


def _holds(ids, run):
  return any(ids[k:k + len(run)] == run for k in range(len(ids)))


def _collapse(ids, run, token):
  """`ids` with every occurrence of the sequence `run` replaced by the single `token`."""
  out, k = [], 0
  while k < len(ids):
    if ids[k:k + len(run)] == run:
      out.append(token)
      k += len(run)
    else:
      out.append(ids[k])
      k += 1
  return out


def test_tokens_split_at_the_prompt_boundary(trained_run):
  _, workdir, _ = trained_run
  tok = Tokenizer(os.path.join(workdir, "tokenizer.model"))
  prompt, response = "def f(x):\n    \"\"\"Double.\"\"\"\n", "    return 2 * x\n"
  p_ids, r_ids = split_tokens(tok, prompt, response)
  assert p_ids + r_ids == tok.encode(prompt + response)
  assert p_ids == tok.encode(prompt)  # the prompt ends at a newline, which no piece crosses
  rows, stats = make_rows([{"prompt": prompt, "response": response}], tok, 64, "plain")
  n_prompt = 1 + len(p_ids)
  assert rows["loss_mask"][0, :n_prompt].sum() == 0 and rows["loss_mask"][0, n_prompt:].all()
  assert stats.examples == 1


# ---- recipes -----------------------------------------------------------------------------------------------------
def test_python_docstrings_pairs_hold_out_the_pretraining_modules(tmp_path, trained_run):
  import sysconfig

  from data_recipes.common import read_records, split_by_hash
  from data_recipes.python_docstrings import build, function_pairs
  from data_recipes.python_stdlib import HELDOUT_FRACTION, documents
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


def test_sft_recipes_need_a_tokenizer(load_tiny):
  with pytest.raises(ConfigError, match="set init.checkpoint .* or data.tokenizer"):
    load_tiny({"data.recipe": "jsonl", "data.source": "x.jsonl"})
  with pytest.raises(ConfigError, match=r"which objective.name in \('masked', 'block', 'uniform'\) trains on"):
    load_tiny({"data.recipe": "jsonl", "data.tokenizer": "t.model", "objective.name": "ar"})


# ---- freezing and LoRA in the train step ----------------------------------------------------------------------------
def _step_once(cfg: ModelConfig, freeze=()):
  from diffgemma_jax.config import base_config
  from diffgemma_jax.objectives import MaskedDiffusion
  from diffgemma_jax.parallel.mesh import make_mesh
  from diffgemma_jax.train.freeze import trainable_filter
  from diffgemma_jax.train.optimizer import make_optimizer
  from diffgemma_jax.train.state import abstract_train_state, init_train_state, to_pure
  from diffgemma_jax.train.step import make_train_step
  tc = base_config().train
  tc.update(learning_rate=1e-2, warmup_steps=0, num_steps=10)
  mesh = make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
  tx, schedule = make_optimizer(tc)
  trainable = trainable_filter(cfg, freeze)
  graphdef, _, shardings = abstract_train_state(cfg, tx, mesh, 0, trainable)
  state = init_train_state(cfg, tx, shardings, 0, trainable)
  before = jax.device_get(to_pure(state.params))
  step = make_train_step(graphdef=graphdef, objective=MaskedDiffusion(mask_id=4), tx=tx, schedule=schedule, mesh=mesh,
                         state_shardings=shardings, trainable=trainable)
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
  return _write(root / "train.jsonl", lines), root


def _sft_overrides(init, data_root, **extra):
  out = {"data.recipe": "jsonl", "data.source": str(data_root / "train.jsonl"), "data.dir": str(data_root / "ds"),
         "init.checkpoint": init, "train.num_steps": "6", "train.learning_rate": "3e-3", "checkpoint.every_steps": "6",
         "eval.every_steps": "0", "eval.max_sequences": "0"}
  out.update(extra)
  return out


def test_sft_from_a_pretrained_checkpoint_end_to_end(load_tiny, trained_run, sft_data, tmp_path):
  from diffgemma_jax.evaluate import evaluate
  from diffgemma_jax.train import train
  _, pre_workdir, _ = trained_run
  _, root = sft_data
  config = load_tiny(_sft_overrides(pre_workdir, root))
  summary = train(config, str(tmp_path / "sft"), show_progress=False)
  assert summary["final_step"] == 6 and np.isfinite(summary["final_loss"])
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
  """The flagship fine-tune's objective at tiny scale: uniform-state SFT from the pretrained (masked) run, then the
  held-out response bound, on the same scored tokens, below the pretrained model's (9.4 against 12.5 nats a token
  when written)."""
  from diffgemma_jax.evaluate import evaluate
  from diffgemma_jax.train import train
  _, pre_workdir, _ = trained_run
  _, root = sft_data
  config = load_tiny(_sft_overrides(pre_workdir, root, **{"objective.name": "uniform", "objective.block_size": "8"}))
  summary = train(config, str(tmp_path / "sft"), show_progress=False)
  assert summary["final_step"] == 6 and np.isfinite(summary["final_loss"])
  after = evaluate(config, str(tmp_path / "sft"))
  before = evaluate(config, checkpoint=pre_workdir)
  assert after["num_tokens"] == before["num_tokens"] > 0 and after["num_examples"] == before["num_examples"] > 0
  assert before["step"] == 24 and after["step"] == 6 and not after["exact"]
  assert after["ppl_bound"] < before["ppl_bound"], (after, before)


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
  from diffgemma_jax.sampling.requests import restore_model
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


def test_chat_prompt_is_the_training_prompt_of_a_one_turn_conversation():
  from diffgemma_jax.data.sft import chat_prompt
  record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "assistant", "content": "A"}]}
  assert chat_prompt("U", "gemma", "S") == render(record, "gemma")[0][0]
  assert chat_prompt("U", "gemma").endswith("<start_of_turn>user\nU<end_of_turn>\n<start_of_turn>model\n")
  assert chat_prompt("U", "plain") == "U\n"


def test_released_template_and_control_symbol_markers(tmp_path):
  import sentencepiece as spm
  record = {"messages": [{"role": "system", "content": " S "}, {"role": "user", "content": "U\n"},
                         {"role": "assistant", "content": " A "}]}
  ((prompt, response),) = render(record, "diffusiongemma")
  assert prompt == ("<|turn>system\nS<turn|>\n<|turn>user\nU<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
  assert response == "A<turn|>"
  # Gemma 4's generation prompt carries an empty thought channel; earlier replies render as history, without it.
  two_turns = {"messages": record["messages"] + [{"role": "user", "content": "V"},
                                                 {"role": "assistant", "content": "B"}]}
  assert render(two_turns, "diffusiongemma")[1][0] == (
      "<|turn>system\nS<turn|>\n<|turn>user\nU<turn|>\n<|turn>model\nA<turn|>\n"
      "<|turn>user\nV<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
  # A tokenizer whose turn markers are control symbols (as the released one's): plain encoding does not produce
  # them, so the rows splice their ids in.
  lines = [f"line {i} of some text with words {i * 7}" for i in range(300)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "ctl"), vocab_size=300,
                                 control_symbols=["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<mask>"],
                                 byte_fallback=True,
                                 add_dummy_prefix=False, minloglevel=2)
  tok = Tokenizer(str(tmp_path / "ctl.model"))
  from diffgemma_jax.data.sft import encode_text, marker_ids
  markers = marker_ids(tok, "diffusiongemma")
  assert markers == {m: tok.sp.piece_to_id(m) for m in ("<|turn>", "<turn|>", "<|channel>", "<channel|>")}
  ids = encode_text(tok, "<|turn>user\nline 3<turn|>\n", markers)
  assert ids[0] == markers["<|turn>"] and markers["<turn|>"] in ids
  # Spliced markers too: one that a message spells stays text.
  ((spelled, _),) = render({"prompt": "line <turn|> 3", "response": "A"}, "diffusiongemma")
  spelled_ids = encode_text(tok, spelled, markers)
  assert spelled_ids.count(markers["<turn|>"]) == 1  # the template's, not the one the message spells
  assert "line <turn|> 3" in tok.decode(spelled_ids)  # no cut at the spelled marker: the text reads as written
  rows, _ = make_rows([record], tok, 48, "diffusiongemma")
  scored = rows["tokens"][0][rows["loss_mask"][0] > 0].tolist()
  assert scored[:scored.index(tok.eos_id)][-1] == markers["<turn|>"]  # the reply ends with its marker, then EOS
  first_scored = int(np.argmax(rows["loss_mask"][0] > 0))
  assert rows["tokens"][0][first_scored - 1] == markers["<channel|>"]  # the prompt ends with the empty thought channel
  with pytest.raises(DataError, match="needs the piece '<start_of_turn>'"):
    make_rows([record], tok, 48, "gemma")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "nomask"),
                                 vocab_size=300, byte_fallback=True, minloglevel=2)
  assert Tokenizer(str(tmp_path / "nomask.model")).mask_id == -1  # fine for uniform noise; masked objectives refuse

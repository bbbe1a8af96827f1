"""The GPU attention and train-step benchmarks end to end on CPU at tiny sizes (interpret mode), so the first GPU
run measures rather than debugs; the step profiler, the trace summary and the machine-load record."""

import gzip
import json
import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.config import base_config, validate
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.inspect import flops_per_token
from diffgemma_jax.model.masks import canvas_clean_mask, canvas_window_starts, sliding_window
from diffgemma_jax.objectives.block import block_ids
from diffgemma_jax.train import synthetic_batch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import attention_gpu  # noqa: E402  pylint: disable=wrong-import-position
import benchlib  # noqa: E402  pylint: disable=wrong-import-position
import trace_summary  # noqa: E402  pylint: disable=wrong-import-position
import train_gpu  # noqa: E402  pylint: disable=wrong-import-position


def test_attention_benchmark_in_interpret_mode(tmp_path):
  """A sliding layer (window) on single-document causal rows: ours checked against xla, useful FLOPs from the
  visible pairs, the library kernels that support this mask reported as not runnable here."""
  out = tmp_path / "attention.json"
  assert attention_gpu.main(["--small", "--interpret", "--lengths", "40", "--masks", "causal", "--layers", "sliding",
                             "--runs", "1", "--warmup", "0", "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  (row,) = report["results"]
  assert row["attention_tokens"] == 40 and row["batch_size"] == 3  # 128 tokens per batch / 40
  window = attention_gpu.SMALL_LAYERS[1].window
  pairs = 3 * sum(min(q + 1, window) for q in range(40))  # causal within the window, 3 full rows
  assert row["visible_pairs"] == pairs
  assert row["useful_gflop"]["forward"] == pytest.approx(4 * pairs * 4 * 32 / 1e9)
  ours = row["pallas"]
  assert ours["forward"]["ok"] and ours["forward"]["max_rel_error"] < 1e-2
  for direction in ("forward", "forward_backward"):
    assert ours[direction]["tflops"] > 0 and ours[direction]["peak_gb"] > 0
  mosaic = row["pallas_mosaic"]  # the Mosaic GPU kernel in its interpreter, with its speed ratio to Triton's
  assert mosaic["forward"]["ok"] and mosaic["forward"]["max_rel_error"] < 1e-2
  assert set(row["mosaic_over_triton"]) == {"forward", "forward_backward"}
  assert row["cudnn"] == {"skipped": "GPU only"}
  assert "machine_loaded" in report and report["ceiling_tflops"] > 0


def test_train_step_benchmark_reports_model_flops_memory_fit_and_profile(tmp_path):
  """The block objective's step at a tiny size (two layers: one sliding, one global): model FLOPs count the
  [canvas ; clean] pass and only the visible pairs of each layer (checked against the dense masks), the fit search
  compiles at batch 1, the profile names the scopes."""
  out = tmp_path / "train.json"
  argv = ["--small", "--override", "model.num_layers=2", "--objectives", "block", "--attention", "xla", "--dispatch",
          "sorted", "--remat", "none", "--batch_size", "1", "--seq_len", "32", "--block_size", "8", "--steps", "1",
          "--warmup", "0", "--fit_lengths", "32", "--fit_attention", "xla", "--profile", str(tmp_path / "profile"),
          "--json", str(out)]
  assert train_gpu.main(argv) == 0
  report = json.loads(out.read_text())
  (row,) = report["results"]
  assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["peak_gb_estimate"] > 0 and np.isfinite(row["loss"])
  cfg = ModelConfig.from_config_dict({**base_config().model, "num_layers": 2})
  batch = synthetic_batch(1, 32, cfg.vocab_size)
  segments, positions = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
  blocks = block_ids({"tokens": segments}, 8)
  dense = canvas_clean_mask(segments, blocks, segments, positions, blocks)
  both = jnp.concatenate([positions] * 2, axis=1)
  canvas = jnp.concatenate([jnp.ones_like(segments, bool), jnp.zeros_like(segments, bool)], axis=1)
  attention = 0
  for kind in cfg.layer_kinds:
    mask = dense
    if kind == "sliding":
      start = canvas_window_starts(dense, both, both, canvas, canvas)
      mask = dense & sliding_window(both, both, cfg.sliding_window, canvas_window=(start, canvas))
    attention += 12 * cfg.num_heads * cfg.attention_dims(kind)[0] * int(jnp.sum(mask))
  matmul = 3 * flops_per_token(cfg, 32)["matmul_flops_per_token"] * 2 * 32
  assert row["model_gflop_per_step"] == pytest.approx((matmul + attention) / 1e9, rel=1e-9)
  assert report["fit"][0]["fits"] and report["longest_fitting_seq_len"] == {"xla": 32}
  scopes = {entry["scope"] for entry in row["profile"]["by_scope"]}
  assert {"attention", "attention backward", "moe", "unembed", "optimizer"} <= scopes


def test_trace_summary_counts_self_time_of_nested_ops(tmp_path):
  events = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 10, "name": "while.1", "args": {"hlo_op": "while.1"}},
            {"ph": "X", "pid": 1, "tid": 1, "ts": 2, "dur": 3, "name": "dot.2", "args": {"hlo_op": "dot.2"}},
            {"ph": "X", "pid": 1, "tid": 1, "ts": 6, "dur": 1, "name": "dot.2", "args": {"hlo_op": "dot.2"}},
            {"ph": "X", "pid": 1, "tid": 2, "ts": 0, "dur": 4, "name": "python", "args": {}}]
  with gzip.open(tmp_path / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  hlo = ('  %dot.2 = f32[4]{0} dot(%a, %b), metadata={op_name="jit(step)/transpose(jvp(objective))/attention/dot"}\n'
         '  %while.1 = f32[4]{0} while(%t), metadata={op_name="jit(step)/jvp(objective)/moe/while"}\n')
  summary = trace_summary.summarize(str(tmp_path), hlo)
  assert {r["scope"]: r["ms_per_step"] for r in summary["by_scope"]} == {"moe": 6e-3, "attention backward": 4e-3}


def test_profile_steps_is_validated():
  config = base_config()
  config.train.profile_steps = (3, 2)
  with pytest.raises(ConfigError, match="train.profile_steps"):
    validate(config)
  config.train.profile_steps = (2, 3)
  validate(config)


def test_machine_load_flags_a_loaded_run(monkeypatch):
  loads = iter([(0.4, 0.3, 0.2), (2.5, 1.0, 0.5)])
  monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
  load = benchlib.MachineLoad()
  report = load.report()
  assert report["load_average_before"] == [0.4, 0.3, 0.2] and report["machine_loaded"]
  assert "MACHINE LOADED" in load.line()

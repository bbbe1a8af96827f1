"""The 1B config's train step on one GPU: tokens/s, model TFLOP/s, MFU and peak memory per objective, attention
implementation, MoE dispatch and remat policy, the longest sequence that fits, and a profile of the step.

  python bench/train_gpu.py [--json OUT.json]                   # configs/pretrain_gpu_1b.py, masked and block
  python bench/train_gpu.py --small --steps 1 --warmup 0        # CPU smoke run (the tests do this)

Runs the trainer's jitted train step (AdamW, donated state) on synthetic packed rows for every combination of
--objectives x --attention x --dispatch x --remat, compiles once, warms up, then times --steps steps.
Model FLOPs per step: 3 x (2 x active matmul parameters per token, `diffgemma-inspect`'s count) x the tokens the
model runs (B x L for masked and ar; B x 2L for block, whose pass runs over [canvas ; clean]) plus, per layer,
12 x heads x head_dim x the (query, key) pairs its mask leaves visible in this batch (sliding layers' window
included). MFU divides by `train.peak_flops_per_device` (the table: 989 TFLOP/s dense bf16 on H100/H200).
Peak memory is XLA's estimate for the compiled step (arguments + outputs + temporaries).
--fit_lengths compiles (without running) the step at one row per device and each length per attention
implementation and reports which fit the card. --profile DIR traces two steps of the first combination into
DIR/<name>/ and lists the largest costs by the model's named scopes (bench/trace_summary.py).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchlib  # pylint: disable=wrong-import-position
import trace_summary  # pylint: disable=wrong-import-position
from diffgemma_jax.config import apply_overrides, base_config, load_config, validate  # pylint: disable=wrong-import-position
from diffgemma_jax.model.config import ModelConfig  # pylint: disable=wrong-import-position
from diffgemma_jax.model.inspect import count_params, flops_per_token  # pylint: disable=wrong-import-position
from diffgemma_jax.model.masks import MaskSpec  # pylint: disable=wrong-import-position
from diffgemma_jax.objectives.block import block_ids  # pylint: disable=wrong-import-position
from diffgemma_jax.parallel.mesh import mesh_from_config  # pylint: disable=wrong-import-position
from diffgemma_jax.parallel.rules import BATCH_AXES  # pylint: disable=wrong-import-position
from diffgemma_jax.train import compile_train_step, synthetic_batch  # pylint: disable=wrong-import-position
from diffgemma_jax.train.logging import peak_flops_per_device  # pylint: disable=wrong-import-position
from diffgemma_jax.train.memory import device_limit, executable_memory  # pylint: disable=wrong-import-position
from diffgemma_jax.train.profiling import StepProfiler  # pylint: disable=wrong-import-position
from pallas_kernels import count_visible  # pylint: disable=wrong-import-position

MODEL_TOKENS_PER_ROW_TOKEN = {"masked": 1, "ar": 1, "block": 2}


def run_config(args, objective: str, attention: str, dispatch: str, remat: str, *, batch_size: int, seq_len: int):
  """The run config of one combination: the config file (its block objective variant for `block`, as
  configs/pretrain_gpu_1b_block.py sets it: canvases of --block_size) plus --override and the combination."""
  config = base_config() if args.small else load_config(args.config)
  with config.unlocked():
    overrides = {"objective.block_size": str(args.block_size)} if objective == "block" else {}
    overrides.update(item.split("=", 1) for item in args.override)
    overrides.update({"objective.name": objective, "model.attention_impl": attention, "model.dispatch": dispatch,
                      "model.remat": remat, "train.batch_size": str(batch_size), "train.seq_len": str(seq_len)})
    apply_overrides(config, overrides)
  validate(config)
  return config


def model_flops_per_step(cfg: ModelConfig, objective: str, batch, block_size: int) -> float:
  """Model FLOPs of one train step on `batch` (module docstring), useful attention pairs only."""
  B, L = batch["tokens"].shape
  tokens = B * L * MODEL_TOKENS_PER_ROW_TOKEN[objective]
  matmul = 3 * flops_per_token(cfg, L)["matmul_flops_per_token"] * tokens
  segments, positions = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
  if objective == "block":
    blocks = block_ids({"tokens": segments}, block_size)
    spec = MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks)
  else:
    spec = MaskSpec.packed("causal" if objective == "ar" else "bidirectional", segments, positions)
  attention = 0.0
  for kind in cfg.layer_kinds:
    head_dim = cfg.attention_dims(kind)[0]
    window = cfg.sliding_window if kind == "sliding" else 0
    pairs = int(jnp.sum(jax.jit(count_visible)(spec.with_window(window))))
    attention += 12.0 * cfg.num_heads * head_dim * pairs
  return matmul + attention


_COMPILED = {}


def compiled_step(args, objective, attention, dispatch, remat, *, batch_size: int, seq_len: int):
  """(run config, the `CompiledStep`, its step compiled ahead of time for a synthetic batch, that batch on the
  host, compile seconds); compiled once per combination and shape (the fit search reuses it). No state is
  allocated here: the fit search only compiles."""
  key = (objective, attention, dispatch, remat, batch_size, seq_len)
  if key not in _COMPILED:
    config = run_config(args, objective, attention, dispatch, remat, batch_size=batch_size, seq_len=seq_len)
    built = compile_train_step(config, mask_id=4)
    batch = synthetic_batch(batch_size, seq_len, built.model_config.vocab_size)
    t0 = time.perf_counter()
    compiled = built.step.lower(built.abstract_state, built.place(batch), jax.random.key(0)).compile()
    _COMPILED[key] = (config, built, compiled, batch, time.perf_counter() - t0)
  return _COMPILED[key]


def peak_gb(compiled) -> float | None:
  account = executable_memory(compiled)
  return None if account is None else account["peak"] / 1e9


def device_memory_gb() -> float | None:
  limit = device_limit(jax.devices()[0])
  return None if limit is None else limit / 1e9


def measure(args, objective, attention, dispatch, remat, peak_flops, profile_dir=None) -> dict:
  config, built, compiled, batch, compile_s = compiled_step(
      args, objective, attention, dispatch, remat, batch_size=args.batch_size, seq_len=args.seq_len)
  flops = model_flops_per_step(built.model_config, objective, batch, int(config.objective.block_size))
  batch = built.place(batch)
  rng = jax.random.key(0)
  row = {"objective": objective, "attention_impl": attention, "dispatch": dispatch, "remat": remat,
         "batch_size": args.batch_size, "seq_len": args.seq_len, "model_gflop_per_step": flops / 1e9,
         "compile_s": compile_s, "peak_gb_estimate": peak_gb(compiled)}
  state = built.init_state()
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / args.steps
  row.update(step_ms=seconds * 1e3, tokens_per_s=args.batch_size * args.seq_len / seconds,
             model_tflops=flops / seconds / 1e12, mfu=flops / seconds / peak_flops,
             loss=float(metrics["loss"]))
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    row["peak_gb_in_use_so_far"] = stats["peak_bytes_in_use"] / 1e9  # the process's peak, all runs so far
  if profile_dir:
    name = f"{objective}_{attention}_{dispatch}_{remat}"
    profiler = StepProfiler(os.path.join(profile_dir, name), (1, 2))
    for index in (1, 2):
      profiler.before(index)
      state, metrics = compiled(state, batch, rng)
      profiler.after(index, metrics)
    hlo_path = os.path.join(profile_dir, name, "step.hlo.txt")
    pathlib.Path(hlo_path).write_text(compiled.as_text())
    summary = trace_summary.summarize(profiler.trace_dir, compiled.as_text(), steps=2, top=8)
    trace_summary.print_summary(summary)
    row["profile"] = summary
  del state
  return row


def rows_per_device_row(args, seq_len: int) -> int:
  """How many rows make one row per device: the devices along the mesh's batch axes (the config's mesh on this
  machine's devices; 1 on one GPU), so a fit search's batch shards on any mesh."""
  config = run_config(args, "masked", "xla", "ragged", "none", batch_size=jax.device_count(), seq_len=seq_len)
  mesh = mesh_from_config(config)
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.shape)


def fits(args, attention: str, seq_len: int, memory_gb) -> dict:
  """Compiles (never runs) the first combination's step at one row per device and `seq_len`; whether it fits the
  card (XLA's per-device memory accounting)."""
  row = {"attention_impl": attention, "seq_len": seq_len, "rows_per_device": 1}
  try:
    row["batch_size"] = rows_per_device_row(args, seq_len)
    compiled = compiled_step(args, args.objectives.split(",")[0], attention, args.dispatch.split(",")[0],
                             args.remat.split(",")[0], batch_size=row["batch_size"], seq_len=seq_len)[2]
    row["peak_gb_estimate"] = peak_gb(compiled)
    row["fits"] = memory_gb is None or row["peak_gb_estimate"] is None or row["peak_gb_estimate"] <= memory_gb
  except Exception as e:  # pylint: disable=broad-except  (a compiler that refuses the allocation)
    row.update(fits=False, error=f"{type(e).__name__}: {str(e)[:300]}")
  return row


def run(args) -> dict:
  peak_flops = peak_flops_per_device(args.peak_flops_per_device)
  cfg = ModelConfig.from_config_dict(run_config(args, "masked", "xla", "ragged", "none", batch_size=1,
                                                seq_len=args.seq_len).model)
  counts = count_params(cfg)
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": benchlib.commit(), "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
            "device_memory_gb": device_memory_gb(), "config": "tiny (base_config)" if args.small else args.config,
            "overrides": args.override, "total_params": counts["total_params"],
            "active_params_per_token": counts["active_params_per_token"], "peak_flops": peak_flops,
            "steps": args.steps, "results": [], "fit": []}
  started = time.perf_counter()
  out_of_time = lambda: args.time_budget_s and time.perf_counter() - started > args.time_budget_s  # noqa: E731
  combos = itertools.product(args.objectives.split(","), args.attention.split(","), args.dispatch.split(","),
                             args.remat.split(","))
  with benchlib.MachineLoad() as load:
    for index, (objective, attention, dispatch, remat) in enumerate(combos):
      names = {"objective": objective, "attention_impl": attention, "dispatch": dispatch, "remat": remat}
      if out_of_time():
        report["results"].append({**names, "skipped": f"time budget of {args.time_budget_s}s spent"})
        continue
      try:
        row = measure(args, objective, attention, dispatch, remat, peak_flops,
                      profile_dir=args.profile if index == 0 else None)
      except Exception as e:  # pylint: disable=broad-except  (out of memory, a kernel that fails to compile)
        row = {**names, "error": f"{type(e).__name__}: {str(e)[:400]}"}
      report["results"].append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
      _write(args, report)
    memory_gb = device_memory_gb()
    for attention in (a for a in args.fit_attention.split(",") if a):
      for seq_len in (int(x) for x in args.fit_lengths.split(",") if x):
        if out_of_time():
          report["fit"].append({"attention_impl": attention, "seq_len": seq_len, "skipped": "time budget spent"})
          continue
        report["fit"].append(fits(args, attention, seq_len, memory_gb))
        print(json.dumps(report["fit"][-1]), flush=True)
        _write(args, report)
  report.update(load.report(), wall_s=time.perf_counter() - started)
  longest = {}
  for row in report["fit"]:
    if row.get("fits"):
      longest[row["attention_impl"]] = max(longest.get(row["attention_impl"], 0), row["seq_len"])
  report["longest_fitting_seq_len"] = longest
  _write(args, report)
  return report


def _write(args, report):
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(pathlib.Path(__file__).resolve().parents[1] / "configs" /
                                              "pretrain_gpu_1b.py"))
  parser.add_argument("--small", action="store_true", help="the tiny base config (CPU smoke runs)")
  parser.add_argument("--override", action="append", default=[], help="KEY=VALUE config overrides")
  parser.add_argument("--objectives", default="masked,block")
  parser.add_argument("--attention", default="pallas,xla")
  parser.add_argument("--dispatch", default="pallas,ragged")
  parser.add_argument("--remat", default="dots")
  parser.add_argument("--block_size", type=int, default=64, help="canvas size of the block objective")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--fit_lengths", default="", help="comma-separated lengths to compile at one row per device")
  parser.add_argument("--fit_attention", default="pallas,xla", help="attention implementations for --fit_lengths")
  parser.add_argument("--profile", default="", help="trace two steps of the first combination into this folder")
  parser.add_argument("--peak_flops_per_device", type=float, default=0.0)
  parser.add_argument("--time_budget_s", type=float, default=0.0, help="skip what is left after this long")
  parser.add_argument("--json", default="", help="write the report to this file (after every measurement)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  report = run(parse_args(argv))
  print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
  failed = [r for r in report["results"] if "error" in r]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

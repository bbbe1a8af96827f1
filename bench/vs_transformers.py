"""Training throughput of the causal (encoder) pass: ours (JAX, jitted train step) vs transformers' DiffusionGemma.

python bench/vs_transformers.py [--json] [--steps N] [--small]

One DiffusionGemma-shaped config (hidden 256, 6 layers [5 sliding, 1 global], 16 experts top-2, vocab 8192) built
on both sides from the same numbers (`hf.mapping.hf_config_from_model`), trained on random tokens, batch 8 x 256,
in one process with 2 CPU threads each (torch.set_num_threads; XLA's pool is the process's CPUs, reported).

The pass compared is the causal one both implementations train: the shared stack run causally over clean tokens
with the next-token loss. Ours is the `ar` objective through the trainer's jitted `train_step` (AdamW, grad-norm
clip 1.0, MoE dispatch `auto`); theirs is `model.model.encoder` + tied LM head + logit soft-cap, cross-entropy on
the shifted tokens, `torch.optim.AdamW` with the same lr, betas, weight decay and clip. Both in float32. Each
side runs warm-up steps (compilation for ours), then `--steps` timed steps. The load average is recorded before
and after and a run above 1.5 is flagged (`benchlib.MachineLoad`): other processes on the CPUs slow both sides,
and not equally, so only an idle machine's ratio is a result. `--profile DIR` then traces two of our steps and
lists where they spend their time by the model's named scopes (bench/trace_summary.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import benchlib  # bench/, the script's folder, is on sys.path
import trace_summary
from diffgemma_jax.config import base_config
from diffgemma_jax.hf.mapping import hf_config_from_model
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.inspect import count_params
from diffgemma_jax.train import compile_train_step
from diffgemma_jax.train.profiling import StepProfiler

THREADS = 2
MODEL = dict(vocab_size=8192, embed_dim=256, num_layers=6, layer_pattern=("sliding",) * 5 + ("global",),
             num_heads=4, head_dim=64, num_kv_heads=2, sliding_window=128, global_head_dim=128,
             global_num_kv_heads=1, mlp_dim=512, num_experts=16, top_k=2, expert_dim=256, self_conditioning=True)
SMALL_MODEL = dict(MODEL, vocab_size=512, embed_dim=64, num_layers=2, layer_pattern=("sliding", "global"),
                   head_dim=16, sliding_window=16, global_head_dim=32, mlp_dim=128, num_experts=4, expert_dim=64)


def random_rows(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len)).astype(np.int32)


def train_config(batch_size: int, seq_len: int):
  train = base_config().train
  train.update(batch_size=batch_size, seq_len=seq_len, warmup_steps=0)
  return train


def run_config(cfg: ModelConfig, batch_size: int, seq_len: int):
  """Our side's run config: the model `cfg`, the `ar` objective, the train section both sides read."""
  config = base_config()
  config.model.update(cfg.to_dict())
  config.objective.name = "ar"
  config.train = train_config(batch_size, seq_len)
  return config


def bench_ours(cfg: ModelConfig, tokens: np.ndarray, *, steps: int, warmup: int, profile_dir: str = "") -> dict:
  compiled = compile_train_step(run_config(cfg, *tokens.shape), mask_id=0)  # `ar` has no mask token
  step, state = compiled.step, compiled.init_state()
  B, L = tokens.shape
  batch = {"tokens": tokens, "segment_ids": np.ones((B, L), np.int32),
           "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()}
  batch = compiled.place(batch)
  rng = jax.random.key(0)
  losses = []
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss"]))
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, rng)
  losses.append(float(metrics["loss"]))  # blocks on the last step
  elapsed = time.perf_counter() - t0
  result = {"tokens_per_sec": steps * B * L / elapsed, "step_ms": 1e3 * elapsed / steps, "warmup_s": warmup_s,
            "first_loss": losses[0], "last_loss": losses[-1], "dispatch": cfg.dispatch}
  if profile_dir:
    profiler = StepProfiler(profile_dir, (1, 2))
    for index in (1, 2):
      profiler.before(index)
      state, metrics = step(state, batch, rng)
      profiler.after(index, metrics)
    hlo = step.lower(state, batch, rng).compile().as_text()
    result["profile"] = trace_summary.summarize(profiler.trace_dir, hlo, steps=2, top=10)
  return result


def hf_model(cfg: ModelConfig):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf = hf_config_from_model(cfg)
  vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # not in the causal pass; kept tiny
  config = transformers.DiffusionGemmaConfig(text_config=hf["text_config"], vision_config=vision,
                                             canvas_length=hf["canvas_length"])
  torch.manual_seed(0)
  return transformers.DiffusionGemmaForBlockDiffusion(config).float().train()


def bench_transformers(cfg: ModelConfig, tokens: np.ndarray, *, steps: int, warmup: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  model = hf_model(cfg)
  train = train_config(*tokens.shape)
  params = [p for n, p in model.named_parameters() if "vision" not in n]
  decay = [p for p in params if p.ndim > 1]
  no_decay = [p for p in params if p.ndim <= 1]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(train.weight_decay)},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=float(train.learning_rate), betas=(float(train.b1), float(train.b2)))
  ids = torch.from_numpy(tokens).long()
  cap = model.final_logit_softcapping

  def step():
    hidden = model.model.encoder(input_ids=ids, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden).float()
    logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, float(train.grad_clip))
    optimizer.step()
    return loss.item()

  losses = []
  t0 = time.perf_counter()
  for _ in range(warmup):
    losses.append(step())
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  losses.append(loss)
  elapsed = time.perf_counter() - t0
  B, L = tokens.shape
  return {"tokens_per_sec": steps * B * L / elapsed, "step_ms": 1e3 * elapsed / steps, "warmup_s": warmup_s,
          "first_loss": losses[0], "last_loss": losses[-1],
          "attn_implementation": model.config.get_text_config()._attn_implementation}  # pylint: disable=protected-access


def run(*, steps: int, warmup: int, small: bool, batch_size: int, seq_len: int, profile_dir: str = "") -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(THREADS)
  cfg = ModelConfig(**(SMALL_MODEL if small else MODEL))
  tokens = random_rows(batch_size, seq_len, cfg.vocab_size)
  load = benchlib.MachineLoad()
  ours = bench_ours(cfg, tokens, steps=steps, warmup=warmup)
  theirs = bench_transformers(cfg, tokens, steps=steps, warmup=warmup)
  load_report = load.report()
  if profile_dir:  # after the timing, so tracing costs neither side
    ours["profile"] = bench_ours(cfg, tokens, steps=1, warmup=1, profile_dir=profile_dir)["profile"]
  counts = count_params(cfg)
  return {
      "pass": "causal encoder, next-token loss, AdamW (ours: objective ar)",
      "model": {k: list(v) if isinstance(v, tuple) else v for k, v in (SMALL_MODEL if small else MODEL).items()},
      "total_params": counts["total_params"], "active_params_per_token": counts["active_params_per_token"],
      "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup_steps": warmup,
      "torch_threads": torch.get_num_threads(), "cpus_available": len(os.sched_getaffinity(0)),
      "jax_devices": f"{jax.devices()[0].platform} x{len(jax.devices())}",
      "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
      **load_report, "load_line": load.line(),
      "ours": ours, "transformers": theirs, "ratio": ours["tokens_per_sec"] / theirs["tokens_per_sec"],
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (ours compiles in the first)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--small", action="store_true", help="a tiny model and batch (smoke test)")
  parser.add_argument("--profile", default="", help="trace two of our steps into this folder and summarise them")
  args = parser.parse_args(argv)
  if args.small:
    args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 32)
  report = run(steps=args.steps, warmup=args.warmup, small=args.small, batch_size=args.batch_size,
               seq_len=args.seq_len, profile_dir=args.profile)
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  print(f"causal pass, batch {report['batch_size']} x {report['seq_len']}, {report['total_params']:,} parameters "
        f"({report['active_params_per_token']:,} active), {report['steps']} timed steps, "
        f"{report['torch_threads']} torch threads, {report['cpus_available']} CPUs for XLA")
  print(report["load_line"])
  print(f"{'':<14}{'tokens/s':>10}{'step ms':>10}{'warm-up s':>11}{'loss first':>12}{'loss last':>11}")
  for name in ("ours", "transformers"):
    r = report[name]
    print(f"{name:<14}{r['tokens_per_sec']:>10.0f}{r['step_ms']:>10.0f}{r['warmup_s']:>11.1f}"
          f"{r['first_loss']:>12.3f}{r['last_loss']:>11.3f}")
  print(f"ours / transformers: {report['ratio']:.2f}x")
  if "profile" in report["ours"]:
    trace_summary.print_summary(report["ours"]["profile"])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

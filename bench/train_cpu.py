"""Training throughput of the tiny config (ModelConfig defaults, batch 8 x 128) per MoE dispatch backend.

python bench/train_cpu.py [--json] [--steps N] [--backends dense,ragged,sorted] [--ema_decay D]

Runs the real jitted train step (AdamW, masked-diffusion loss) on synthetic packed rows, compiles and warms up
once per backend, then times N steps and reports tokens/s, step time and MFU (train FLOPs per token from
`diffgemma_jax.model.inspect` over `train.peak_flops_per_device`, default the table value for the device).
`--ema_decay D` times each backend's step also with the parameters' moving average kept (`train.ema_decay`), the two
alternating twice, and prints what the average costs as the ratio of the step times.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.config import base_config
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.inspect import count_params, flops_per_token
from diffgemma_jax.train import compile_train_step, synthetic_batch
from diffgemma_jax.train.logging import peak_flops_per_device


def bench_backend(backend: str, *, batch_size: int, seq_len: int, steps: int, peak_flops: float,
                  ema_decay: float = 0.0) -> dict:
  config = base_config()
  config.model.dispatch = backend
  config.train.update(batch_size=batch_size, seq_len=seq_len, ema_decay=ema_decay)
  compiled = compile_train_step(config, mask_id=4)  # base_config's objective: masked diffusion
  cfg, step, state = compiled.model_config, compiled.step, compiled.init_state()
  batch = compiled.place(synthetic_batch(batch_size, seq_len, cfg.vocab_size))
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - t0
  tokens_per_sec = steps * batch_size * seq_len / elapsed
  flops = flops_per_token(cfg, seq_len)["train_flops_per_token"]
  return {"backend": backend + (", ema" if ema_decay else ""), "tokens_per_sec": tokens_per_sec,
          "step_time_ms": 1e3 * elapsed / steps,
          "mfu": tokens_per_sec * flops / peak_flops, "compile_s": compile_s, "final_loss": float(metrics["loss"])}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--backends", default="dense,ragged,sorted")
  parser.add_argument("--peak_flops_per_device", type=float, default=0.0)
  parser.add_argument("--ema_decay", type=float, default=0.0, help="also time each backend keeping the parameters' "
                      "moving average at this decay (train.ema_decay), alternating with the step without it")
  args = parser.parse_args(argv)
  if not 0 <= args.ema_decay < 1:
    parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
  for name in ("steps", "batch_size", "seq_len"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  peak = peak_flops_per_device(args.peak_flops_per_device) * len(jax.devices())
  cfg = ModelConfig()
  load = benchlib.MachineLoad()
  shape = dict(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, peak_flops=peak)
  results, average_costs = [], []
  for backend in args.backends.split(","):
    if not args.ema_decay:
      results.append(bench_backend(backend, **shape))
      continue
    pairs = [(bench_backend(backend, **shape), bench_backend(backend, ema_decay=args.ema_decay, **shape))
             for _ in range(2)]
    results += [r for pair in pairs for r in pair]
    average_costs.append({"backend": backend, "step_time_ratios": [b["step_time_ms"] / a["step_time_ms"]
                                                                   for a, b in pairs]})
  report = {"device": f"{jax.devices()[0].platform} {jax.devices()[0].device_kind} x{len(jax.devices())}",
            "peak_flops": peak, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "active_params_per_token": count_params(cfg)["active_params_per_token"],
            "train_flops_per_token": flops_per_token(cfg, args.seq_len)["train_flops_per_token"],
            "results": results, "ema_decay": args.ema_decay, "moving_average_cost": average_costs,
            **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  print(f"{report['device']}: tiny config, batch {args.batch_size} x {args.seq_len}, {args.steps} timed steps, "
        f"peak {peak:.3g} FLOP/s")
  base = results[0]["tokens_per_sec"]
  print(f"{'backend':<10}{'tokens/s':>12}{'step ms':>10}{'MFU %':>8}{'vs ' + results[0]['backend']:>10}"
        f"{'compile s':>11}")
  for r in results:
    print(f"{r['backend']:<10}{r['tokens_per_sec']:>12.0f}{r['step_time_ms']:>10.1f}{100 * r['mfu']:>8.2f}"
          f"{r['tokens_per_sec'] / base:>10.2f}{r['compile_s']:>11.1f}")
  for cost in average_costs:
    ratios = ", ".join(f"{r:.3f}x" for r in cost["step_time_ratios"])
    print(f"{cost['backend']}: the step with the moving average (decay {args.ema_decay:g}) takes {ratios} the time "
          f"of the step without it (two alternating pairs)")
  print(load.line())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

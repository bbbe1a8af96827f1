"""Continuous batching vs static batching: output tokens/s on the same requests, for four samplers.

python bench/serving.py [--slots 8] [--requests 24] [--only canvas|ar|entropy_bound|masked] [--block_workdir DIR]
    [--ar_workdir DIR] [--uniform_workdir DIR] [--masked_workdir DIR] [--serving_widths 1,2,4] [--json]

`--requests` requests arrive at once, each with its own prompt length (uniform in [--min_prompt, --max_prompt]
tokens, random ids after bos) and token budget (1 to --max_canvases canvases of the model's objective.block_size;
the AR decoder and the masked model get the block model's budgets), seed = its index; both ways stop a request at
EOS (rare with random weights) or its budget. Samplers: `block_threshold` on the block model ("canvas"), the AR
decoder, `entropy_bound` (DiffusionGemma's released rule, at most --max_denoising_steps steps per canvas) on the
uniform-state model, and `threshold` (Fast-dLLM's dual cache, blocks of the block model's size) on the masked
model. Static: batches of --slots requests in arrival order (masked: among requests of one budget), each one
`canvas.generate` / `masked.generate` / `autoregressive.generate` call (`Generator.compiled`, prompts left-padded
to the prefill width of the batch's longest) running to the batch's largest budget, so a batch costs its longest
request. Continuous: `serving.Engine`
with --slots slots. Both are compiled by a first pass, then timed --repeats times, alternating (medians
reported); tokens/s counts each request's own new tokens (to EOS, within its budget) over a pass's seconds. Model
calls: the static batches' calls (prefill, denoising steps or decode steps, commits; each call runs the whole
batch) against the engine's steps (each runs every slot) plus its prefill calls (each admits every request taken
into a free slot at that point); the masked sampler's static calls are not counted (its loop reports each row's
steps, not the batch's) and its engine makes no prefill but one or two calls a step (a window call, and a refresh
call for the slots starting a block): "engine calls" counts them; "engine compile s" is the seconds the engine's
programs took to compile in the first pass (not timed), "programs" how many step programs it compiled (the masked
engine compiles a program per class of call its steps use, each on first use). --serving_widths 1,2,4 times one
masked engine per width count (a row each) against the same static batches. The engine's tokens
are checked against the static ones request by request (they must be equal). Random weights
(configs/block_tiny.py, configs/ar_tiny.py, configs/diffusiongemma_tiny.py, configs/pretrain_tiny.py) unless
trained workdirs are given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.config import load_config
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.sampling import batching
from diffgemma_jax.sampling.parts import truncate_at_eos
from diffgemma_jax.sampling.requests import Generator
from diffgemma_jax.train.reading import restore_model
from diffgemma_jax.sampling.samplers import GenerationOptions, sampler_config, validate_options
from diffgemma_jax.sampling.serving import Request, bucket_width
from diffgemma_jax.sampling.serving_masked import NUM_WIDTHS

PAD, BOS, EOS, MASK = 0, 2, 3, 4  # the reserved ids of every tokenizer the recipes train
SAMPLERS = ("canvas", "ar", "entropy_bound", "masked")


def make_requests(args, vocab_size: int, unit: int) -> list[Request]:
  rng = np.random.default_rng(args.seed)
  lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.requests)
  budgets = rng.integers(1, args.max_canvases + 1, args.requests) * unit
  return [Request(tuple([BOS] + rng.integers(5, vocab_size, n - 1).tolist()), int(budget), index)
          for index, (n, budget) in enumerate(zip(lengths, budgets))]


def static_batches(requests, slots: int, objective: str):
  """Batches of `slots` requests in arrival order; for the masked model among requests of one budget only (a masked
  row's tokens depend on its whole canvas, so a longer budget would change them: `Generator.run_requests` never
  mixes two either)."""
  groups: dict[int, list[int]] = {}
  for index, request in enumerate(requests):
    groups.setdefault(request.max_new_tokens if objective == "masked" else 0, []).append(index)
  return [group[first:first + slots] for group in groups.values() for first in range(0, len(group), slots)]


def static_pass(generator: Generator, options: GenerationOptions, objective: str, block: int, requests, slots: int):
  """`static_batches` through the static path: (new ids per request, batch calls; None for the masked model)."""
  ids, calls = [None] * len(requests), 0
  for indices in static_batches(requests, slots, objective):
    batch = [requests[i] for i in indices]
    budget = max(r.max_new_tokens for r in batch)
    cfg = sampler_config(validate_options(dataclasses.replace(options, gen_length=budget, steps=None), objective,
                                          block))
    prompt, starts = batching.left_pad([r.prompt for r in batch], PAD, bucket_width(max(len(r.prompt)
                                                                                         for r in batch)))
    fn = generator.compiled(cfg, len(batch), prompt.shape[1], row_keys=True, padded=True)
    tokens, row_calls, steps = fn(generator.state, prompt, batching.row_keys([r.seed for r in batch]), starts)
    tokens = np.asarray(tokens)[:, prompt.shape[1]:]
    for index, row, r in zip(indices, tokens, batch):
      ids[index] = truncate_at_eos(row[:r.max_new_tokens], EOS)
    if objective == "masked":  # rows move from block to block together: the batch's calls are not reported
      calls = None
    elif steps is None:  # the AR decoder: the loop runs as long as its longest row
      calls += int(np.max(row_calls))
    else:  # prefill, each canvas's longest denoising, a commit between canvases
      canvas_steps = np.asarray(steps).max(axis=0)
      ran = int(np.sum(canvas_steps > 0))
      calls += 1 + int(canvas_steps.sum()) + ran - 1
  return ids, calls


def compare(name: str, model, objective: str, block: int, args, requests) -> list[dict]:
  """Static batches against the engine, and for the masked model against one engine per --serving_widths count,
  timed in alternation: a row per engine."""
  fields = dict(gen_length=max(r.max_new_tokens for r in requests), block_length=block)
  if objective == "block":
    fields.update(sampler="block_threshold", threshold=args.threshold, temperature=args.temperature)
  elif objective == "uniform":  # the released sampler's settings but for the step cap
    fields.update(sampler="entropy_bound", max_denoising_steps=args.max_denoising_steps)
  elif objective == "masked":
    fields.update(sampler="threshold", threshold=args.threshold, temperature=args.temperature)
  else:
    fields.update(temperature=args.temperature)
  options = validate_options(GenerationOptions(**fields), objective, block)
  generator = Generator(model, mask_id=MASK, eos_id=EOS, pad_id=PAD)
  longest = max(len(r.prompt) for r in requests)
  engines = {widths: generator.engine(sampler_config(options), args.slots, longest, widths)
             for widths in (args.serving_widths if objective == "masked" else (None,))}
  runs = {"static": lambda: static_pass(generator, options, objective, block, requests, args.slots)}
  runs.update({widths: (lambda engine=engine: engine.run(requests)) for widths, engine in engines.items()})
  seconds, outputs, compile_seconds = {label: [] for label in runs}, {}, {}
  for label, run in runs.items():
    run()  # compiles
    if label != "static":
      compile_seconds[label] = engines[label].compile_seconds  # the programs the first pass compiled
  for _ in range(args.repeats):  # paired: load changes hit both ways
    for label, run in runs.items():
      start = time.perf_counter()
      outputs[label] = run()
      seconds[label].append(time.perf_counter() - start)
  static_seconds = statistics.median(seconds["static"])
  static_ids, static_calls = outputs["static"]
  rows = []
  for widths, engine in engines.items():
    engine_seconds = statistics.median(seconds[widths])
    engine_ids = [truncate_at_eos(r["tokens"], EOS) for r in outputs[widths]]
    tokens = sum(map(len, engine_ids))
    rows.append({"sampler": name, "options": options.sampler, "serving_widths": widths, "new_tokens": tokens,
                 "static_tokens_per_s": sum(map(len, static_ids)) / static_seconds,
                 "continuous_tokens_per_s": tokens / engine_seconds, "speedup": static_seconds / engine_seconds,
                 "static_seconds": static_seconds, "continuous_seconds": engine_seconds,
                 "static_model_calls": static_calls, "continuous_steps": engine.steps,
                 "continuous_prefills": engine.prefill_calls, "continuous_model_calls": engine.model_calls,
                 "continuous_compile_seconds": compile_seconds[widths],
                 "continuous_programs": len(engine.step_programs()), "identical_tokens": engine_ids == static_ids})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--slots", type=int, default=8, help="slots of the engine = static batch size")
  p.add_argument("--requests", type=int, default=24)
  p.add_argument("--min_prompt", type=int, default=8)
  p.add_argument("--max_prompt", type=int, default=40)
  p.add_argument("--max_canvases", type=int, default=4, help="budgets: 1 to this many canvases")
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--threshold", type=float, default=0.9, help="block_threshold's and threshold's commit "
                 "confidence")
  p.add_argument("--seed", type=int, default=0, help="of the prompts and budgets")
  p.add_argument("--block_config", default="configs/block_tiny.py")
  p.add_argument("--block_workdir", default=None, help="a trained block run (default: random weights)")
  p.add_argument("--uniform_config", default="configs/diffusiongemma_tiny.py")
  p.add_argument("--uniform_workdir", default=None, help="a trained uniform-state run (default: random weights)")
  p.add_argument("--max_denoising_steps", type=int, default=8, help="entropy_bound: at most this many steps per "
                 "canvas (random weights rarely stop early)")
  p.add_argument("--masked_config", default="configs/pretrain_tiny.py")
  p.add_argument("--masked_workdir", default=None, help="a trained masked run (default: random weights)")
  p.add_argument("--ar_config", default="configs/ar_tiny.py")
  p.add_argument("--ar_workdir", default=None, help="a trained AR run (default: random weights)")
  p.add_argument("--serving_widths", default=str(NUM_WIDTHS), help="the masked engine's slot widths "
                 "(`MaskedProgram`): one count, or several separated by commas (an engine each, timed against the "
                 f"same static batches); default {NUM_WIDTHS}")
  p.add_argument("--repeats", type=int, default=3, help="timed passes of each way, alternating; medians reported")
  p.add_argument("--only", choices=SAMPLERS, default=None)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  for flag in ("slots", "requests", "min_prompt", "max_canvases", "repeats", "max_denoising_steps"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag}={getattr(args, flag)} must be >= 1")
  try:
    args.serving_widths = tuple(int(part) for part in args.serving_widths.split(","))
  except ValueError:
    p.error(f"--serving_widths={args.serving_widths!r} must be whole numbers >= 1 separated by commas (e.g. 1,2,4)")
  if min(args.serving_widths) < 1:
    p.error(f"--serving_widths={','.join(map(str, args.serving_widths))}: every count must be >= 1")
  if args.max_prompt < args.min_prompt:
    p.error(f"--max_prompt={args.max_prompt} must be >= --min_prompt={args.min_prompt}")
  load = benchlib.MachineLoad()
  block_config = load_config(args.block_config)
  block = int(block_config.objective.block_size)
  rows = []
  for name, config_file, workdir, seed in (("canvas", args.block_config, args.block_workdir, 2),
                                           ("ar", args.ar_config, args.ar_workdir, 1),
                                           ("entropy_bound", args.uniform_config, args.uniform_workdir, 3),
                                           ("masked", args.masked_config, args.masked_workdir, 4)):
    if args.only not in (None, name):
      continue
    config = load_config(config_file)
    if workdir:
      model, _ = restore_model(config, workdir)
    else:
      model = build_model(ModelConfig.from_config_dict(config.model), seed)
    unit = int(config.objective.block_size) if name == "entropy_bound" else block  # the AR decoder: the block's
    requests = make_requests(args, int(config.model.vocab_size), unit)
    for row in compare(name, model, str(config.objective.name), unit, args, requests):
      rows.append(dict(row, budget_tokens=[unit, unit * args.max_canvases]))
  report = {"bench": "serving", "commit": benchlib.commit(), "slots": args.slots, "requests": args.requests,
            "prompt_tokens": [args.min_prompt, args.max_prompt], "max_denoising_steps": args.max_denoising_steps,
            "temperature": args.temperature, "repeats": args.repeats,
            "random_weights": not (args.block_workdir or args.ar_workdir or args.uniform_workdir
                                   or args.masked_workdir),
            "results": rows, **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, budgets of 1-"
        f"{args.max_canvases} canvases, {args.slots} slots / static batch; commit {report['commit']}")
  print(f"{'sampler':<13} {'widths':>6} {'budgets':>7} {'new tokens':>10} {'static tok/s':>12} {'engine tok/s':>12} "
        f"{'x static':>8} {'static calls':>12} {'engine steps+prefill calls':>26} {'engine calls':>12} "
        f"{'same tokens':>11} {'engine compile s':>16} {'programs':>8}")
  for r in rows:
    budgets = "-".join(map(str, r["budget_tokens"]))
    print(f"{r['sampler']:<13} {str(r['serving_widths'] or '-'):>6} {budgets:>7} {r['new_tokens']:10d} "
          f"{r['static_tokens_per_s']:12.1f} {r['continuous_tokens_per_s']:12.1f} {r['speedup']:8.2f} "
          f"{str(r['static_model_calls'] or '-'):>12} {r['continuous_steps']:>17d} + {r['continuous_prefills']:<6d} "
          f"{r['continuous_model_calls']:12d} {str(r['identical_tokens']):>11} "
          f"{r['continuous_compile_seconds']:16.1f} {r['continuous_programs']:8d}")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

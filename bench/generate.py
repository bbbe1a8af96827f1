"""Generation speed and sample quality: the tiny diffusion model's samplers vs its autoregressive twin.

python bench/generate.py --diffusion_workdir DIR --ar_workdir DIR [--block_workdir DIR] [--uniform_workdir DIR]
    [--json]   speed + quality
python bench/generate.py --random_weights [--diffusion_config configs/pretrain_gpu_1b.py] [--json]   speed only
    (random weights: the masked, AR and block models; the uniform-state one too when --only names entropy_bound)

Batch 1, `--gen_length` (256) new tokens after a `--prompt_tokens` prompt that starts a document of the held-out
split (random ids with --random_weights when no dataset is built). EOS does not stop any sampler, so every setting
produces the same number of tokens. Each setting is compiled first, then timed `--repeats` times (the median is
reported): tokens/s, model calls (denoising steps / decode steps), and with an AR checkpoint the generative
perplexity of the new tokens under the AR model and their unigram entropy. Settings: the KV-cached AR decoder;
LLaDA low-confidence decoding at several step budgets, without and with the approximate dual cache; Fast-dLLM
threshold decoding at several thresholds, with and without the cache; with a block-diffusion model (or random
weights) the exact-cache block samplers at its training block size, two ways: the multi-canvas sampler
(`block_threshold` / `block_low_confidence`, `canvas.py`: each finished canvas committed by its own causal encoder
call) and `block_fused` (`masked.BlockDenoiser`: the commit of a finished block rides in the next block's first
denoising call, one call of 2 * block tokens instead of two). `--temperature 0,1` runs every setting at each
temperature in the same run; ratios are against the AR decoder at the same temperature, its speed timed paired:
one AR run right after each timed run of the setting (x AR = median AR seconds / median setting seconds), so
load changes on a shared machine hit both. "ms/call" is the run's seconds over its model calls.

`--batch_sizes 1,8,32,64` adds the batched table (JSON key "batched"): every selected setting at each batch size,
B prompts (the first `--prompt_tokens` tokens of B held-out documents; random ids with --random_weights) per
sampler call, total output tokens/s (B x gen_length / seconds), paired with the AR decoder at the same batch size
(x AR) and against the same setting's batch 1 in this run (x batch 1). The batch-1 table above is unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.config import load_config
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.sampling import masked
from diffgemma_jax.sampling.quality import GenerativePerplexity, unigram_entropy
from diffgemma_jax.sampling.requests import Generator
from diffgemma_jax.train.reading import restore_model
from diffgemma_jax.sampling.samplers import GenerationOptions, validate_options

PAD, BOS, EOS, MASK = 0, 2, 3, 4  # the reserved ids of every tokenizer the recipes train


def diffusion_settings(gen_length: int, block_length: int):
  """(label, GenerationOptions fields) of every diffusion setting, slowest first."""
  out = []
  num_blocks = gen_length // block_length
  for steps in sorted({gen_length, gen_length // 2, gen_length // 4}, reverse=True):
    if steps >= num_blocks and steps % num_blocks == 0:
      out.append((f"low_confidence steps={steps}", dict(sampler="low_confidence", steps=steps)))
  for steps in sorted({gen_length, gen_length // 4}, reverse=True):
    if steps >= num_blocks and steps % num_blocks == 0:
      out.append((f"low_confidence_cached steps={steps}", dict(sampler="low_confidence_cached", steps=steps)))
  out.append(("threshold_nocache 0.9", dict(sampler="threshold_nocache", threshold=0.9)))
  for threshold in (0.9, 0.7, 0.5):
    out.append((f"threshold {threshold}", dict(sampler="threshold", threshold=threshold)))
  return out


def held_out_prompt(config, length: int) -> list[int]:
  """The first `length` tokens of the first held-out document that has them."""
  return held_out_prompts(config, length, 1)[0]


def held_out_prompts(config, length: int, count: int) -> list[list[int]]:
  """The first `length` tokens of the first `count` held-out documents that have them."""
  from diffgemma_jax.data import make_eval_batches
  from diffgemma_jax.train.dataset import dataset_dir
  seq_len = int(config.train.seq_len)
  found = []
  for batch in make_eval_batches(dataset_dir(config), seq_len=seq_len, batch_size=8):
    for tokens, positions, segments in zip(batch["tokens"], batch["positions"], batch["segment_ids"]):
      for start in np.flatnonzero((positions == 0) & (segments > 0)):
        if start + length <= seq_len and np.all(segments[start:start + length] == segments[start]):
          found.append([int(t) for t in tokens[start:start + length]])
          if len(found) == count:
            return found
  raise SystemExit(f"fewer than {count} held-out documents have {length} tokens; lower --prompt_tokens or "
                   f"--batch_sizes")


def block_settings(gen_length: int, block_size: int):
  """(label, sampler, fields) of every block-diffusion setting: the multi-canvas samplers (`canvas.py`) by
  GenerationOptions, the fused-commit exact cache (`masked.BlockDenoiser`) by a SamplerConfig."""
  out = []
  for threshold in (0.9, 0.7, 0.5):
    out.append((f"block_threshold {threshold}", "block_threshold", dict(threshold=threshold)))
  budgets = [steps for steps in (gen_length // 4, gen_length // 8) if steps >= gen_length // block_size]
  for steps in budgets:
    out.append((f"block_low_confidence steps={steps}", "block_low_confidence", dict(steps=steps)))
  for threshold in (0.9, 0.7, 0.5, 0.3):
    out.append((f"block_fused threshold {threshold}", "block_fused",
                dict(acceptance="threshold", threshold=threshold, steps_per_block=block_size)))
  for steps in budgets:
    out.append((f"block_fused low_confidence steps={steps}", "block_fused",
                dict(acceptance="low_confidence", steps_per_block=steps * block_size // gen_length)))
  return out


def run_once(generator: Generator, prompt, options, seed: int) -> dict:
  """One generation of batch row 0 with `seed`: {seconds, model_calls, sequence, ...}. `options`: GenerationOptions
  (the CLI's path), or a `masked.SamplerConfig` run through the generator's compiled sampler directly."""
  if isinstance(options, GenerationOptions):
    return generator.run(prompt, dataclasses.replace(options, seed=seed))[0]
  fn = generator.compiled(options, *prompt.shape)
  start = time.perf_counter()
  tokens, calls, _ = jax.block_until_ready(fn(generator.state, jax.numpy.asarray(prompt), jax.random.key(seed)))
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "model_calls": int(np.asarray(calls)[0]), "sequence": np.asarray(tokens)[0].tolist()}


def time_setting(generator: Generator, prompt, options, repeats: int, seed: int = 0, paired=None):
  """Compiles and warms up, then the median of `repeats` timed runs (`run_once`, same jit, same timing).
  `paired` (a run of the AR decoder) is timed right after each run: on a shared machine the ratio of the two
  medians is steadier than a ratio against the AR row timed minutes earlier."""
  run = lambda: run_once(generator, prompt, options, seed)
  run()  # compile and warm up
  runs, paired_seconds = [], []
  for _ in range(repeats):
    runs.append(run())
    if paired is not None:
      paired_seconds.append(paired()["seconds"])
  seconds = statistics.median(r["seconds"] for r in runs)
  last = runs[-1]
  return {"seconds": seconds, "tokens_per_s": options.gen_length / seconds, "model_calls": last["model_calls"],
          "sequence": last["sequence"], "steps_per_canvas": last.get("steps_per_canvas"),
          "paired_seconds": statistics.median(paired_seconds) if paired_seconds else None}


def time_against_ar(plan, generators, model, ar_model, sampler: str, options, prompt_BP, repeats: int):
  """(generator, `time_setting` result) of one setting on `prompt_BP`, paired with the AR decoder's run of the same
  prompts at the same temperature (the AR setting itself runs unpaired)."""
  generator = generators.setdefault(id(model), Generator(model, mask_id=MASK, eos_id=EOS))
  paired = None
  if sampler != "ar":
    ar_generator = generators.setdefault(id(ar_model), Generator(ar_model, mask_id=MASK, eos_id=EOS))
    ar_options = next((o for _, m, o in plan if m is ar_model and o.temperature == options.temperature),
                      next(o for _, m, o in plan if m is ar_model))
    paired = lambda: ar_generator.run(prompt_BP, ar_options)[0]
  return generator, time_setting(generator, prompt_BP, options, repeats, paired=paired)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--diffusion_config", default="configs/pretrain_tiny.py")
  p.add_argument("--diffusion_workdir", default=None)
  p.add_argument("--ar_config", default="configs/ar_tiny.py")
  p.add_argument("--ar_workdir", default=None)
  p.add_argument("--block_config", default="configs/block_tiny.py")
  p.add_argument("--block_workdir", default=None, help="optional: a block-diffusion run (exact-cache samplers)")
  p.add_argument("--uniform_config", default="configs/diffusiongemma_tiny.py")
  p.add_argument("--uniform_workdir", default=None, help="optional: a uniform-state run (entropy_bound sampler)")
  p.add_argument("--random_weights", action="store_true", help="random init (speed only; no gen-PPL)")
  p.add_argument("--gen_length", type=int, default=256)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--prompt_tokens", type=int, default=32)
  p.add_argument("--temperature", default="1", help="every sampler's temperature (0: greedy); a comma-separated list "
                 "runs every setting at each")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--quality_samples", type=int, default=1,
                 help="samples (seeds 0..N-1) whose pooled gen-PPL and mean entropy are reported; one is timed")
  p.add_argument("--only", default="", help="comma-separated sampler names or setting labels (as printed, e.g. "
                 "'block_fused threshold 0.9') to run (default: all)")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override applied to every config (e.g. model.vocab_size=1024 for older runs)")
  p.add_argument("--json", action="store_true")
  p.add_argument("--batch_sizes", default="1", help="comma-separated batch sizes of the batched table (e.g. "
                 "1,8,32,64); 1 alone: no batched table")
  p.add_argument("--time_budget_s", type=float, default=0.0,
                 help="start no new setting after this many seconds from start-up (0: no limit); the report lists "
                      "the settings left out, so a run under a hard timeout still ends with its JSON")
  started = time.perf_counter()
  load = benchlib.MachineLoad()
  args = p.parse_args(argv)
  if args.time_budget_s < 0:
    p.error(f"--time_budget_s={args.time_budget_s}: must be >= 0 (0: no limit)")
  overrides = dict(item.split("=", 1) for item in args.override)
  try:
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
  except ValueError:
    p.error(f"--batch_sizes={args.batch_sizes!r}: give comma-separated positive integers, e.g. 1,8,32,64")
  if batch_sizes[0] < 1:
    p.error(f"--batch_sizes={args.batch_sizes!r}: every batch size must be >= 1")
  if not args.random_weights and not (args.diffusion_workdir and args.ar_workdir):
    p.error("pass --diffusion_workdir and --ar_workdir (trained runs), or --random_weights for speed only")

  diffusion_config = load_config(args.diffusion_config, overrides)
  ar_config = load_config(args.ar_config, overrides)
  if args.random_weights:
    diffusion_model = build_model(ModelConfig.from_config_dict(diffusion_config.model), 0)
    ar_model = build_model(ModelConfig.from_config_dict(ar_config.model), 1)
    block_config = load_config(args.block_config, overrides)
    block_model = build_model(ModelConfig.from_config_dict(block_config.model), 2)
    steps = {"diffusion": None, "ar": None}
  else:
    diffusion_model, diffusion_step = restore_model(diffusion_config, args.diffusion_workdir)
    ar_model, ar_step = restore_model(ar_config, args.ar_workdir)
    steps = {"diffusion": diffusion_step, "ar": ar_step}
    block_config, block_model = None, None
    if args.block_workdir:
      block_config = load_config(args.block_config, overrides)
      block_model, steps["block"] = restore_model(block_config, args.block_workdir)
  uniform_config, uniform_model = None, None
  if args.uniform_workdir:
    uniform_config = load_config(args.uniform_config, overrides)
    uniform_model, steps["uniform"] = restore_model(uniform_config, args.uniform_workdir)
  elif args.random_weights and any(name.startswith("entropy_bound") for name in args.only.split(",")):
    uniform_config = load_config(args.uniform_config, overrides)  # only when --only asks for it
    uniform_model = build_model(ModelConfig.from_config_dict(uniform_config.model), 3)
  try:
    if args.prompt_tokens == 1:  # unconditional samples (MDLM's gen-PPL setting): needs no dataset
      prompt, prompt_source = [BOS], "bos"
    else:
      prompt, prompt_source = held_out_prompt(diffusion_config, args.prompt_tokens), "held-out"
  except Exception:  # no dataset built: speed-only runs use random ids
    if not args.random_weights:
      raise
    rng = np.random.default_rng(0)
    prompt = [BOS] + rng.integers(5, int(diffusion_config.model.vocab_size), args.prompt_tokens - 1).tolist()
    prompt_source = "random"
  prompt_1P = np.asarray([prompt], np.int32)
  batched_prompts = prompt_batch(diffusion_config, args, prompt, prompt_source, max(batch_sizes))
  scorer = None if args.random_weights else GenerativePerplexity(ar_model)

  temperatures = [float(t) for t in args.temperature.split(",")]
  plan = []
  for temperature in temperatures:
    common = dict(gen_length=args.gen_length, block_length=args.block_length, temperature=temperature,
                  stop_at_eos=False)
    plan.append(("ar", ar_model, validate_options(GenerationOptions(sampler="ar", **common), "ar")))
    plan += [(label, diffusion_model, validate_options(GenerationOptions(**common, **fields), "masked"))
             for label, fields in diffusion_settings(args.gen_length, args.block_length)]
    if block_model is not None:
      block_size = int(block_config.objective.block_size)
      block_common = dict(common, block_length=block_size)
      for label, sampler, fields in block_settings(args.gen_length, block_size):
        if sampler == "block_fused":
          options = masked.SamplerConfig(gen_length=args.gen_length, block_length=block_size,
                                         temperature=temperature, cache="block", stop_at_eos=False, **fields)
        else:
          options = validate_options(GenerationOptions(sampler=sampler, **block_common, **fields), "block")
        plan.append((label, block_model, options))
  if uniform_model is not None:  # its own temperature schedule: once, whatever --temperature says
    canvas = int(uniform_config.objective.block_size)
    for max_steps in (48, 16, 8):
      label = f"entropy_bound max_steps={max_steps}" + (" (released)" if max_steps == 48 else "")
      plan.append((label, uniform_model, validate_options(GenerationOptions(
          sampler="entropy_bound", gen_length=args.gen_length, block_length=canvas, max_denoising_steps=max_steps,
          stop_at_eos=False), "uniform", block_size=canvas)))
  only = set(filter(None, args.only.split(",")))
  known = {getattr(options, "sampler", "block_fused") for _, _, options in plan} | {label for label, _, _ in plan}
  if only - known:
    p.error(f"--only: {', '.join(sorted(only - known))} names no setting of this run; give sampler names or "
                 f"setting labels from: {', '.join(sorted(known))}")
  generators = {}
  rows, left_out = [], []
  for label, model, options in plan:
    sampler = getattr(options, "sampler", "block_fused")
    if only and sampler not in only and label not in only:
      continue
    if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
      left_out.append(label)
      print(f"T={options.temperature:g} {label:36s} left out: --time_budget_s={args.time_budget_s:g} spent",
            file=sys.stderr, flush=True)
      continue
    generator, result = time_against_ar(plan, generators, model, ar_model, sampler, options, prompt_1P, args.repeats)
    row = {"setting": label, "sampler": sampler, "temperature": options.temperature,
           "steps": getattr(options, "steps", None), "threshold": options.threshold,
           "tokens_per_s": result["tokens_per_s"], "seconds": result["seconds"], "model_calls": result["model_calls"],
           "ms_per_call": 1e3 * result["seconds"] / max(result["model_calls"], 1),
           "paired_ar_seconds": result["paired_seconds"], "steps_per_canvas": result["steps_per_canvas"]}
    samples = [result["sequence"]] + [run_once(generator, prompt_1P, options, seed)["sequence"]
                                      for seed in range(1, args.quality_samples)]
    row["quality_samples"] = len(samples)
    row["unigram_entropy"] = statistics.mean(unigram_entropy(seq[len(prompt):]) for seq in samples)
    if scorer is not None:  # pooled over every sample's tokens; EOS does not end a sample
      row["gen_ppl"] = scorer(samples, len(prompt), eos_id=-1)["gen_ppl"]
    rows.append(row)
    # progress on stderr in every mode: a run cut short by a timeout keeps what it measured
    print(f"T={row['temperature']:g} {label:36s} {row['tokens_per_s']:9.1f} tok/s {row['model_calls']:5d} calls"
          + (f"  gen-PPL {row['gen_ppl']:8.2f}" if "gen_ppl" in row else "")
          + f"  entropy {row['unigram_entropy']:.2f}", file=sys.stderr, flush=True)
  ar_rows = {r["temperature"]: r for r in rows if r["sampler"] == "ar"}
  for row in rows:
    ar_row = ar_rows.get(row["temperature"], ar_rows.get(temperatures[0]))  # entropy_bound: its own schedule
    if row["paired_ar_seconds"]:
      row["speedup_vs_ar"] = row["paired_ar_seconds"] / row["seconds"]
    elif ar_row is not None:
      row["speedup_vs_ar"] = row["tokens_per_s"] / ar_row["tokens_per_s"]
    if ar_row is not None:
      if "gen_ppl" in row:
        row["gen_ppl_ratio_vs_ar"] = row["gen_ppl"] / ar_row["gen_ppl"]
  batched = []
  if batch_sizes != [1]:
    batched = batched_table(plan, only, batch_sizes, batched_prompts, generators, ar_model, args, started, left_out,
                            rows)
  report = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "diffusion_config": args.diffusion_config, "ar_config": args.ar_config, "checkpoint_steps": steps,
            "random_weights": args.random_weights, "batch_size": 1, "prompt_tokens": len(prompt),
            "prompt_source": prompt_source, "gen_length": args.gen_length, "block_length": args.block_length,
            "temperatures": temperatures, "repeats": args.repeats, "results": rows,
            "left_out_for_time": left_out, "batch_sizes": batch_sizes, "batched": batched, **load.report()}
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print(f"\n{report['device']} ({report['platform']}), batch 1, {len(prompt)}-token {prompt_source} prompt, "
          f"{args.gen_length} new tokens, blocks of {args.block_length}, temperatures {args.temperature}")
    print(f"{'T':>4s} {'setting':36s} {'tok/s':>9s} {'x AR':>6s} {'calls':>6s} {'ms/call':>8s} {'gen-PPL':>9s} "
          f"{'x AR':>6s} {'entropy':>8s}")
    for r in rows:
      print(f"{r['temperature']:4g} {r['setting']:36s} {r['tokens_per_s']:9.1f} "
            f"{r.get('speedup_vs_ar', float('nan')):6.2f} "
            f"{r['model_calls']:6d} {r['ms_per_call']:8.3f} {r.get('gen_ppl', float('nan')):9.2f} "
            f"{r.get('gen_ppl_ratio_vs_ar', float('nan')):6.2f} {r['unigram_entropy']:8.2f}")
    if batched:
      print("\nbatched: B prompts per call, total output tokens/s; x AR paired at the same B")
      print(f"{'T':>4s} {'setting':36s} {'B':>4s} {'tok/s':>9s} {'x AR':>6s} {'x B=1':>6s} {'calls':>6s}")
      for r in batched:
        print(f"{r['temperature']:4g} {r['setting']:36s} {r['batch_size']:4d} {r['tokens_per_s']:9.1f} "
              f"{r.get('speedup_vs_ar', float('nan')):6.2f} {r.get('speedup_vs_batch_1', float('nan')):6.2f} "
              f"{r['model_calls']:6d}")
    if left_out:
      print(f"left out (--time_budget_s={args.time_budget_s:g} spent): {', '.join(left_out)}")
    print(load.line())
  return 0


def prompt_batch(config, args, prompt: list[int], source: str, count: int) -> np.ndarray:
  """[count, prompt_tokens] prompts for the batched table: `prompt` first, then other held-out documents' (or
  random ids, as the batch-1 prompt was chosen)."""
  if count == 1:
    return np.asarray([prompt], np.int32)
  if source == "held-out":
    return np.asarray(held_out_prompts(config, len(prompt), count), np.int32)
  rng = np.random.default_rng(1)
  rows = [prompt] + [[prompt[0]] + rng.integers(5, int(config.model.vocab_size), len(prompt) - 1).tolist()
                     for _ in range(count - 1)]
  return np.asarray(rows, np.int32)


def batched_table(plan, only, batch_sizes, prompts, generators, ar_model, args, started, left_out,
                  batch_1_rows) -> list[dict]:
  """Every selected setting at every batch size, paired with the AR decoder at that batch size; batch 1 is the
  batch-1 table's measurement of the same setting (same prompt), when it has one."""
  rows = []
  measured = {(r["setting"], r["temperature"]): r for r in batch_1_rows}
  for batch_size in batch_sizes:
    prompt_BP = prompts[:batch_size]
    for label, model, options in plan:
      sampler = getattr(options, "sampler", "block_fused")
      if only and sampler not in only and label not in only:
        continue
      if batch_size == 1 and (label, options.temperature) in measured:
        r = measured[(label, options.temperature)]
        rows.append({key: r[key] for key in ("setting", "sampler", "temperature", "tokens_per_s", "seconds",
                                              "model_calls", "paired_ar_seconds", "speedup_vs_ar")} | {"batch_size": 1})
        continue
      if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
        left_out.append(f"{label} B={batch_size}")
        continue
      _, result = time_against_ar(plan, generators, model, ar_model, sampler, options, prompt_BP, args.repeats)
      row = {"setting": label, "sampler": sampler, "temperature": options.temperature, "batch_size": batch_size,
             "tokens_per_s": batch_size * options.gen_length / result["seconds"], "seconds": result["seconds"],
             "model_calls": result["model_calls"], "paired_ar_seconds": result["paired_seconds"]}
      row["speedup_vs_ar"] = result["paired_seconds"] / result["seconds"] if result["paired_seconds"] else 1.0
      first = next((r for r in rows if r["setting"] == label and r["temperature"] == row["temperature"]), None)
      if first is not None and first["batch_size"] == 1:
        row["speedup_vs_batch_1"] = row["tokens_per_s"] / first["tokens_per_s"]
      rows.append(row)
      print(f"T={row['temperature']:g} {label:36s} B={batch_size:<3d} {row['tokens_per_s']:9.1f} tok/s  "
            f"x AR {row['speedup_vs_ar']:.2f}", file=sys.stderr, flush=True)
  return rows


if __name__ == "__main__":
  sys.exit(main())

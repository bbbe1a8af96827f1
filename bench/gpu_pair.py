"""The trained diffusion-vs-AR speed experiment: one GPU, one command, under 9 minutes.

  bash bench/gpu_pair.sh OUT                   (a GPU machine; see the script for the wheels it installs)
  python bench/gpu_pair.py --out OUT [--smoke]  (--smoke: a tiny model and budgets of seconds, for a CPU)

Phases, each stopped by its own time budget so the command always ends with its JSON (OUT/gpu_pair.json is
rewritten after every phase and every generation setting):
1. corpus: `data_recipes.python_packages` over this interpreter's standard library and site-packages (held out by
   package), whole packages up to --corpus_mb, a 16k-piece tokenizer, built into a token store on every core.
2. ar: `configs/ar_code_100m.py` (120M active parameters, bfloat16, the default attention and MoE paths of the
   platform) for --ar_budget_s, sized by the clock: `train.lr_schedule=wsd_time` with `train.max_runtime_s` =
   the budget less --reserve_s (the final checkpoint and evaluation come after the last step), so the run measures
   its own step time and places its learning-rate decay (the last 20% of the stepping time) to end when the budget
   does, whatever the machine. `train.num_steps` is only a cap (--cap_mfu x peak FLOP/s over the budget, more steps
   than the card can run); --ar_steps fixes the count instead (the decay then starts at 80% of it). The JSON
   records the cap, the placed decay (`lr_decay`: the measured step time and the steps the budget held) and the
   measured rate.
3. block: `configs/block_from_ar_code_100m.py` (token shift, blocks of 16) from the AR checkpoint for
   --block_budget_s, sized the same way (its cap: the budget over the AR run's measured step time; a block step runs
   [canvas ; clean], twice the row, so it is slower).
4. generate: --num_prompts held-out prompts (--prompt_tokens tokens from a quarter into held-out modules), 256 new
   tokens at temperature 1, EOS not stopping. Each setting (the AR decoder, then the block samplers in priority
   order) at batch 1 (tokens/s, median of --repeats runs, each paired with an AR run: x AR is the ratio of the two
   medians) and at the serving batch (all prompts in one call: output tokens/s, model calls per row, gen-PPL of the
   samples under the AR model, mean unigram entropy), and for the samplers the continuous-batching engine serves
   (the AR decoder, block_threshold) the prompts twice over served with --num_prompts slots against the same
   requests in two static batches (output tokens/s, `serving_x_static`), until --gen_budget_s.
5. ceiling (run before generation): `bench/parallel_ceiling.py`'s confidence profile of the AR model on held-out rows (the tokens per call
   threshold decoding could reach with the AR model's full-context confidence).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_recipes import python_packages  # noqa: E402
from diffgemma_jax.compile_cache import use_compilation_cache  # noqa: E402
from diffgemma_jax.config import load_config  # noqa: E402
from diffgemma_jax.data import Tokenizer, make_eval_batches  # noqa: E402
from diffgemma_jax.data.store import open_split  # noqa: E402
from diffgemma_jax.model.config import ModelConfig  # noqa: E402
from diffgemma_jax.model.inspect import flops_per_token  # noqa: E402
from diffgemma_jax.sampling.quality import GenerativePerplexity, unigram_entropy  # noqa: E402
from diffgemma_jax.sampling.requests import Generator  # noqa: E402
from diffgemma_jax.train.reading import restore_model  # noqa: E402
from diffgemma_jax.sampling.samplers import (  # noqa: E402
    SAMPLERS, GenerationOptions, sampler_config, validate_options)
from diffgemma_jax.train import train  # noqa: E402
from diffgemma_jax.train.logging import peak_flops_per_device  # noqa: E402

AR_CONFIG = os.path.join(REPO, "configs", "ar_code_100m.py")
BLOCK_CONFIG = os.path.join(REPO, "configs", "block_from_ar_code_100m.py")
# Settings in the order they are measured (the budget may end the list): the AR decoder first (every ratio needs
# it), then the fused-commit block sampler from the most to the least cautious threshold, then the multi-canvas one.
SETTINGS = (("ar", "ar", None), ("block_fused threshold 0.9", "block_fused", 0.9),
            ("block_fused threshold 0.7", "block_fused", 0.7), ("block_fused threshold 0.5", "block_fused", 0.5),
            ("block_threshold 0.9", "block_threshold", 0.9), ("block_fused threshold 0.3", "block_fused", 0.3),
            ("block_threshold 0.7", "block_threshold", 0.7))
# A model small enough for two CPU cores: the script's mechanics in seconds, not its numbers.
SMOKE_OVERRIDES = {"model.vocab_size": "512", "model.embed_dim": "64", "model.num_layers": "3", "model.num_heads": "2",
                   "model.head_dim": "32", "model.num_kv_heads": "1", "model.sliding_window": "32",
                   "model.global_head_dim": "32", "model.global_num_kv_heads": "1", "model.mlp_dim": "128",
                   "model.num_experts": "4", "model.expert_dim": "64", "model.compute_dtype": "float32",
                   "train.batch_size": "8", "train.seq_len": "128", "eval.max_sequences": "16",
                   "eval.batch_size": "8", "train.warmup_steps": "5"}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="folder for gpu_pair.json and samples.txt")
  p.add_argument("--workdir", default="", help="runs, data and compilation cache (default: OUT/../gpu_pair_work)")
  p.add_argument("--smoke", action="store_true", help="tiny model, tiny corpus, budgets of seconds (CPU)")
  p.add_argument("--corpus_mb", type=float, default=120.0)
  p.add_argument("--ar_budget_s", type=float, default=140.0)
  p.add_argument("--reserve_s", type=float, default=25.0,
                 help="of each training budget, the time kept for the final checkpoint and evaluation")
  p.add_argument("--cap_mfu", type=float, default=0.7,
                 help="the AR step cap: steps at this MFU over the budget (above what the card reaches)")
  p.add_argument("--ar_steps", type=int, default=0, help="a fixed AR step count (0: the clock decides)")
  p.add_argument("--block_budget_s", type=float, default=140.0)
  p.add_argument("--block_steps", type=int, default=0, help="a fixed block step count (0: the clock decides)")
  p.add_argument("--gen_budget_s", type=float, default=130.0)
  p.add_argument("--gen_length", type=int, default=256)
  p.add_argument("--prompt_tokens", type=int, default=64)
  p.add_argument("--num_prompts", type=int, default=32, help="the serving batch: one held-out prompt per row")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ceiling_rows", type=int, default=32)
  p.add_argument("--only", default="", help="comma-separated generation settings to measure (default: all of "
                 + ", ".join(label for label, _, _ in SETTINGS) + "); 'ar' always runs")
  p.add_argument("--skip", default="", help="comma-separated phases to skip (ceiling, generate)")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override for both models (e.g. model.attention_impl=xla)")
  args = p.parse_args(argv)
  unknown = set(filter(None, args.only.split(","))) - {label for label, _, _ in SETTINGS}
  if unknown:
    p.error(f"--only: {', '.join(sorted(unknown))} is no setting; valid: {', '.join(l for l, _, _ in SETTINGS)}")
  if args.smoke:
    # Step counts, not the clock, size a smoke run (a shared CPU's start-up varies by minutes); the budgets stay
    # as guards.
    defaults = dict(corpus_mb=1.0, ar_steps=6, block_steps=4, ar_budget_s=600.0, block_budget_s=600.0,
                    gen_budget_s=600.0, gen_length=32, prompt_tokens=16, num_prompts=4, repeats=1, ceiling_rows=8)
    for name, value in defaults.items():
      if getattr(args, name) == p.get_default(name):
        setattr(args, name, value)
  return args


class Report:
  """The JSON report, rewritten whole after every change, so a killed run leaves what it measured."""

  def __init__(self, path: str, **fields):
    self.path = path
    self.data = dict(fields, phases={})

  def phase(self, name: str, **fields) -> dict:
    entry = self.data["phases"].setdefault(name, {})
    entry.update(fields)
    self.save()
    return entry

  def save(self) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(tmp, self.path)


def log(text: str) -> None:
  print(f"[gpu_pair {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_phase(report: Report, name: str, fn, *args):
  """Runs one phase; a failure is recorded (with its traceback's tail) and the next phases still run."""
  start = time.perf_counter()
  log(f"phase {name}")
  try:
    result = fn(*args)
    report.phase(name, status="ok", seconds=round(time.perf_counter() - start, 1))
    return result
  except Exception as e:  # pylint: disable=broad-except
    report.phase(name, status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                 traceback=traceback.format_exc()[-4000:], seconds=round(time.perf_counter() - start, 1))
    log(f"phase {name} failed: {type(e).__name__}: {e}")
    return None


def build_corpus(args, data_dir: str, vocab_size: int, report: Report) -> dict:
  start = time.perf_counter()
  manifest = python_packages.build(data_dir, vocab_size=vocab_size, max_bytes=int(args.corpus_mb * 1e6))
  splits = manifest["splits"]
  info = {"build_seconds": round(time.perf_counter() - start, 1), "folders": manifest["folders"],
          "python": manifest["python"], "skipped": manifest["skipped"], "train_packages": len(manifest["units"]["train"]),
          "train": {"documents": splits["train"]["documents"], "mb": round(splits["train"]["bytes"] / 1e6, 1),
                    "tokens": splits["train"]["tokens"]},
          "heldout": {"documents": splits["heldout"]["documents"], "mb": round(splits["heldout"]["bytes"] / 1e6, 2),
                      "tokens": splits["heldout"]["tokens"], "packages": manifest["units"]["heldout"]}}
  report.phase("corpus", **info)
  return info


def run_summary(summary: dict) -> dict:
  ev = summary.get("eval") or {}
  keep = ("start_step", "final_step", "final_loss", "tokens_per_sec", "mfu", "wall_time_s", "stopped_by_time",
          "lr_decay")
  out = {k: summary.get(k) for k in keep}
  out["eval"] = {k: ev.get(k) for k in ("bits_per_token", "stderr_bits_per_token", "ppl_bound", "num_tokens",
                                        "unigram_ppl", "exact")}
  return out


def timed_run(config_path: str, overrides: dict, workdir: str, cap_steps: int, runtime_s: float) -> dict:
  """Trains under the wsd_time schedule for `runtime_s` of stepping (at most `cap_steps` steps); the run's summary
  plus its measured step time and start-up (data, compilation, saving and evaluation: the wall time the steps do
  not account for)."""
  config = load_config(config_path, dict(overrides, **{"train.num_steps": str(cap_steps),
                                                      "train.lr_schedule": "wsd_time",
                                                      "train.max_runtime_s": str(runtime_s)}))
  tokens_per_step = int(config.train.batch_size) * int(config.train.seq_len)
  summary = train(config, workdir, show_progress=False)
  result = run_summary(summary)
  result["tokens_trained"] = result["final_step"] * tokens_per_step
  steps_run = result["final_step"] - result["start_step"]
  # One step only (a budget spent at once): the whole wall time bounds the step time from above.
  result["step_seconds"] = (tokens_per_step / summary["tokens_per_sec"] if summary.get("tokens_per_sec")
                            else summary["wall_time_s"] / max(steps_run, 1))
  result["overhead_seconds"] = max(summary["wall_time_s"] - result["step_seconds"] * steps_run, 0.0)
  return result


def train_ar(args, overrides: dict, ar_dir: str, report: Report) -> dict:
  config = load_config(AR_CONFIG, overrides)
  tokens_per_step = int(config.train.batch_size) * int(config.train.seq_len)
  flops = flops_per_token(ModelConfig.from_config_dict(config.model), int(config.train.seq_len))
  peak = peak_flops_per_device(float(config.train.peak_flops_per_device)) * jax.device_count()
  runtime_s = args.ar_budget_s - args.reserve_s
  cap = args.ar_steps or max(1, int(runtime_s * args.cap_mfu * peak / flops["train_flops_per_token"]
                                    / tokens_per_step))
  report.phase("ar", sizing={"tokens_per_step": tokens_per_step, "train_flops_per_token":
                             flops["train_flops_per_token"], "peak_flops": peak, "cap_mfu": args.cap_mfu,
                             "cap_steps": cap, "fixed_steps": bool(args.ar_steps), "budget_s": args.ar_budget_s,
                             "max_runtime_s": runtime_s})
  log(f"ar: {runtime_s:g}s of stepping, at most {cap} steps ({cap * tokens_per_step / 1e6:.1f}M tokens)")
  result = timed_run(AR_CONFIG, overrides, ar_dir, cap, runtime_s)
  report.phase("ar", run=result)
  return result


def train_block(args, overrides: dict, ar_dir: str, block_dir: str, ar_result: dict, report: Report) -> dict:
  overrides = dict(overrides, **{"init.checkpoint": os.path.join(ar_dir, "checkpoints")})
  runtime_s = args.block_budget_s - args.reserve_s
  cap = args.block_steps or max(1, int(runtime_s / ar_result["step_seconds"]))  # a block step is the slower
  report.phase("block", sizing={"cap_steps": cap, "fixed_steps": bool(args.block_steps),
                                "budget_s": args.block_budget_s, "max_runtime_s": runtime_s})
  log(f"block: {runtime_s:g}s of stepping, at most {cap} steps")
  result = timed_run(BLOCK_CONFIG, overrides, block_dir, cap, runtime_s)
  result["step_time_over_ar"] = result["step_seconds"] / ar_result["step_seconds"]
  report.phase("block", run=result)
  return result


def held_out_prompts(data_dir: str, count: int, length: int, needed: int) -> list[list[int]]:
  """`count` prompts of `length` tokens, one per held-out module spread over the split (in store order), each
  starting a quarter into the module (past its licence header and imports), from modules of `needed` tokens."""
  with open(os.path.join(data_dir, "manifest.json")) as f:
    heldout = open_split(data_dir, json.load(f), "heldout")
  tokens, starts = heldout.span(0, heldout.num_tokens)
  ends = np.append(starts[1:], len(tokens))
  documents = [tokens[a:b] for a, b in zip(starts, ends) if b - a >= needed * 4 // 3]
  if len(documents) < count:
    raise RuntimeError(f"only {len(documents)} held-out modules have {needed * 4 // 3} tokens; {count} prompts asked")
  picks = [documents[i * len(documents) // count] for i in range(count)]
  return [doc[len(doc) // 4: len(doc) // 4 + length].tolist() for doc in picks]


def timed(fn, *inputs):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*inputs))
  return time.perf_counter() - start, out


def measure_generation(args, overrides: dict, data_dir: str, ar_dir: str, block_dir: str, report: Report,
                       samples_path: str) -> None:
  started = time.perf_counter()
  ar_config = load_config(AR_CONFIG, overrides)
  block_config = load_config(BLOCK_CONFIG, dict(overrides, **{"init.checkpoint": os.path.join(ar_dir, "checkpoints")}))
  tokenizer = Tokenizer(os.path.join(ar_dir, "tokenizer.model"))
  ar_model, ar_step = restore_model(ar_config, ar_dir)
  block_model, block_step = restore_model(block_config, block_dir)
  block_size = int(block_config.objective.block_size)
  prompts = np.asarray(held_out_prompts(data_dir, args.num_prompts, args.prompt_tokens,
                                        args.prompt_tokens + args.gen_length), np.int32)
  P, batch = prompts.shape[1], len(prompts)
  generators = {"ar": Generator(ar_model, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id),
                "block": Generator(block_model, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id)}
  scorer = GenerativePerplexity(ar_model)
  gen = report.phase("generate", checkpoint_steps={"ar": ar_step, "block": block_step}, prompt_tokens=P,
                     gen_length=args.gen_length, serving_batch=batch, temperature=1.0, block_size=block_size,
                     results=[], left_out=[])
  configs = {}
  only = set(filter(None, args.only.split(","))) | {"ar"}
  for label, sampler, threshold in SETTINGS:
    if args.only and label not in only:
      continue
    options = GenerationOptions(sampler=sampler, gen_length=args.gen_length, temperature=1.0, stop_at_eos=False,
                                block_length=block_size, threshold=threshold or 0.9)
    objective = "ar" if sampler == "ar" else "block"
    options = validate_options(options, objective, block_size, int(block_config.train.seq_len))
    configs[label] = (objective, sampler_config(options), options)
  ar_fn = generators["ar"].compiled(configs["ar"][1], 1, P)
  served_ar = None
  one = jax.numpy.asarray(prompts[:1])
  many = jax.numpy.asarray(prompts)
  samples = open(samples_path, "w", encoding="utf-8")
  for label, (objective, cfg, options) in configs.items():
    if time.perf_counter() - started > args.gen_budget_s:
      gen["left_out"].append(label)
      report.save()
      continue
    generator = generators[objective]
    row = {"setting": label}
    # batch 1: compile, warm up, then --repeats timed runs, each followed by a paired AR run
    compile_start = time.perf_counter()
    fn = generator.compiled(cfg, 1, P)
    row["compile_seconds_batch1"] = round(time.perf_counter() - compile_start, 1)
    timed(fn, generator.state, one, jax.random.key(0))
    runs, paired = [], []
    for r in range(args.repeats):
      seconds, (_, calls, _) = timed(fn, generator.state, one, jax.random.key(r))
      runs.append((seconds, int(np.asarray(calls)[0])))
      paired.append(timed(ar_fn, generators["ar"].state, one, jax.random.key(r))[0])
    seconds = statistics.median(s for s, _ in runs)
    row.update(batch1_tokens_per_s=args.gen_length / seconds, batch1_seconds=seconds,
               batch1_model_calls=statistics.median(c for _, c in runs),
               batch1_ms_per_call=1e3 * seconds / max(statistics.median(c for _, c in runs), 1),
               batch1_x_ar_paired=statistics.median(paired) / seconds)
    # serving batch: every prompt in one call (warm-up, then one timed run whose rows are the quality samples)
    compile_start = time.perf_counter()
    fn = generator.compiled(cfg, batch, P)
    row["compile_seconds_batch"] = round(time.perf_counter() - compile_start, 1)
    timed(fn, generator.state, many, jax.random.key(100))
    seconds, (tokens, calls, _) = timed(fn, generator.state, many, jax.random.key(101))
    tokens, calls = np.asarray(tokens), np.asarray(calls)
    quality = scorer(tokens.tolist(), P, eos_id=-1)
    row.update(batch_tokens_per_s=batch * args.gen_length / seconds, batch_seconds=seconds,
               batch_mean_model_calls=float(calls.mean()),
               batch_tokens_per_call=args.gen_length / float(calls.mean()),
               gen_ppl=quality["gen_ppl"],
               unigram_entropy=statistics.mean(unigram_entropy(seq[P:]) for seq in tokens.tolist()))
    if SAMPLERS[options.sampler].serves:
      row.update(serving_throughput(generator, prompts, options, batch))
      served_ar = row if label == "ar" else served_ar
      if served_ar is not None:
        row["serving_x_ar"] = row["serving_tokens_per_s"] / served_ar["serving_tokens_per_s"]
    gen["results"].append(row)
    ar_row = gen["results"][0] if gen["results"][0]["setting"] == "ar" else None
    if ar_row is not None:
      row["gen_ppl_x_ar"] = row["gen_ppl"] / ar_row["gen_ppl"]
      row["batch_x_ar"] = row["batch_tokens_per_s"] / ar_row["batch_tokens_per_s"]
    report.save()
    log(f"{label}: batch 1 {row['batch1_tokens_per_s']:.0f} tok/s (x AR {row['batch1_x_ar_paired']:.2f}), batch "
        f"{batch} {row['batch_tokens_per_s']:.0f} tok/s, {row['batch_tokens_per_call']:.2f} tokens/call, gen-PPL "
        f"{row['gen_ppl']:.2f}, entropy {row['unigram_entropy']:.2f}" + (
            f"; served {row['serving_tokens_per_s']:.0f} tok/s ({row['serving_x_static']:.2f}x two static batches)"
            if "serving_tokens_per_s" in row else ""))
    for i in range(min(3, batch)):
      samples.write(f"===== {label} | prompt {i} =====\n{tokenizer.decode(tokens[i, :P].tolist())}"
                    f"\n----- completion -----\n{tokenizer.decode_continuation(tokens[i, :P], tokens[i, P:])}\n\n")
    samples.flush()
  samples.close()


def serving_throughput(generator, prompts, options, batch: int) -> dict:
  """Output tokens/s of 2 x `batch` requests (the held-out prompts twice, each with its own seed) served by
  continuous batching with `batch` slots, against the same requests in two static batches of `batch` (compiles
  excluded from both). A static batch runs each canvas until its slowest row commits it; the engine lets each row
  go on to its next canvas, and refills a slot as soon as its request ends."""
  requests = [p.tolist() for p in prompts] * 2
  seeds = list(range(200, 200 + len(requests)))
  static = generator.run_batches(requests, options, batch, seeds)
  static_seconds = sum(static[first]["seconds"] for first in range(0, len(requests), batch))
  served = generator.serve(requests, options, batch, seeds)
  served_seconds = max(r["seconds"] for r in served)
  served_rate = sum(r["new_tokens"] for r in served) / served_seconds
  static_rate = sum(r["new_tokens"] for r in static) / static_seconds
  return {"serving_requests": len(requests), "serving_slots": batch, "serving_tokens_per_s": served_rate,
          "static_two_batches_tokens_per_s": static_rate, "serving_x_static": served_rate / static_rate,
          "serving_mean_model_calls": sum(r["model_calls"] for r in served) / len(served),
          "serving_same_tokens_as_static": all(a["ids"] == b["ids"] for a, b in zip(static, served))}


def confidence_ceiling(args, overrides: dict, data_dir: str, ar_dir: str, report: Report) -> None:
  sys.path.insert(0, os.path.join(REPO, "bench"))
  from parallel_ceiling import confidence_profile, next_token_log_probs  # pylint: disable=import-outside-toplevel
  config = load_config(AR_CONFIG, overrides)
  model, step = restore_model(config, ar_dir)
  seq_len = int(config.train.seq_len)
  batches = make_eval_batches(data_dir, seq_len=seq_len, batch_size=8, max_sequences=args.ceiling_rows)
  tokens = np.concatenate([b["tokens"] for b in batches])
  segments = np.concatenate([b["segment_ids"] for b in batches])
  log_prob_fn = next_token_log_probs(model)
  log_probs = np.concatenate([log_prob_fn(tokens[i:i + 8], segments[i:i + 8]) for i in range(0, len(tokens), 8)])
  report.phase("ceiling", step=step, rows=len(tokens), **confidence_profile(log_probs, tokens, segments))


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  work = args.workdir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "gpu_pair_work")
  os.makedirs(work, exist_ok=True)
  data_dir = os.path.join(work, "data")
  ar_dir, block_dir = os.path.join(work, "ar"), os.path.join(work, "block")
  overrides = {"data.dir": data_dir, "compilation.cache_dir": os.path.join(work, "jax_cache"),
               **(SMOKE_OVERRIDES if args.smoke else {}), **dict(item.split("=", 1) for item in args.override)}
  device = jax.devices()[0]
  report = Report(os.path.join(args.out, "gpu_pair.json"), device=device.device_kind, platform=device.platform,
                  jax=jax.__version__, commit=os.environ.get("DIFFGEMMA_COMMIT", ""), smoke=args.smoke,
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), args=vars(args),
                  cpu_count=os.cpu_count())
  ar_config = load_config(AR_CONFIG, overrides)
  use_compilation_cache(ar_config)  # every phase's configs share the folder
  vocab_size = int(ar_config.model.vocab_size)
  if run_phase(report, "corpus", build_corpus, args, data_dir, vocab_size, report) is None:
    return 1
  ar = run_phase(report, "ar", train_ar, args, overrides, ar_dir, report)
  if ar is None:
    return 1
  block = run_phase(report, "block", train_block, args, overrides, ar_dir, block_dir, ar, report)
  skip = set(filter(None, args.skip.split(",")))
  if "ceiling" not in skip:  # before generation, whose last setting may run past the budget
    run_phase(report, "ceiling", confidence_ceiling, args, overrides, data_dir, ar_dir, report)
  if block is not None and "generate" not in skip:
    run_phase(report, "generate", measure_generation, args, overrides, data_dir, ar_dir, block_dir, report,
              os.path.join(args.out, "samples.txt"))
  report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  report.save()
  failed = [name for name, phase in report.data["phases"].items() if phase.get("status") == "failed"]
  log("done" + (f"; failed phases: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

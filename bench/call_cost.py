"""What one denoiser call costs against one autoregressive step: the break-even of parallel decoding.

  python bench/call_cost.py [--config configs/block_tiny.py] [--widths 1,4,16,32] [--json] [--override K=V ...]

A W-token call (`model.decode` on a 288-slot KV cache, W query tokens attending to the cache, logits for all W)
followed by one masked sampling step (proposals, confidences, threshold acceptance) is timed inside one jitted
`lax.fori_loop` of --calls calls (no host sync per call), with random weights of the config's model; the 1-token
call is the AR decoder's step. For each width the report gives ms per call and its ratio to the 1-token call,
which is the number of tokens a call of that width must commit on average for its sampler to match the AR
decoder's speed (twice that to double it). A sampler committing fewer is slower than AR decoding, whatever its
quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.config import load_config
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.sampling.parts import masked_step

NUM_SLOTS = 288  # a 32-token prompt and 256 new tokens, as bench/generate.py
LAST_START = 64 + 7 * 16  # the call window moves over [64, LAST_START]; it must end inside the cache
MAX_WIDTH = NUM_SLOTS - LAST_START
MASK = 4


def compiled_calls(graphdef, width: int, calls: int):
  """A jitted (state, tokens) -> checksum running `calls` calls of `width` tokens and their sampling steps."""

  @jax.jit
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    slots = jnp.arange(NUM_SLOTS, dtype=jnp.int32)[None]

    def body(i, carry):
      cache, acc = carry
      start = 64 + (i % 8) * 16  # the window moves, as a sampler's does (up to LAST_START)
      positions = (start + jnp.arange(width, dtype=jnp.int32))[None]
      mask = slots[:, None, :] <= positions[0][None, :, None]
      logits, cache = model.decode(tokens[:, :width], positions, mask, cache, slots, start, logits_start=0,
                                   logits_length=width)
      new, commit = masked_step(logits, jax.random.key(i), jnp.ones((1, width), bool), acceptance="threshold",
                                threshold=0.9, temperature=1.0, steps_left=width, mask_id=MASK)
      return cache, acc + new.sum() + commit.sum()

    return jax.lax.fori_loop(0, calls, body, (model.init_kv_cache(1, NUM_SLOTS), jnp.int32(0)))[1]

  return run


def call_cost_ms(run, state, width: int, calls: int, repeats: int) -> float:
  """Median ms of one call (and its sampling step) over `repeats` runs of `calls` calls of a compiled `run`."""
  tokens = jnp.full((1, width), 7, jnp.int32)
  run(state, tokens).block_until_ready()  # compile (first time) and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(state, tokens).block_until_ready()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times) / calls


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/block_tiny.py")
  p.add_argument("--widths", default="1,4,16,32", help="tokens per call; 1 (the AR step) is always measured")
  p.add_argument("--calls", type=int, default=64)
  p.add_argument("--repeats", type=int, default=7, help="timed runs of --calls calls per round (median)")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the widths (median)")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  try:
    widths = sorted({1, *(int(w) for w in args.widths.split(","))})
  except ValueError:
    p.error(f"--widths: comma-separated integers, got {args.widths!r}")
  if not 1 <= widths[0] <= widths[-1] <= MAX_WIDTH:
    p.error(f"--widths: each must lie in [1, {MAX_WIDTH}] (the moving call window must fit the {NUM_SLOTS}-slot "
            f"cache), got {args.widths!r}")
  for name in ("calls", "repeats", "rounds"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  config = load_config(args.config, dict(item.split("=", 1) for item in args.override))
  graphdef, state = nnx.split(build_model(ModelConfig.from_config_dict(config.model), 0))
  # Interleaved rounds: each width is timed once per round, so a load change on a shared machine hits them all.
  runs = {w: compiled_calls(graphdef, w, args.calls) for w in widths}
  load = benchlib.MachineLoad()
  per_width = {w: [] for w in widths}
  for _ in range(args.rounds):
    for w in widths:
      per_width[w].append(call_cost_ms(runs[w], state, w, args.calls, args.repeats))
  ms = {w: statistics.median(v) for w, v in per_width.items()}
  # A call costing r AR steps must commit r tokens on average to match the AR decoder, 2r to double it.
  rows = [{"tokens_per_call": w, "ms_per_call": ms[w], "x_ar_step": ms[w] / ms[1],
           "tokens_per_call_for_2x": 2 * ms[w] / ms[1]} for w in widths]
  report = {"config": args.config, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "dispatch": str(config.model.dispatch), "num_slots": NUM_SLOTS, "rows": rows, **load.report()}
  if args.json:
    print(json.dumps(report, indent=1))
    return 0
  print(f"{args.config} on {report['device']} ({report['backend']}), {NUM_SLOTS}-slot cache, random weights")
  print("x AR step: the call's cost in AR steps = the tokens it must commit on average to match the AR decoder")
  print(f"{'tokens/call':>11s} {'ms/call':>8s} {'x AR step':>9s} {'for 2x AR':>9s}")
  for r in rows:
    print(f"{r['tokens_per_call']:>11d} {r['ms_per_call']:>8.3f} {r['x_ar_step']:>9.2f} "
          f"{r['tokens_per_call_for_2x']:>9.2f}")
  print(load.line())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

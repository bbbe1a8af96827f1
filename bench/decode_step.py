"""The cached decoding step against the length of its KV cache: what a step costs per cached slot.

  python bench/decode_step.py [--config configs/ar_tiny.py] [--batch_sizes 1,32] [--slots 96,288,864] [--json]

A jitted `lax.fori_loop` of --steps AR decoding steps (`sampling.autoregressive.decode_step`: one token per row
written into the cache and attending to it; random weights of the config's model) is timed for each batch size,
cache length and layer layout (`model.scan_layers` False and True), all in one run. Each row gives ms per step and,
against the shortest cache in the same run, how much the step grows per cached slot: attention must read every
slot's key and value once, so that growth is the cache's share of a step; anything that copies the cache (a
unit's slice taken out and written back, a scan's inputs and outputs) multiplies it.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.config import load_config
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.sampling.autoregressive import decode_step


def step_ms(cfg: ModelConfig, batch: int, slots: int, steps: int, repeats: int) -> float:
  """Median ms per step of `steps` decoding steps at `batch` rows into a cache of `slots` slots."""
  graphdef, state = nnx.split(build_model(cfg))

  @jax.jit
  def run(state, token_B):
    model = nnx.merge(graphdef, state)

    def body(i, carry):
      cache, token = carry
      logits, cache = decode_step(model, token, slots - steps + i, cache)
      return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (model.init_kv_cache(batch, slots), token_B))[1]

  token = jnp.full((batch,), 7, jnp.int32)
  seconds, _ = benchlib.median_seconds(lambda: run(state, token).block_until_ready(), warmup=1, runs=repeats)
  return 1e3 * seconds / steps  # the warm-up call compiles


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/ar_tiny.py")
  p.add_argument("--batch_sizes", default="1,32")
  p.add_argument("--slots", default="96,288,864", help="cache lengths (the first is the reference)")
  p.add_argument("--steps", type=int, default=64, help="timed steps per run (the last ones of the cache)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", action="store_true")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batch_sizes.split(",")]
  slots = [int(s) for s in args.slots.split(",")]
  if min(slots) <= args.steps:
    p.error(f"--slots: each cache must hold more than --steps={args.steps} slots")
  load = benchlib.MachineLoad()
  rows = []
  for scan in (False, True):
    overrides = dict(item.split("=", 1) for item in args.override)
    overrides["model.scan_layers"] = str(scan)
    cfg = ModelConfig.from_config_dict(load_config(args.config, overrides).model)
    for batch in batches:
      reference = None
      for num_slots in slots:
        ms = step_ms(cfg, batch, num_slots, args.steps, args.repeats)
        row = {"scan_layers": scan, "batch": batch, "slots": num_slots, "ms_per_step": round(ms, 4)}
        if reference is None:
          reference = (num_slots, ms)
        else:
          row["us_per_slot"] = round(1e3 * (ms - reference[1]) / (num_slots - reference[0]), 3)
          row["x_shortest"] = round(ms / reference[1], 3)
        rows.append(row)
        if not args.json:
          extra = (f", {row['us_per_slot']} us per extra slot, {row['x_shortest']}x the {reference[0]}-slot step"
                   if "us_per_slot" in row else "")
          print(f"scan_layers={scan} B={batch} S={num_slots}: {ms:.3f} ms/step{extra}", flush=True)
  report = {"config": args.config, "commit": benchlib.commit(), "steps": args.steps, "rows": rows,
            "device": jax.devices()[0].device_kind, **load.report()}
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print(load.line())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

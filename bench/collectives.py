"""What a config's train step communicates on its mesh, per device and step, before any run: the collectives of the
compiled step (`diffgemma_jax/parallel/collectives.py`), by kind, and the largest ones with the operation each
comes from. Compiling needs no memory for the model (abstract state and batch), so a 26B config's step on 8 fake
CPU devices compiles on this 2-core machine.

  python bench/collectives.py --config configs/diffusiongemma_26b_a4b.py --devices 8 --config.mesh.shape='(1,1,8,1)'
  python bench/collectives.py --config configs/pretrain_gpu_1b.py --devices 8 --config.mesh.shape='(1,8,1,1)' --json

The ratio it prints is the step's bytes moved by collectives against the bytes of the parameters a device holds
(once-per-step all-reduce of a replicated model's gradient would be 1.0x). --devices N fakes N CPU devices (set
before JAX starts); on a GPU host, leave it out to compile for the real devices. Mind: XLA:CPU forms no
reduce-scatter, so an FSDP gradient shows as an all-reduce of the whole array here and as a reduce-scatter on GPU.

It also prints the compiled step's temporary buffers per device (XLA's `memory_analysis()`: activations, the
dispatch's buffers, gradients in flight; not the parameters and optimizer state it is given). XLA:CPU computes
bfloat16 in float32 and fuses differently, so read a CPU figure as a comparison between two versions of the code
or two meshes, not as what a GPU needs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a config file (configs/*.py)")
  parser.add_argument("--devices", type=int, default=None, help="fake this many CPU devices (default: the real ones)")
  parser.add_argument("--top", type=int, default=12, help="list the largest N collectives")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  return parser.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = _parse(argv)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import jax  # pylint: disable=import-outside-toplevel

  from diffgemma_jax.config import load_config  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.parallel import collectives  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train import compile_train_step  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train.memory import bytes_per_device, executable_memory  # pylint: disable=import-outside-toplevel
  from launch.common import config_overrides, fail, fake_cpu_devices  # pylint: disable=import-outside-toplevel
  try:
    if args.devices:
      fake_cpu_devices(args.devices)
    config = load_config(args.config, config_overrides(overrides))
    built = compile_train_step(config, mask_id=4)
  except ConfigError as e:
    return fail(str(e))
  B, L = int(config.train.batch_size), int(config.train.seq_len)
  compiled = built.lower_abstract(B, L).compile()
  hlo = compiled.as_text()
  account = executable_memory(compiled)  # XLA's own accounting; None where a backend gives none
  temp = account["temporaries"] if account is not None else None
  found = collectives.inventory(hlo)
  by_kind = collectives.summary(found)
  moved = sum(entry["bytes"] for entry in by_kind.values())
  held = bytes_per_device(built.abstract_state.params, built.state_shardings.params)  # the parameters a device holds
  mesh = dict(zip(built.mesh.axis_names, built.mesh.devices.shape))
  largest = sorted(found, key=lambda c: -c.bytes * c.runs)[:args.top]
  report = {"config": args.config, "mesh": mesh, "batch": [B, L], "platform": jax.devices()[0].platform,
            "by_kind": by_kind, "bytes_per_step": moved, "param_bytes_per_device": held,
            "ratio_moved_to_params": moved / max(held, 1), "temp_bytes_per_device": temp,
            "largest": [{"kind": c.kind, "shape": c.shape, "bytes": c.bytes, "runs": c.runs, "op": c.op_name}
                        for c in largest]}
  if args.json:
    print(json.dumps(report, indent=2))
    return 0
  print(f"{args.config} on {mesh} ({report['platform']}), batch {B} x {L}")
  print(f"{'kind':<20}{'ops':>6}{'runs':>8}{'MB per step':>14}")
  for kind, entry in sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"]):
    print(f"{kind:<20}{entry['ops']:>6}{entry['runs']:>8}{entry['bytes'] / 2**20:>14.1f}")
  print(f"moved {moved / 2**20:.1f} MB per step per device; parameters held {held / 2**20:.1f} MB: "
        f"{report['ratio_moved_to_params']:.2f}x")
  if temp is not None:
    print(f"temporary buffers {temp / 2**20:.1f} MB per device (XLA's memory analysis of the compiled step)")
  print("largest:")
  for c in largest:
    print(f"  {c.kind:<18} {c.shape[:48]:<48} x{c.runs:<4} {c.bytes * c.runs / 2**20:>9.1f} MB  {c.op_name[-70:]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

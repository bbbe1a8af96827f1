"""diffgemma-inspect --config FILE [--json] [--seq_len N] [--memory [--compile] [--devices N]
[--device_memory_gib G]]: parameter totals and FLOPs of a config; with --memory, what its train step holds in each
device's memory on its mesh (the parameters and optimizer state, exactly; with --compile, XLA's account of the
compiled step: temporaries and the peak); --devices N plans for N devices faked on the CPU (a cluster's mesh from
one machine).

diffgemma-inspect --workdir DIR [--json]: what a run holds: its checkpoints (size, intact or damaged, the held-out
bound recorded with each, the moving average, the latest and the best), the folders beside them that are not
steps, and the run's starts (train/listing.py). Reads listings and small files only."""

from __future__ import annotations

import argparse
import json
import sys

from diffgemma_jax.config import load_config
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.inspect import inspect_model
from diffgemma_jax.train.listing import format_run, list_run
from .common import Outputs, config_overrides, fail, fake_cpu_devices, load_run_config

MASK_ID = 4  # the step needs a mask id to trace; the tokenizer's does not change what the step holds


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3f}{unit}"
  return f"{n:.0f}"


def memory_report(config, *, compile_step: bool) -> dict:
  """Bytes per device of the config's train state on its mesh, and with `compile_step` XLA's account of the step."""
  from diffgemma_jax.train.compiled import compile_train_step  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train.memory import device_limit, state_memory, step_memory  # pylint: disable=import-outside-toplevel
  built = compile_train_step(config, mask_id=MASK_ID)  # the mesh checked as the trainer checks it
  state = state_memory(built.abstract_state, built.state_shardings, built.trainable)
  devices = built.mesh.devices
  report = {"mesh": dict(zip(built.mesh.axis_names, devices.shape)), "devices": int(devices.size),
            "platform": devices.flat[0].platform,
            "optimizer": str(config.train.optimizer) + (f", first moment {config.train.adam_mu_dtype}"
                                                        if config.train.adam_mu_dtype else ""),
            "batch": [int(config.train.batch_size), int(config.train.seq_len)],
            "state_bytes": {"trainable_params": state.trainable_params, "frozen_params": state.frozen_params,
                            "optimizer": state.optimizer, "step": state.step,
                            "moving_average": state.moving_average, "total": state.total}}
  report["device_limit_bytes"] = device_limit(devices.flat[0])  # a GPU's allocator limit; None on the CPU
  if compile_step:
    report["step_bytes"] = step_memory(built, *report["batch"])
  return report


def _memory_lines(report: dict, device_memory_gib: float | None, compute_dtype: str) -> list[str]:
  from diffgemma_jax.train.memory import binary_bytes as gib  # pylint: disable=import-outside-toplevel
  mesh = " x ".join(f"{axis} {size}" for axis, size in report["mesh"].items())
  state = report["state_bytes"]
  lines = [f"memory per device        mesh {mesh} ({report['devices']} {report['platform']} device(s)), "
           f"batch {report['batch'][0]} x {report['batch'][1]}",
           f"  parameters             {gib(state['trainable_params'])} trained"
           + (f", {gib(state['frozen_params'])} frozen" if state["frozen_params"] else ""),
           f"  optimizer state        {gib(state['optimizer'])} ({report['optimizer']})"]
  if state["moving_average"]:
    lines.append(f"  moving average         {gib(state['moving_average'])} (train.ema_decay, float32)")
  lines += [f"  train state            {gib(state['total'])}"]
  step = report.get("step_bytes")
  need = state["total"]
  # a CPU compile of a model computing in bfloat16 (a GPU config planned with --devices) holds it in float32
  rough = report["platform"] == "cpu" and compute_dtype != "float32"
  if "step_bytes" in report and step is None:
    lines.append(f"  step                   XLA:{report['platform']} gives no memory account")
  elif step is not None:
    lines += [f"  step temporaries       {gib(step['temporaries'])} (XLA:{report['platform']}'s buffer assignment)",
              f"  step peak              {gib(step['peak'])} (arguments {gib(step['arguments'])} + outputs "
              f"{gib(step['outputs'])} - donated {gib(step['aliased'])} + temporaries)"]
    need = step["peak"]
    if rough:
      lines.append(f"  (XLA:CPU computes {compute_dtype} in float32 and fuses differently from a GPU: its "
                   "temporaries are a rough figure for one; the train state's bytes are exact)")
  if device_memory_gib is not None:
    share = f"{gib(need)} ({need / (device_memory_gib * 2 ** 30):.0%})"
    label = f"of {device_memory_gib:g} GiB"
    if step is None:
      lines.append(f"  {label:<22} the train state takes {share}; the step's temporaries come on top (--compile)")
    elif rough:
      lines.append(f"  {label:<22} the step's peak takes {share} by XLA:CPU's account: no verdict for a GPU "
                   "(--compile on the GPU host, without --devices, gives one)")
    else:
      verdict = "fits" if need <= device_memory_gib * 2 ** 30 else "does not fit"
      lines.append(f"  {label:<22} the step's peak takes {share}: {verdict}")
  return lines


def _list_run(args, rest: list[str]) -> int:
  """--workdir: the run's listing, printed as text or JSON."""
  try:
    if rest or args.memory or args.compile or args.seq_len is not None or args.devices is not None or (
        args.device_memory_gib is not None):
      raise ConfigError("--workdir lists a run: it takes --json only (--memory, --compile, --devices, "
                        "--device_memory_gib, --seq_len and --config.* overrides go with --config)")
    report = list_run(args.workdir)
  except ConfigError as e:
    return fail(str(e))
  print(json.dumps(report, indent=2) if args.json else "\n".join(format_run(report)))
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="diffgemma-inspect", description=__doc__)
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--config", help="config file, optionally path.py:arg")
  what.add_argument("--workdir", help="a training run's workdir (local or a bucket URL): list what it holds")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--seq_len", type=int, default=None, help="context for attention FLOPs (default train.seq_len)")
  parser.add_argument("--memory", action="store_true",
                      help="bytes per device of the train state on the config's mesh (mesh.shape; every device "
                      "JAX sees, or --devices)")
  parser.add_argument("--compile", action="store_true",
                      help="with --memory: compile the train step (minutes for a large config) for XLA's account "
                      "of its temporaries and peak")
  parser.add_argument("--devices", type=int, default=None,
                      help="with --memory: plan for this many devices, faked on the CPU (needs a process of its own)")
  parser.add_argument("--device_memory_gib", type=float, default=None,
                      help="with --memory: one device's memory in GiB to compare with (an H100 80GB: 79.6; "
                      "default on a GPU: what XLA's allocator may use of it)")
  args, rest = parser.parse_known_args(argv)
  if args.workdir is not None:
    return _list_run(args, rest)
  try:
    if not args.memory and (args.compile or args.devices is not None or args.device_memory_gib is not None):
      raise ConfigError("--compile, --devices and --device_memory_gib go with --memory")
    if args.device_memory_gib is not None and not args.device_memory_gib > 0:
      raise ConfigError(f"--device_memory_gib {args.device_memory_gib:g}: give one device's memory in GiB, > 0")
    if args.memory:
      if args.devices is not None:
        fake_cpu_devices(args.devices)
      config = load_run_config(args.config, config_overrides(rest))  # --compile compiles: the config's cache
    else:
      config = load_config(args.config, config_overrides(rest))  # nothing compiles: no compilation cache
    report = inspect_model(ModelConfig.from_config_dict(config.model), args.seq_len or config.train.seq_len)
    if args.memory:
      report["memory"] = memory_report(config, compile_step=args.compile)
    outputs = Outputs(config)  # process 0 of a multi-process launch prints, the others nothing
  except ConfigError as e:
    return fail(str(e))
  if args.json:
    outputs.print(json.dumps(report, indent=2))
    return 0
  lines = [f"config                   {args.config}",
           f"total parameters         {_human(report['total_params'])} ({report['total_params']:,})",
           f"active per token         {_human(report['active_params_per_token'])} "
           f"({report['active_params_per_token']:,})"]
  lines += [f"  {name:<22} {_human(count)}" for name, count in report["params_by_component"].items()]
  lines += [f"forward FLOPs per token  {_human(report['forward_flops_per_token'])} at seq_len {report['seq_len']}",
            f"train FLOPs per token    {_human(report['train_flops_per_token'])}"]
  if args.memory:
    memory, limit = report["memory"], args.device_memory_gib
    if limit is None and memory["device_limit_bytes"]:
      limit = memory["device_limit_bytes"] / 2 ** 30  # the device's own: what XLA's allocator may use of it
    lines += _memory_lines(memory, limit, str(config.model.compute_dtype))
  outputs.print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

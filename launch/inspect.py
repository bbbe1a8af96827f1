"""diffgemma-inspect --config FILE [--json] [--seq_len N]: parameter totals and FLOPs of a config."""

from __future__ import annotations

import argparse
import json
import sys

from diffgemma_jax.config import load_config
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.inspect import inspect_model
from .common import Outputs, config_overrides, fail


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3f}{unit}"
  return f"{n:.0f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="diffgemma-inspect", description=__doc__)
  parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--seq_len", type=int, default=None, help="context for attention FLOPs (default train.seq_len)")
  args, rest = parser.parse_known_args(argv)
  try:
    config = load_config(args.config, config_overrides(rest))  # nothing compiles: no compilation cache
    report = inspect_model(ModelConfig.from_config_dict(config.model), args.seq_len or config.train.seq_len)
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
  outputs.print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

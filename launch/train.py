"""diffgemma-train --config FILE --workdir DIR [--config.a.b=value ...]: train, resuming from DIR if it holds
checkpoints. Exit 2 on a bad config, data or workdir; exit 3 when a NaN/Inf loss stopped the run; exit 4 when
SIGTERM (a preemption notice) stopped it after saving a checkpoint of the step in flight (rerun to resume)."""

from __future__ import annotations

import argparse
import sys

from diffgemma_jax.errors import ConfigError, DataError, NonFiniteLossError
from diffgemma_jax.parallel.distributed import initialize_distributed
from diffgemma_jax.train import train
from .common import config_overrides, fail, load_run_config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="diffgemma-train", description=__doc__)
  parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and tb/ go here")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args, rest = parser.parse_known_args(argv)
  try:
    overrides = config_overrides(rest)
    config = load_run_config(args.config, overrides)
    initialize_distributed(config)  # before any device is touched; a no-op for one process
    summary = train(config, args.workdir, show_progress=not args.no_progress, overrides=overrides,
                    command=["diffgemma-train"] + list(sys.argv[1:] if argv is None else argv))
  except NonFiniteLossError as e:
    return fail(str(e), code=3)
  except (ConfigError, DataError) as e:
    return fail(str(e))
  return 4 if summary.get("stopped_by_signal") else 0


if __name__ == "__main__":
  sys.exit(main())

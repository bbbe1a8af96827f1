"""diffgemma-rollback --workdir DIR --step N [--skip_batches K]: roll a stopped run back to its checkpoint N, the
remedy for a loss spike: the steps after N are set aside (renamed `<step>.rolled-back`, kept), and the next
`diffgemma-train` with the run's usual command resumes from N, its logs after N dropped, its data stream K global
batches further on than N saved (the batches around the spike skipped). Stop the run's job first
(diffgemma_jax/train/rollback.py)."""

from __future__ import annotations

import argparse
import sys

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.train.rollback import ROLLBACK_FILE, roll_back
from .common import fail


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="diffgemma-rollback", description=__doc__)
  parser.add_argument("--workdir", required=True, help="the run's workdir (local or a bucket URL)")
  parser.add_argument("--step", required=True, type=int, help="the checkpoint step to resume from")
  parser.add_argument("--skip_batches", type=int, default=0, help="global batches of the data stream to skip "
                      "after that step's position (default 0: the same batches again)")
  args = parser.parse_args(argv)
  try:
    record = roll_back(args.workdir, args.step, args.skip_batches)
  except ConfigError as e:
    return fail(str(e))
  aside = ", ".join(record["set_aside"]) or "none"
  print(f"rolled {args.workdir} back to step {record['step']}: set aside {aside}; the next diffgemma-train resumes "
        f"from step {record['step']}" + (f" and skips {record['skip_batches']} batches" if record["skip_batches"]
                                          else "") + f" ({ROLLBACK_FILE})")
  return 0


if __name__ == "__main__":
  sys.exit(main())

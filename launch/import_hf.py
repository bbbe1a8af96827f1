"""diffgemma-import --hf DIR --output WORKDIR [--config-out FILE] [--force] [--config.model.KEY=VALUE ...]

Imports a Hugging Face DiffusionGemma directory (config.json + safetensors shards; the text part, vision skipped)
into WORKDIR/checkpoints (step 0, parameters only; the trainer's layout), copies its tokenizer.model (if any) to
WORKDIR and, with --config-out, writes a config file for it. A WORKDIR whose checkpoints/ is not empty is refused
unless --force, which deletes those checkpoints first. Overrides may change runtime model fields such as
scan_layers, remat or compute_dtype.
"""

from __future__ import annotations

import argparse
import sys

from diffgemma_jax.errors import ConfigError, MappingError
from diffgemma_jax.hf import import_hf
from .common import config_overrides, fail

RUNTIME_FIELDS = {"scan_layers": lambda v: v.lower() in ("1", "true", "yes"), "remat": str, "compute_dtype": str,
                  "param_dtype": str, "dispatch": str}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="diffgemma-import", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json, *.safetensors): a "
                      "local folder or a bucket URL (s3://..., gs://...), read in place tensor by tensor")
  parser.add_argument("--output", required=True, help="workdir to write checkpoints/ into (local or a bucket URL)")
  parser.add_argument("--config-out", default=None, help="write a config file (get_config()) for the model here "
                      "(local or a bucket URL)")
  parser.add_argument("--force", action="store_true", help="import into a workdir whose checkpoints/ is not empty, "
                      "deleting those checkpoints (and the workdir's tokenizer.model) first")
  args, rest = parser.parse_known_args(argv)

  try:
    overrides = {}
    for key, value in config_overrides(rest).items():
      field = key.removeprefix("model.")
      if not key.startswith("model.") or field not in RUNTIME_FIELDS:
        raise ConfigError(f"--config.{key}: only --config.model.<{'|'.join(RUNTIME_FIELDS)}> can be overridden; "
                          "the architecture comes from the Hugging Face config.json")
      overrides[field] = RUNTIME_FIELDS[field](value)
    import_hf(args.hf, args.output, config_out=args.config_out, force=args.force, **overrides)
  except (ConfigError, MappingError, FileNotFoundError) as e:
    return fail(str(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""diffgemma-export --config FILE --workdir DIR --output HF_DIR [--step N] [--dtype bfloat16]

Writes the latest (or --step) checkpoint of DIR as a Hugging Face DiffusionGemma directory that transformers'
DiffusionGemmaForBlockDiffusion.from_pretrained loads (text part; the vision tower stays at its initialisation),
with the run's tokenizer.model (DIR's pinned one, else data.tokenizer) and its bos/eos/pad ids, and as
max_position_embeddings the context its weights serve (an imported model's own, else the train.seq_len it trained
on). The trainable parameters are their moving average where the run kept one (train.ema_decay), unless
--config.checkpoint.weights=params.
"""

from __future__ import annotations

import argparse
import os
import sys

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError, DataError, MappingError
from diffgemma_jax.hf import export_hf, run_tokenizer
from diffgemma_jax.hf.export_hf import saved_params
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.train.reading import adopt_saved_lora, check_workdir, open_run, parse_step, trained_context
from .common import Outputs, config_overrides, fail, load_run_config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="diffgemma-export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
  parser.add_argument("--workdir", required=True, help="the run's workdir (holds checkpoints/)")
  parser.add_argument("--output", required=True, help="Hugging Face directory to write (local or a "
                      "bucket URL: written locally, then uploaded)")
  parser.add_argument("--step", default=None, help="checkpoint step (default: the latest; best: the one of lowest "
                      "recorded held-out bound)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="tensor dtype written")
  args, rest = parser.parse_known_args(argv)

  try:
    config = load_run_config(args.config, config_overrides(rest))
    outputs = Outputs(config)
    if not outputs.first:  # one process exports (a folder of files); a restore here would be work thrown away
      return 0
    storage.check_reachable(args.output, "--output")  # before the restore, not after it
    check_workdir(args.workdir, reading=True)
    config = adopt_saved_lora(config, os.path.join(args.workdir, "checkpoints"))
    cfg = ModelConfig.from_config_dict(config.model)
    tokenizer = run_tokenizer(args.workdir, str(config.data.tokenizer))
    run = open_run(args.workdir, parse_step(args.step, "--step"), weights=str(config.checkpoint.weights))
    pure = saved_params(run, cfg)
    print(f"restored {run.describe()} from {args.workdir}")
    export_hf(cfg, pure, args.output, context=trained_context(config, args.workdir),
              canvas_length=int(config.objective.block_size), dtype=args.dtype, tokenizer=tokenizer)
  except (ConfigError, MappingError, DataError) as e:
    return fail(str(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())

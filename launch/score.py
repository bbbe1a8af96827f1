"""diffgemma-score --config FILE --workdir DIR --records FILE.jsonl [--num_t_samples K] [--batch_size N] [--seed N]
[--layout continuation|sft] [--step N] [--json] [--output FILE.json | FILE.jsonl] [--config.a.b=value ...]: prints, per
{"prompt", "continuation"} record, the continuation's negative log-likelihood bound in nats given the prompt, with its standard error (the
estimator of the SFT evaluation: K stratified noise levels per record; exact for autoregressive models), then the
total in bits per token."""

from __future__ import annotations

import argparse
import json
import sys

from diffgemma_jax.errors import ConfigError, DataError
from diffgemma_jax.parallel.distributed import initialize_distributed
from diffgemma_jax.sampling.results_file import is_results_file
from diffgemma_jax.scoring import LAYOUTS, score_file
from diffgemma_jax.train.reading import parse_step
from .common import Outputs, config_overrides, fail, json_document, json_safe, load_run_config


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="diffgemma-score", description=__doc__)
  p.add_argument("--config", required=True, help="config file of the run, optionally path.py:arg")
  p.add_argument("--workdir", required=True, help="the training workdir holding checkpoints/")
  p.add_argument("--records", required=True, help="a UTF-8 JSONL file (local or a bucket URL), one {\"prompt\": "
                 "..., \"continuation\": ...} object per line")
  p.add_argument("--num_t_samples", type=int, default=None, help="noise levels per record (default: the config's "
                 "eval.num_t_samples); ignored by autoregressive models, whose value is exact")
  p.add_argument("--batch_size", type=int, default=None, help="records per model call (default eval.batch_size)")
  p.add_argument("--seed", type=int, default=None, help="default eval.seed; batch b draws from fold_in(seed, b)")
  p.add_argument("--layout", default="continuation", choices=LAYOUTS, help="continuation: [bos] prompt "
                 "continuation (the default); sft: the SFT evaluation's rows (chat template, EOS padding scored)")
  p.add_argument("--step", default=None, help="checkpoint step (default: the latest; best: the one of lowest "
                 "recorded held-out bound)")
  p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
  p.add_argument("--output", default=None, help="also write the JSON document (as --json prints it) here: a local "
                 "file or a bucket URL (s3://..., gs://...); FILE.jsonl: one JSON line per record as its chunk of "
                 "records is scored, and the same command run again after a kill scores only the records it lacks")
  return p


def main(argv=None) -> int:
  args, rest = _parser().parse_known_args(argv)
  try:
    config = load_run_config(args.config, config_overrides(rest))
    initialize_distributed(config)  # started on every host: one scoring, each process loading its rows
    outputs = Outputs(config)
    outputs.check(args.output, "--output")  # before the scoring, not after it
    kept = is_results_file(args.output)
    report = score_file(config, args.workdir, args.records, step=parse_step(args.step, "--step"),
                        num_t_samples=args.num_t_samples, batch_size=args.batch_size, seed=args.seed,
                        layout=args.layout, results_path=args.output if kept else None, write=outputs.first,
                        log=lambda text: print(text, file=sys.stderr, flush=True))
  except (ConfigError, DataError) as e:
    return fail(str(e))
  if not kept:  # the results in memory: one document, written (a results file was written as records were scored)
    document = json.dumps(json_safe(report), indent=2, allow_nan=False)
    outputs.write(args.output, document + "\n")
    lines = [document]
  else:  # read from the results file's lines as they are printed: ten million records never held as objects
    lines = json_document(json_safe({**report, "records": None}) | {"records": map(json_safe, report["records"])},
                          "records")
  if args.json:
    for line in lines:
      outputs.print(line)
    return 0
  for r in report["records"]:
    outputs.print(f"{r['source']}: {r['nll']:.4f} +- {r['stderr']:.4f} nats over {r['num_tokens']} tokens "
                  f"({r['nll_per_token']:.4f} per token)")
  s = report["summary"]
  estimate = "exact" if report["exact"] else f"bound, {report['num_t_samples']} noise levels per record"
  outputs.print(f"total: {s['nll']:.3f} nats over {s['num_tokens']} tokens of {s['num_records']} records, "
                f"{s['bits_per_token']:.4f} bits/token ({estimate}; step {report['step']}"
                + (" (moving average)" if report["weights"] == "ema" else "") + f", {report['layout']} layout)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

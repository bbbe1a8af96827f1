"""Scoring harness-style requests in rows as wide as they need against rows of the whole context.

  python bench/score_widths.py [--config configs/pretrain_tiny.py] [--seq_len 1024] [--requests 256] [--json]

lm-eval's loglikelihood requests (multiple choice: a question, then each answer) are mostly far shorter than a
model's context. `Scorer.score_ids` puts each (context, continuation) pair in the narrowest row of a ladder of
widths (powers of two from 16 up to train.seq_len) with proportionally more rows per call; the baseline is the
same pairs each in a row of the whole context (`Scorer.score_rows`, what the harness ran before), `eval.batch_size`
rows per call. Both score the same requests with the same random-weight model in one run, each timed after a
first call that compiles it; the ratio is requests per second, bucketed over full width. The requests: prompts of
--prompt_min to --prompt_max tokens, continuations of 1 to 8 (uniform), random token ids.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import jax
import numpy as np

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.config import load_config
from diffgemma_jax.data.tokenizer import BOS_ID, PAD_ID
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.scoring import Scorer, row_width

MASK_ID = 4  # the recipes' tokenizers: <mask> is the first user-defined piece after pad, unk, bos and eos


def timed(call) -> tuple[float, list]:
  start = time.perf_counter()
  out = call()
  return time.perf_counter() - start, out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/pretrain_tiny.py")
  p.add_argument("--seq_len", type=int, default=1024, help="the model's context (train.seq_len)")
  p.add_argument("--requests", type=int, default=256)
  p.add_argument("--prompt_min", type=int, default=32)
  p.add_argument("--prompt_max", type=int, default=480)
  p.add_argument("--batch_size", type=int, default=8, help="rows per call at full width")
  p.add_argument("--num_t_samples", type=int, default=4)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  config = load_config(args.config, {"train.seq_len": str(args.seq_len)})
  cfg = ModelConfig.from_config_dict(config.model)
  tokenizer = types.SimpleNamespace(bos_id=BOS_ID, pad_id=PAD_ID, mask_id=MASK_ID)
  scorer = Scorer(config, build_model(cfg), tokenizer, num_t_samples=args.num_t_samples, batch_size=args.batch_size)
  rng = np.random.default_rng(0)
  pairs = [(list(rng.integers(8, cfg.vocab_size, rng.integers(args.prompt_min, args.prompt_max + 1))),
            list(rng.integers(8, cfg.vocab_size, rng.integers(1, 9)))) for _ in range(args.requests)]
  full_rows = {k: np.stack([scorer.row(prompt, continuation)[k] for prompt, continuation in pairs])
               for k in ("tokens", "segment_ids", "positions", "loss_mask")}
  load = benchlib.MachineLoad()
  widths = [row_width(len(p) + len(c) + 1, args.seq_len) for p, c in pairs]
  for width in sorted(set(widths)):  # compile every width the timed run meets, and the full-width call
    scorer.score_ids([pairs[widths.index(width)]])
  scorer.score_rows({k: v[:1] for k, v in full_rows.items()})
  full_s, full = timed(lambda: scorer.score_rows(full_rows))
  bucketed_s, bucketed = timed(lambda: scorer.score_ids(pairs))
  assert [r["num_tokens"] for r in full] == [r["num_tokens"] for r in bucketed]
  report = {"config": args.config, "commit": benchlib.commit(), "device": jax.devices()[0].device_kind,
            "seq_len": args.seq_len, "requests": args.requests, "mean_row_tokens": float(np.mean(
                [len(p) + len(c) + 1 for p, c in pairs])), "widths": {str(w): widths.count(w) for w in sorted(
                    set(widths))}, "full_width_requests_per_s": round(args.requests / full_s, 2),
            "bucketed_requests_per_s": round(args.requests / bucketed_s, 2),
            "speedup": round(full_s / bucketed_s, 2), **load.report()}
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print(f"{args.requests} requests, mean {report['mean_row_tokens']:.0f} tokens, context {args.seq_len}: full "
          f"width {report['full_width_requests_per_s']} req/s, narrowest width {report['bucketed_requests_per_s']} "
          f"req/s: {report['speedup']}x (widths {report['widths']})")
    print(load.line())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

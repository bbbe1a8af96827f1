"""How parallel can decoding get at all? The ceiling a text distribution puts on tokens per denoiser call.

  python bench/parallel_ceiling.py --ar_workdir runs/ar_tiny_4k [--config configs/ar_tiny.py] [--json]
  python bench/parallel_ceiling.py --random_weights [--json]          (mechanics only: random ids, random model)

bench/call_cost.py says how many tokens a W-token denoiser call must commit to beat the AR decoder; this says how
many the distribution lets it commit. Both use the autoregressive model as the best available estimate of the
data's conditionals (an exact next-token model; the diffusion models' bounds are worse). On the held-out split:

1. **Confidence profile**: for each threshold tau, the fraction f of positions whose most likely next token has
   probability >= tau given the *whole* left context. Threshold decoding (Fast-dLLM) commits one token per call
   plus every other position at or above tau, so it needs at least (1 - f) calls per token: 1 / (1 - f) tokens per
   call is its ceiling for a denoiser as confident as the AR model with full left context. A masked position
   usually knows less (the tokens just before it may still be masks), so real samplers sit below it.
2. **Parallel pair cost**: at random held-out positions, the exact marginal q(b | x_<=t) = sum_a p(a | x_<=t)
   p(b | x_<=t, a) of the token after next (one model call per candidate a, the whole vocabulary in one batch), and
   the expected extra negative log-likelihood, under the AR model, of drawing (a, b) in one step (a ~ p, b ~ q
   independently) instead of in sequence: E_{a~p, b~q}[-log p(b | a)] - E_a H(p(. | a)), in nats, which equals
   the pair's mutual information I(a; b | x_<=t) plus E_a KL(q || p(. | a)) (>= 0, 0 only when b does not depend on
   a). It is what a perfect denoiser pays for committing two adjacent tokens in the same call; exp(its mean / 2) is
   the gen-PPL factor of committing every token in such a pair.
3. **Oracle-selected parallel decoding**: k tokens per call on average means a fraction 1 - 1/k of the tokens are
   committed beside an earlier token of the same call. If a perfect denoiser put exactly those tokens at the
   cheapest pair positions, each would pay its pair cost and nothing more: the gen-PPL factor
   exp((1 - 1/k) * mean of the cheapest 1 - 1/k of the pair costs). An estimate, not a bound (a token committed
   beside a non-adjacent one, or beside two, pays a different cost), of what k tokens per call costs in quality
   with the best possible denoiser of this distribution.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffgemma_jax.config import load_config
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.masks import make_mask
from diffgemma_jax.model.transformer import build_model
from diffgemma_jax.objectives.ar import next_token_nll

THRESHOLDS = (0.9, 0.7, 0.5, 0.3)
TOKENS_PER_CALL = (1.25, 1.5, 2.0, 2.75, 4.0, 5.45)
BOS = 2


def next_token_log_probs(model):
  """A jitted (tokens [B, T], segment_ids [B, T]) -> float32 log p(x_{l+1} = . | x_<=l) [B, T, V] (causal)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens_BT, segments_BT):
    m = nnx.merge(graphdef, state)
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
    logits, _ = m(tokens_BT, positions_BT, make_mask("causal", segments_BT, positions_BT),
                  token_mask_BL=segments_BT > 0)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  return lambda tokens, segments: np.asarray(run(state, np.asarray(tokens, np.int32),
                                                 np.asarray(segments, np.int32)))


def confidence_profile(log_probs_BTV, tokens_BT, segments_BT, thresholds=THRESHOLDS) -> dict:
  """Top next-token probability per scored position -> fractions at or above each threshold, the threshold
  decoder's tokens-per-call ceiling 1 / (1 - f), the mean next-token entropy and the exact perplexity."""
  nll, valid = (np.asarray(x) for x in next_token_nll(log_probs_BTV, tokens_BT, segments_BT))
  nll = nll[valid]
  lp = np.asarray(log_probs_BTV)[:, :-1][valid]  # [N, V]
  top = np.exp(lp.max(axis=-1))
  entropy = -np.sum(np.exp(lp) * np.where(np.isfinite(lp), lp, 0.0), axis=-1)
  rows = []
  for tau in thresholds:
    f = float(np.mean(top >= tau))
    rows.append({"threshold": tau, "fraction_confident": f,
                 "ceiling_tokens_per_call": 1.0 / (1.0 - f) if f < 1 else math.inf})
  return {"positions": int(len(top)), "mean_entropy_nats": float(entropy.mean()),
          "perplexity": float(math.exp(nll.mean())), "thresholds": rows}


def pair_excess_nats(log_prob_fn, tokens_T, segments_T, t: int) -> dict:
  """The extra -log-likelihood of drawing tokens t+1 and t+2 in one step from their exact marginals given x_<=t
  (see the module docstring); `log_prob_fn` maps [B, T] tokens and segments to [B, T, V] next-token log-probs."""
  # Whole rows (one compiled shape for every t): the model is causal, so the tokens after t + 1 change nothing.
  tokens_T, segments_T = np.asarray(tokens_T), np.asarray(segments_T)
  lp_a = log_prob_fn(tokens_T[None], segments_T[None])[0, t]
  V = lp_a.shape[-1]
  candidates = np.tile(tokens_T, (V, 1))
  candidates[:, t + 1] = np.arange(V)  # candidate a at t + 1; the output there is p(b | x_<=t, a)
  lp_b_given_a = log_prob_fn(candidates, np.tile(segments_T, (V, 1)))[:, t + 1]  # [V(a), V(b)]
  p_a = np.exp(lp_a)
  p_b_given_a = np.exp(lp_b_given_a)
  q_b = p_a @ p_b_given_a
  nll_b_given_a = np.where(p_b_given_a > 0, -lp_b_given_a, 0.0)
  parallel = float(p_a @ (nll_b_given_a @ q_b))
  sequential = float(p_a @ np.sum(p_b_given_a * nll_b_given_a, axis=-1))
  return {"excess_nats": parallel - sequential, "conditional_entropy_nats": sequential,
          "top_marginal": float(q_b.max())}


def oracle_parallel_factor(pair_costs, tokens_per_call: float) -> float:
  """exp((1 - 1/k) * mean of the cheapest 1 - 1/k of `pair_costs`) for k = `tokens_per_call` (see item 3)."""
  parallel = 1.0 - 1.0 / tokens_per_call
  costs = np.sort(np.asarray(pair_costs, np.float64))
  take = max(1, int(round(parallel * len(costs))))
  return float(math.exp(parallel * costs[:take].mean())) if parallel > 0 else 1.0


def pair_positions(segments_BT, count: int, seed: int, min_context: int):
  """`count` random (row, t) with tokens t+1 and t+2 in t's segment and at least `min_context` tokens of that
  segment before t."""
  segments_BT = np.asarray(segments_BT)
  ok = (segments_BT[:, :-2] > 0) & (segments_BT[:, 1:-1] == segments_BT[:, :-2]) & \
       (segments_BT[:, 2:] == segments_BT[:, :-2])
  ok[:, :min_context] = False
  if min_context:
    ok[:, min_context:] &= segments_BT[:, :-2 - min_context] == segments_BT[:, min_context:-2]
  rows, ts = np.nonzero(ok)
  if len(rows) == 0:
    raise SystemExit(f"no position with {min_context} tokens of context and two more after it; lower "
                     f"--min_context")
  pick = np.random.default_rng(seed).choice(len(rows), size=min(count, len(rows)), replace=False)
  return [(int(rows[i]), int(ts[i])) for i in pick]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/ar_tiny.py", help="the autoregressive model's config")
  p.add_argument("--ar_workdir", default=None, help="a trained autoregressive run (diffgemma-train --workdir)")
  p.add_argument("--random_weights", action="store_true", help="random model and ids: the mechanics only")
  p.add_argument("--sequences", type=int, default=64, help="held-out rows for the confidence profile")
  p.add_argument("--pairs", type=int, default=80, help="positions for the parallel pair cost")
  p.add_argument("--min_context", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  if not args.random_weights and not args.ar_workdir:
    p.error("pass --ar_workdir (a trained autoregressive run), or --random_weights for the mechanics only")
  for name in ("sequences", "pairs"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)}: must be >= 1")
  config = load_config(args.config, dict(item.split("=", 1) for item in args.override))
  if str(config.objective.name) != "ar":
    p.error(f"--config {args.config}: objective.name is {str(config.objective.name)!r}; the ceiling reads a next-"
            f"token model's conditionals, so pass an autoregressive run's config (objective.name 'ar', e.g. "
            f"configs/ar_tiny.py)")
  seq_len = int(config.train.seq_len)
  if args.random_weights:
    model, step = build_model(ModelConfig.from_config_dict(config.model), 0), None
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(5, int(config.model.vocab_size), (args.sequences, seq_len)).astype(np.int32)
    tokens[:, 0] = BOS
    segments = np.ones_like(tokens)
  else:
    from diffgemma_jax.data import make_eval_batches  # pylint: disable=import-outside-toplevel
    from diffgemma_jax.train.reading import restore_model  # pylint: disable=import-outside-toplevel
    from diffgemma_jax.train.dataset import dataset_dir  # pylint: disable=import-outside-toplevel
    model, step = restore_model(config, args.ar_workdir)
    batches = make_eval_batches(dataset_dir(config), seq_len=seq_len, batch_size=16, max_sequences=args.sequences)
    tokens = np.concatenate([b["tokens"] for b in batches])
    segments = np.concatenate([b["segment_ids"] for b in batches])
  log_prob_fn = next_token_log_probs(model)
  log_probs = np.concatenate([log_prob_fn(tokens[i:i + 16], segments[i:i + 16]) for i in range(0, len(tokens), 16)])
  profile = confidence_profile(log_probs, tokens, segments)
  pairs = [pair_excess_nats(log_prob_fn, tokens[row], segments[row], t)
           for row, t in pair_positions(segments, args.pairs, args.seed, args.min_context)]
  excess = np.array([pair["excess_nats"] for pair in pairs])
  report = {"config": args.config, "workdir": args.ar_workdir, "step": step, "random_weights": args.random_weights,
            "jax": jax.__version__, **profile,
            "pairs": {"count": len(pairs), "mean_excess_nats": float(excess.mean()),
                      "quantiles_excess_nats": dict(zip(("10%", "25%", "50%", "75%", "90%"),
                                                        np.quantile(excess, [.1, .25, .5, .75, .9]).tolist())),
                      "gen_ppl_factor_all_pairs": float(math.exp(excess.mean() / 2)),
                      "mean_conditional_entropy_nats": float(np.mean([x["conditional_entropy_nats"] for x in pairs])),
                      "fraction_top_marginal_ge_0.9": float(np.mean([x["top_marginal"] >= 0.9 for x in pairs])),
                      "excess_nats": excess.tolist()},
            "oracle_parallel": [{"tokens_per_call": k, "gen_ppl_factor": oracle_parallel_factor(excess, k)}
                                for k in TOKENS_PER_CALL]}
  if args.json:
    print(json.dumps(report, indent=1))
    return 0
  print(f"{report['positions']} positions, mean next-token entropy {report['mean_entropy_nats']:.3f} nats, "
        f"perplexity {report['perplexity']:.2f}")
  print("| threshold | positions at or above | threshold decoding ceiling (tokens/call) |\n|---:|---:|---:|")
  for row in report["thresholds"]:
    print(f"| {row['threshold']} | {row['fraction_confident']:.3f} | {row['ceiling_tokens_per_call']:.2f} |")
  pair = report["pairs"]
  print(f"parallel pair cost over {pair['count']} positions: mean {pair['mean_excess_nats']:.3f} nats, quantiles "
        + ", ".join(f"{k} {v:.3f}" for k, v in pair["quantiles_excess_nats"].items())
        + f"; gen-PPL x {pair['gen_ppl_factor_all_pairs']:.2f} if every token were committed in such a pair")
  print("oracle-selected parallel decoding, gen-PPL factor at k tokens per call: "
        + ", ".join(f"k={row['tokens_per_call']}: x{row['gen_ppl_factor']:.2f}" for row in report["oracle_parallel"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Held-out perplexity bounds (docs/objectives.md, "The bound and its errors"): PPL <= exp(sum_x NELBO(x) / sum_x L(x)).

The objective's `sequence_bound` gives each row's NELBO in nats (K stratified t samples over the full [eps, 1]
range; exact NLL for the autoregressive baseline) and its scored-token count. Over N rows with NELBO n_i and
length L_i the estimate is the ratio R = sum n_i / sum L_i, and its standard error is the delta-method one,
sqrt(N / (N - 1) * sum_i (n_i - R L_i)^2) / sum_i L_i: the spread across sequences, which already contains the
Monte-Carlo noise of each n_i. The Monte-Carlo part alone, sqrt(sum_i s_i^2) / sum_i L_i from each row's K-sample
standard error s_i (0 for the exact autoregressive value), is how far another `eval.seed` would move R on the same
rows: the error to use when two evaluations of the same rows are compared. Evaluation is deterministic given
`eval.seed`: batch b uses fold_in(seed, b).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffgemma_jax.data.mixture import mixture_bound
from diffgemma_jax.parallel.rules import batch_sharding, replicated

LN2 = math.log(2.0)


def make_bound_fn(graphdef, objective, *, num_t_samples: int, mesh: Mesh, param_shardings=None) -> Callable:
  """(params, batch, rng) -> (nelbo_B, stderr_B, num_tokens_B), jitted once for fixed-shape batches. `graphdef`
  is the model placed on `mesh` (`parallel.placement`)."""
  def bound(params, batch, rng):
    return objective.sequence_bound(nnx.merge(graphdef, params), batch, rng, num_t_samples=num_t_samples)

  return jax.jit(bound, in_shardings=(param_shardings, batch_sharding(mesh), replicated(mesh)),
                 out_shardings=replicated(mesh))


def summarize_bound(nelbo_N: np.ndarray, num_tokens_N: np.ndarray,
                    stderr_N: np.ndarray | None = None) -> dict[str, float]:
  """Bits per token, its standard error across sequences (delta method) and the perplexity bound; given the rows'
  Monte-Carlo standard errors `stderr_N`, also the Monte-Carlo standard error of the bits per token."""
  keep = num_tokens_N > 0
  nelbo_N, num_tokens_N = nelbo_N[keep].astype(np.float64), num_tokens_N[keep].astype(np.float64)
  total_tokens = float(np.sum(num_tokens_N))
  if total_tokens == 0:
    raise ValueError("the held-out set has no tokens to score")
  nats = float(np.sum(nelbo_N)) / total_tokens
  n = len(nelbo_N)
  if n > 1:
    residual = nelbo_N - nats * num_tokens_N
    stderr_nats = math.sqrt(n / (n - 1) * float(np.sum(residual ** 2))) / total_tokens
  else:
    stderr_nats = float("nan")
  # num_examples: scored rows (an SFT row is one example: one response with its prompt).
  result = {"num_tokens": int(total_tokens), "num_sequences": n, "num_examples": n, "nats_per_token": nats,
            "bits_per_token": nats / LN2, "stderr_bits_per_token": stderr_nats / LN2, "ppl_bound": math.exp(nats)}
  if stderr_N is not None:
    monte_carlo = math.sqrt(float(np.sum(np.square(stderr_N[keep].astype(np.float64))))) / total_tokens
    result["mc_stderr_bits_per_token"] = monte_carlo / LN2
  return result


def held_out_bound(bound_fn: Callable, params, batches, *, seed: int, num_t_samples: int,
                   mesh: Mesh) -> dict[str, float]:
  base = jax.random.key(seed)
  sharding = batch_sharding(mesh)
  nelbo, stderr, tokens = [], [], []
  for index, batch in enumerate(batches):
    batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
    nelbo_B, stderr_B, num_tokens_B = bound_fn(params, batch, jax.random.fold_in(base, index))
    nelbo.append(np.asarray(jax.device_get(nelbo_B)))
    stderr.append(np.asarray(jax.device_get(stderr_B)))
    tokens.append(np.asarray(jax.device_get(num_tokens_B)))
  result = summarize_bound(np.concatenate(nelbo), np.concatenate(tokens), np.concatenate(stderr))
  result["num_t_samples"] = int(num_t_samples)
  return result


def held_out_bounds(bound_fn: Callable, params, sets, *, seed: int, num_t_samples: int, mesh: Mesh) -> dict:
  """`held_out_bound` of one held-out set; for several [(name, weight, batches)] (data.mixture), each one's
  under `sources` and their weighted total (data/mixture.py)."""
  results = [(name, weight, held_out_bound(bound_fn, params, batches, seed=seed, num_t_samples=num_t_samples,
                                           mesh=mesh)) for name, weight, batches in sets]
  return results[0][2] if len(results) == 1 else mixture_bound(results)

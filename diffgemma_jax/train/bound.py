"""Held-out perplexity bounds (docs/objectives.md, "The bound and its errors"): PPL <= exp(sum_x NELBO(x) / sum_x L(x)).

The objective's `sequence_bound` gives each row's NELBO in nats (K stratified t samples over the full [eps, 1]
range; exact NLL for the autoregressive baseline) and its scored-token count. Over N rows with NELBO n_i and
length L_i the estimate is the ratio R = sum n_i / sum L_i, and its standard error is the delta-method one,
sqrt(N / (N - 1) * sum_i (n_i - R L_i)^2) / sum_i L_i: the spread across sequences, which already contains the
Monte-Carlo noise of each n_i. The Monte-Carlo part alone, sqrt(sum_i s_i^2) / sum_i L_i from each row's K-sample
standard error s_i (0 for the exact autoregressive value), is how far another `eval.seed` would move R on the same
rows: the error to use when two evaluations of the same rows are compared.

Evaluation is deterministic given `eval.seed`, row by row: a row draws from its own key, fold_in(seed, h), h a hash
of the row's tokens (`data.pipeline.row_hashes`), so its estimate is a function of the checkpoint, the seed and the
row alone: not of `eval.batch_size`, the process count, the rows beside it or how wide it is padded. A held-out
row and the same row scored by `diffgemma-score` get the same numbers.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffgemma_jax.data.mixture import mixture_bound
from diffgemma_jax.data.pipeline import row_hashes
from diffgemma_jax.parallel.rules import batch_sharding, replicated
from diffgemma_jax.train.bound_partial import PartialBound

LN2 = math.log(2.0)


def make_bound_fn(graphdef, objective, *, num_t_samples: int, mesh: Mesh, param_shardings=None) -> Callable:
  """(params, batch, key, row_ids) -> (nelbo_B, stderr_B, num_tokens_B), jitted once for fixed-shape batches; row
  b draws from fold_in(key, row_ids[b]) (`scored_batches` passes the rows' hashes). `graphdef` is the model placed
  on `mesh` (`parallel.placement`)."""
  def bound(params, batch, key, row_ids):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
    return objective.sequence_bound(nnx.merge(graphdef, params), batch, keys, num_t_samples=num_t_samples)

  return jax.jit(bound, in_shardings=(param_shardings, batch_sharding(mesh), replicated(mesh),
                                      batch_sharding(mesh, 1)), out_shardings=replicated(mesh))


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


class EvaluationStopped(Exception):
  """The evaluation was asked to stop (SIGTERM) after `done` of `total` batches; its partial results are saved."""

  def __init__(self, done: int, total: int, path: str | None):
    super().__init__(f"stopped after {done} of {total} held-out batches")
    self.done, self.total, self.path = done, total, path


def scored_batches(bound_fn: Callable, params, batches: Sequence[dict], *, seed: int, mesh: Mesh,
                   start: int = 0) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
  """(b, (nelbo_B, stderr_B, num_tokens_B) as numpy) for each batch b from `start`, each row keyed by its hash
  (`row_hashes`). The host reads batch b + 1 on a thread while the device scores batch b, and batch b's results are
  fetched (and yielded) after batch b + 1 is dispatched, so neither the reads nor the fetches stall the device.

  `batches` holds whole global batches, or this process's slice of each (`EvalBatches.num_slices` > 1: processes
  of a mesh spanning them each load their own rows, `parallel.mesh.batch_slice`), which every process's slice
  assembles into the global batch. The results are of the global batch's rows, the same on every process."""
  base = jax.random.key(seed)
  num_slices = int(getattr(batches, "num_slices", 1))

  def to_device(batch: dict, row_ids: np.ndarray):
    return global_batch(batch, mesh, num_slices), global_batch(row_ids, mesh, num_slices)

  def read(b):
    batch = {k: np.asarray(v) for k, v in batches[b].items()}
    return batch, row_hashes(batch)

  fetched = lambda out: tuple(np.asarray(x) for x in jax.device_get(out))  # noqa: E731
  total, pending = len(batches), None
  with concurrent.futures.ThreadPoolExecutor(1) as reader:
    upcoming = reader.submit(read, start) if start < total else None
    for index in range(start, total):
      batch, row_ids = upcoming.result()
      upcoming = reader.submit(read, index + 1) if index + 1 < total else None
      on_device, device_ids = to_device(batch, row_ids)
      out = bound_fn(params, on_device, base, device_ids)
      if pending is not None:
        yield index - 1, fetched(pending)
      pending = out
  if pending is not None:
    yield total - 1, fetched(pending)


def global_batch(local, mesh: Mesh, num_slices: int = 1):
  """A batch (a dict of [B, ...] arrays, or one array) on the mesh's batch sharding: `local` is the whole batch
  (`num_slices` 1), or this process's slice of it, which every process's slice assembles into the global batch
  (`EvalBatches.num_slices` > 1, `parallel.mesh.batch_slice`)."""
  if isinstance(local, dict):
    return {k: global_batch(v, mesh, num_slices) for k, v in local.items()}
  sharding = batch_sharding(mesh, np.ndim(local))
  if num_slices == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, (local.shape[0] * num_slices,) + local.shape[1:])


def held_out_bound(bound_fn: Callable, params, batches: Sequence[dict], *, seed: int, num_t_samples: int,
                   mesh: Mesh, partial: PartialBound | None = None, progress: Callable[[int, int], None] | None = None,
                   stop: Callable[[int], bool] | None = None) -> dict[str, float]:
  """The bound over `batches` (a sequence read batch by batch, `scored_batches`), each row keyed by its hash.

  `partial` (bound_partial.py) continues from the batches a previous run saved and saves as it goes (its file is
  left for the caller to discard); `progress(done, total)` is called after each batch; `stop(b)` True after
  batch b saves the partial results and raises EvaluationStopped."""
  partial = partial if partial is not None else PartialBound()
  total = len(batches)
  start = partial.resume(total)
  if start:
    partial.log(f"continuing from held-out batch {start} of {total} (the results before it: {partial.path})")
  for index, results in scored_batches(bound_fn, params, batches, seed=seed, mesh=mesh, start=start):
    partial.add(*results)
    partial.save()
    if progress is not None:
      progress(index + 1, total)
    if stop is not None and stop(index) and index + 1 < total:
      partial.save(force=True)
      raise EvaluationStopped(partial.done, total, partial.path)
  partial.save(force=True)  # a set finished is kept whole until the caller's other sets are done
  nelbo, stderr, tokens = partial.rows()
  result = summarize_bound(nelbo, tokens, stderr)
  result["num_t_samples"] = int(num_t_samples)
  return result


def held_out_bounds(bound_fn: Callable, params, sets, *, seed: int, num_t_samples: int, mesh: Mesh,
                    partial_for: Callable[[int, str, Any], PartialBound] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    stop: Callable[[int], bool] | None = None, more: Sequence[tuple[str, Any]] = ()) -> dict:
  """`held_out_bound` of one held-out set; for several [(name, weight, batches)] (data.mixture), each one's
  under `sources` and their weighted total (data/mixture.py). `more` [(name, batches)]: other held-out sets
  (eval.heldout_sets), scored after those, each one's result under `heldout_sets` and never in the total.
  `partial_for(i, name, batches)`: set i's PartialBound (`more`'s numbered after `sets`), every one discarded once
  all sets are done (a stop in the second set keeps the first's results); `stop` sees the batches of all sets
  numbered in one increasing sequence (the multi-process preemption sync point needs it)."""
  results, partials, offset = [], [], 0
  for i, (name, weight, batches) in enumerate(list(sets) + [(name, 1.0, batches) for name, batches in more]):
    partial = partial_for(i, name, batches) if partial_for else None
    partials.append(partial)
    set_stop = None if stop is None else (lambda b, first=offset: stop(first + b))
    results.append((name, weight, held_out_bound(bound_fn, params, batches, seed=seed, num_t_samples=num_t_samples,
                                                 mesh=mesh, partial=partial, progress=progress, stop=set_stop)))
    offset += len(batches)
  for partial in partials:
    if partial is not None:
      partial.discard()
  own = results[:len(sets)]
  total = own[0][2] if len(own) == 1 else mixture_bound(own)
  if more:
    total["heldout_sets"] = {name: result for name, _, result in results[len(sets):]}
  return total

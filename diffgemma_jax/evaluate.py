"""Held-out perplexity bounds (DESIGN section 4): PPL <= exp(sum_x NELBO(x) / sum_x L(x)).

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
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffgemma_jax.parallel.mesh import use_mesh
from diffgemma_jax.parallel.rules import batch_sharding, replicated

LN2 = math.log(2.0)


def make_bound_fn(graphdef, objective, *, num_t_samples: int, mesh: Mesh, param_shardings=None) -> Callable:
  """(params, batch, rng) -> (nelbo_B, stderr_B, num_tokens_B), jitted once for fixed-shape batches."""
  def bound(params, batch, rng):
    with use_mesh(mesh):
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
  from diffgemma_jax.data.mixture import mixture_bound
  results = [(name, weight, held_out_bound(bound_fn, params, batches, seed=seed, num_t_samples=num_t_samples,
                                           mesh=mesh)) for name, weight, batches in sets]
  return results[0][2] if len(results) == 1 else mixture_bound(results)


def evaluate(config, workdir: str | None = None, step: int | None = None, *,
             checkpoint: str | None = None) -> dict[str, Any]:
  """The held-out bound of a run's parameters, with keys step, num_tokens, num_examples, bits_per_token,
  stderr_bits_per_token, ppl_bound, num_t_samples, unigram_ppl, exact.

  The parameters: checkpoint `step` (default: the latest complete one) of `workdir/checkpoints`, or, given
  `checkpoint` (a workdir, its checkpoints/ folder or a step folder, as for init.checkpoint), that run's
  parameters under this config's model (LoRA adapters, absent there, start at zero: the base model). The second
  form evaluates a pretrained model on a fine-tuning config's held-out set.
  """
  from diffgemma_jax.errors import ConfigError
  from diffgemma_jax.model.config import ModelConfig
  from diffgemma_jax.objectives import make_objective
  from diffgemma_jax.parallel.mesh import mesh_from_config
  from diffgemma_jax.train.checkpoint import (
    Checkpointer,
    adopt_saved_lora,
    check_init_checkpoint,
    check_workdir,
    load_init_params,
  )
  from diffgemma_jax.train.dataset import eval_sets, pin_tokenizer, prepare_dataset, unigram_baseline
  from diffgemma_jax.train.optimizer import make_optimizer
  from diffgemma_jax.train.state import abstract_train_state, init_params

  if not (workdir or checkpoint):
    raise ConfigError("evaluate: give a workdir (its checkpoints) or a checkpoint")
  if workdir and not checkpoint:
    check_workdir(workdir, reading=True)
    config = adopt_saved_lora(config, os.path.join(workdir, "checkpoints"))
  model_cfg = ModelConfig.from_config_dict(config.model)
  mesh = mesh_from_config(config, training=False)
  tx, _ = make_optimizer(config.train)
  graphdef, abstract, shardings = abstract_train_state(model_cfg, tx, mesh)
  if checkpoint:
    config = config.copy_and_resolve_references()  # the caller's config keeps its init.* keys
    with config.unlocked():
      config.init.checkpoint, config.init.step = checkpoint, -1 if step is None else int(step)
    step_dir, step, run_dir = check_init_checkpoint(config, abstract.params)
    directory, tokenizer = prepare_dataset(config)
    pin_tokenizer(directory, run_dir, write=False)
    fresh = init_params(model_cfg, shardings.params, int(config.train.seed))  # LoRA adapters keep these
    params = load_init_params(step_dir, fresh, shardings.params)
  else:
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config, create=False)
    step = ckpt.readable_step(step, workdir)
    directory, tokenizer = prepare_dataset(config, workdir)
    pin_tokenizer(directory, workdir, write=False)
    params = ckpt.restore_params(step, abstract.params, shardings.params)
    ckpt.close()
  objective = make_objective(config.objective, mask_id=tokenizer.mask_id)
  num_t = int(config.eval.num_t_samples)
  bound_fn = make_bound_fn(graphdef, objective, num_t_samples=num_t, mesh=mesh, param_shardings=shardings.params)
  result = held_out_bounds(bound_fn, params, eval_sets(config, directory), seed=int(config.eval.seed),
                          num_t_samples=num_t, mesh=mesh)
  result.update(step=int(step), unigram_ppl=unigram_baseline(config, directory), exact=objective.capabilities.exact)
  return result

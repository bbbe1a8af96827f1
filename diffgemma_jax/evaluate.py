"""`evaluate`: the held-out perplexity bound of a run's parameters (the estimator: `train/bound.py`)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.objectives import make_objective
from diffgemma_jax.parallel.mesh import batch_slice, mesh_from_config
from diffgemma_jax.parallel.placement import placement_for
from diffgemma_jax.parallel.rules import shardings_for
from diffgemma_jax.train.bound import held_out_bounds, make_bound_fn, summarize_bound
from diffgemma_jax.train.bound_partial import PartialBound
from diffgemma_jax.train.dataset import (eval_batches, eval_sets, heldout_set, heldout_set_batches, pin_tokenizer,
                                         prepare_dataset, run_tokenizer, unigram_baseline, unigram_on)
from diffgemma_jax.train.reading import INIT, open_run, read_run, run_steps
from diffgemma_jax.train.preemption import StopRequest
from diffgemma_jax.train.state import evaluation_model, init_params

__all__ = ["evaluate", "held_out_bounds", "make_bound_fn", "summarize_bound"]


def evaluate(config, workdir: str | None = None, step: int | None = None, *, checkpoint: str | None = None,
             partial_dir: str | None = None, log: Callable[[str], None] | None = None,
             heldout: str | None = None, heldout_dir: str | None = None,
             heldout_text_field: str | None = None) -> dict[str, Any]:
  """The held-out bound of one checkpoint step (None: the latest complete one); see `evaluate_steps`."""
  return evaluate_steps(config, workdir, [step], checkpoint=checkpoint, partial_dir=partial_dir, log=log,
                        heldout=heldout, heldout_dir=heldout_dir, heldout_text_field=heldout_text_field)[0]


def evaluate_steps(config, workdir: str | None = None, steps: Sequence[int | None] | str = (None,), *,
                   checkpoint: str | None = None, partial_dir: str | None = None,
                   log: Callable[[str], None] | None = None, heldout: str | None = None,
                   heldout_dir: str | None = None, heldout_text_field: str | None = None) -> list[dict[str, Any]]:
  """The held-out bound of a run's parameters at each of `steps` (None: the latest complete one), in that order,
  each with keys step, weights ("params", or "ema": the trainable parameters' moving average,
  `checkpoint.weights`), num_tokens, num_examples, bits_per_token, stderr_bits_per_token, ppl_bound,
  num_t_samples, unigram_ppl, exact. `steps="all"`: every complete step, ascending.

  The parameters: those checkpoints of `workdir/checkpoints`, or, given `checkpoint` (a workdir, its checkpoints/
  folder or a step folder, as for init.checkpoint), that run's parameters under this config's model (LoRA
  adapters, absent there, start at zero: the base model). The second form evaluates a pretrained model on a
  fine-tuning config's held-out set. Every step is opened (a missing or damaged one refused) before the first is
  evaluated, and all of them run through one compiled program.

  `partial_dir` (a folder, local or a bucket URL) keeps the partial results of each held-out set there while the
  evaluation runs (train/bound_partial.py), so the same call after a stop (SIGTERM: EvaluationStopped, or a
  kill) continues from the last batches saved; `log` receives progress lines (about every 30 s) and notes.

  `heldout` (text_files' source forms: files, folders, globs, bucket URLs) evaluates those documents instead of
  the config's held-out split: an evaluation set built with the run's tokenizer (`train/dataset.heldout_set`, in
  `heldout_dir` or the eval-set cache; a record's text in `heldout_text_field`, default data.text_field), each
  result then naming it (`heldout`, `dataset`); its `unigram_ppl` is the training split's unigram model on it
  where the config's dataset is at hand, else None. Without it, the sets of eval.heldout_sets are scored too, as
  the trainer scores them, each result holding theirs under `heldout_sets` (every row of each with
  eval.max_sequences=0).
  """
  if not (workdir or checkpoint):
    raise ConfigError("evaluate: give a workdir (its checkpoints) or a checkpoint")
  log = log or (lambda message: None)
  if steps == "all":
    steps = run_steps(checkpoint, INIT) if checkpoint else run_steps(workdir)
  if not steps:
    raise ConfigError("evaluate: no checkpoint step given")
  runs = []
  for step in steps:
    if checkpoint:
      runs.append(open_run(checkpoint, step, key=INIT, weights=str(config.init.weights)))
    else:
      read_config, run = read_run(config, workdir, step)
      runs.append(run)
  if not checkpoint:
    config = read_config  # with the run's LoRA settings adopted (the same for every step)
  model_cfg = ModelConfig.from_config_dict(config.model)
  mesh = mesh_from_config(config, training=False)
  graphdef, abstract = evaluation_model(model_cfg, placement_for(mesh, config))
  param_shardings = shardings_for(abstract, mesh)
  if checkpoint:
    for run in runs:
      run.check_fits(abstract)
  if heldout:
    directory, tokenizer = heldout_set(config, run_tokenizer(config, runs[0].run_dir, "--heldout"), heldout,
                                       heldout_dir, heldout_text_field)
    log(f"--heldout {heldout}: the evaluation set in {directory}")
  else:
    directory, tokenizer = prepare_dataset(config, runs[0].run_dir)  # an SFT dataset: read with the run's tokenizer
  pin_tokenizer(directory, runs[0].run_dir, write=False)
  fresh = init_params(model_cfg, param_shardings, int(config.train.seed)) if checkpoint else None  # LoRA adapters
  objective = make_objective(config.objective, mask_id=tokenizer.mask_id)
  num_t = int(config.eval.num_t_samples)
  bound_fn = make_bound_fn(graphdef, objective, num_t_samples=num_t, mesh=mesh, param_shardings=param_shardings)
  # Each process loads its slice of every global batch (a mesh spanning processes: its own rows; one process: all)
  data_slice, num_slices = batch_slice(mesh)
  more = []  # eval.heldout_sets: [(name, batches, unigram_ppl)]
  if heldout:
    sets = [(heldout, 1.0, eval_batches(config, directory, process_index=data_slice, process_count=num_slices))]
    unigram = unigram_on(config, directory)
  else:
    sets = eval_sets(config, directory, process_index=data_slice, process_count=num_slices)
    unigram = unigram_baseline(config, directory)
    more = heldout_set_batches(config, directory, process_index=data_slice, process_count=num_slices)
  results = []
  for run in runs:
    params = run.restore_params(abstract, param_shardings, fresh=fresh)
    with StopRequest() as stop:
      result = held_out_bounds(bound_fn, params, sets, seed=int(config.eval.seed), num_t_samples=num_t, mesh=mesh,
                               partial_for=_partials(config, run, partial_dir, num_t, log),
                               progress=ProgressLog(log), stop=stop.reached, more=[(n, b) for n, b, _ in more])
    for name, _, set_unigram in more:
      result["heldout_sets"][name]["unigram_ppl"] = set_unigram
    result.update(step=int(run.step), weights=run.weights, unigram_ppl=unigram, exact=objective.capabilities.exact,
                  **({"heldout": heldout, "dataset": directory} if heldout else {}))
    results.append(result)
  return results


def _partials(config, run, partial_dir: str | None, num_t: int,
              log) -> Callable[[int, str, Any], PartialBound] | None:
  """The partial-results file of each held-out set (its number, name and batches) of `run`'s step in
  `partial_dir` (None: none kept)."""
  if not partial_dir:
    return None
  key = dict(checkpoint=run.step_dir, step=int(run.step), weights=run.weights, seed=int(config.eval.seed),
             num_t_samples=num_t, batch_size=int(config.eval.batch_size), seq_len=int(config.train.seq_len),
             template=str(config.data.chat_template), objective=config.objective.to_dict())

  def partial_for(index: int, name: str, batches) -> PartialBound:
    manifest = storage.file_sha256(os.path.join(batches.data_dir, "manifest.json"))
    return PartialBound(storage.join(partial_dir, f"heldout-step{run.step}-set{index}.npz"),
                        dict(key, set=name, manifest=manifest, rows=batches.num_rows), log=log)
  return partial_for


class ProgressLog:
  """`progress(done, total)` for held_out_bound: about every `every_s` seconds a line with the batches done, their
  rate and the time left (none for an evaluation shorter than that)."""

  def __init__(self, log: Callable[[str], None], every_s: float = 30.0):
    self.log, self.every_s = log, every_s
    self.start = self.last = time.monotonic()
    self.first: int | None = None

  def __call__(self, done: int, total: int) -> None:
    now = time.monotonic()
    if self.first is None:  # the first batch (or the first after a resume) includes compiling: time from its end
      self.first, self.start, self.last = done, now, now
      return
    if now - self.last < self.every_s:
      return
    rate = (done - self.first) / (now - self.start)
    self.log(f"held-out batch {done}/{total} ({100 * done / total:.0f}%), {rate:.2f} batches/s, "
             f"{(total - done) / rate / 60:.1f} min left")
    self.last = now

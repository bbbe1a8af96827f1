"""`train(config, workdir)`: the pretraining loop. Builds the data and the sharded state, resumes from the latest
complete checkpoint in `workdir/checkpoints`, and runs the jitted step, logging, checkpointing and evaluating.

Step n's metrics are fetched after step n+1 is dispatched, so the host never stalls the device, except at a
checkpoint: a save first waits for its own step's loss, so a checkpoint never holds the result of a non-finite
update.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from diffgemma_jax.errors import ConfigError, NonFiniteLossError
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.inspect import flops_per_token
from diffgemma_jax.objectives import make_objective
from diffgemma_jax.parallel.distributed import check_shared_folder
from diffgemma_jax.parallel.mesh import batch_slice, mesh_from_config
from diffgemma_jax.parallel.placement import placement_for
from diffgemma_jax.parallel.rules import batch_sharding
from diffgemma_jax.train.bound import EvaluationStopped, held_out_bounds, make_bound_fn
from diffgemma_jax.train.checkpoint import Checkpointer, config_to_dict
from diffgemma_jax.train.dataset import (check_heldout_sets, eval_sets, heldout_set_batches, pin_tokenizer,
                                         prepare_dataset, train_iterator, unigram_baseline)
from diffgemma_jax.train.ema import averaged_params
from diffgemma_jax.train.freeze import describe, trainable_filter
from diffgemma_jax.train.early_stop import EarlyStop, replay
from diffgemma_jax.train.history import append_run_history
from diffgemma_jax.train.logging import (
  MetricsLogger,
  eval_prefix,
  format_summary,
  peak_flops_per_device,
  step_scalars,
  wandb_settings,
)
from diffgemma_jax.train.optimizer import describe_schedule_change, make_optimizer
from diffgemma_jax.train.memory import describe_state, state_memory
from diffgemma_jax.train.preemption import StopRequest
from diffgemma_jax.train.time_decay import TimedDecay
from diffgemma_jax.train.profiling import StepProfiler
from diffgemma_jax.train.reading import check_workdir, inherit_context, open_init_checkpoint
from diffgemma_jax.train.rollback import ROLLBACK_FILE, pending_skip, skipped_state
from diffgemma_jax.train.state import abstract_train_state, evaluation_model, init_train_state, start_average
from diffgemma_jax.train.step import make_train_step

MODEL_INPUTS = ("tokens", "segment_ids", "positions", "loss_mask")


def _to_device(batch: dict[str, Any], sharding, expected_shape: tuple[int, int],
               global_shape: tuple[int, int]) -> dict[str, jax.Array]:
  out = {}
  for key in MODEL_INPUTS:
    if key not in batch:
      continue
    x = np.asarray(batch[key], np.int32)
    if x.shape != expected_shape:
      raise ValueError(f"data batch {key!r} has shape {x.shape}, expected {expected_shape} "
                       f"(train.batch_size per process, train.seq_len)")
    out[key] = jax.make_array_from_process_local_data(sharding, x, global_shape)
  return out


def _base_rng(config) -> jax.Array:
  # Distinct from the init stream (nnx.Rngs(params=seed)); per-step keys are fold_in(base, step).
  return jax.random.fold_in(jax.random.key(int(config.train.seed)), 1)


def train(config, workdir: str, *, show_progress: bool = True, overrides: dict[str, str] | None = None,
          command: list[str] | None = None) -> dict[str, Any]:
  """Trains to `train.num_steps`, resuming from `workdir` if it holds checkpoints; returns a summary dict.

  Raises ConfigError (bad config or incompatible checkpoints, before anything is written), DataError, or
  NonFiniteLossError (after stopping; the last good checkpoint is kept).
  """
  t_start = time.perf_counter()
  model_cfg = ModelConfig.from_config_dict(config.model)
  tc = config.train
  max_runtime_s = float(tc.max_runtime_s)
  if not max_runtime_s >= 0:
    raise ConfigError(f"train.max_runtime_s={tc.max_runtime_s}: must be >= 0 seconds (0: no time budget)")
  check_workdir(workdir, reading=False)
  check_shared_folder(workdir, "--workdir")  # each host's own disk would split the run's files between them
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config)  # refuses an incompatible workdir first
  ckpt.check_resumable()
  mesh = mesh_from_config(config)
  tx, schedule = make_optimizer(tc)
  seed = int(tc.seed)
  trainable = trainable_filter(model_cfg, tuple(tc.freeze))
  frozen_dtype = str(tc.frozen_dtype)
  ema_decay = float(tc.ema_decay)
  if str(config.checkpoint.weights) == "ema" and not ema_decay:
    raise ConfigError("checkpoint.weights='ema' evaluates the parameters' moving average, but train.ema_decay=0 "
                      "keeps none: set train.ema_decay (MDLM uses 0.9999) or checkpoint.weights=auto")
  evaluate_average = ema_decay > 0 and str(config.checkpoint.weights) != "params"
  graphdef, abstract, shardings = abstract_train_state(model_cfg, tx, mesh, seed, trainable,
                                                       placement=placement_for(mesh, config), frozen_dtype=frozen_dtype,
                                                       ema=ema_decay > 0)
  start_step = ckpt.latest_step()
  init_from, inherited, started_average = None, None, None
  if start_step is None and config.init.checkpoint:  # checked before any data is built or step is run
    init_from = open_init_checkpoint(config)
    init_from.check_fits(abstract.params)
    config, inherited = inherit_context(config, init_from)
    ckpt.config = config  # its run_config.json records the context the initial weights serve
  check_heldout_sets(config)
  directory, tokenizer = prepare_dataset(config, workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  pin_tokenizer(directory, workdir, write=jax.process_index() == 0)
  objective = make_objective(config.objective, mask_id=tokenizer.mask_id)
  # Each process loads its slice of every global batch; processes holding the same rows (a tensor or context axis
  # across hosts) load the same slice (parallel/mesh.py, batch_slices).
  data_slice, num_slices = batch_slice(mesh)
  data = train_iterator(config, directory, process_index=data_slice, process_count=num_slices)
  skipped = 0
  if start_step is not None:  # the newest step that restores: a damaged one is skipped, saying so
    start_step, state, iterator_state = ckpt.restore_newest(abstract, shardings)
    skipped = pending_skip(workdir, start_step)  # diffgemma-rollback --skip_batches, for a start from this step
    data.set_state(skipped_state(iterator_state, skipped) if skipped else iterator_state)
    if ema_decay and state.ema is None:  # switched on by this resume
      state = state._replace(ema=start_average(state.params, trainable, shardings.ema))
      started_average = start_step
  else:
    start_step = 0
    state = init_train_state(model_cfg, tx, shardings, seed, trainable, frozen_dtype=frozen_dtype)
    if init_from is not None:
      params = init_from.restore_params(abstract.params, shardings.params, fresh=state.params)
      state = state._replace(params=params, ema=start_average(params, trainable, shardings.ema))

  decay = TimedDecay(tc, workdir, start_step=start_step, max_runtime_s=max_runtime_s)
  step_fn = make_train_step(graphdef=graphdef, objective=objective, tx=tx, schedule=schedule, mesh=mesh,
                            state_shardings=shardings, grad_accum_steps=int(tc.grad_accum_steps),
                            debug_nan_at_step=int(tc.debug_nan_at_step), trainable=trainable, ema_decay=ema_decay,
                            optimizer_for_decay=decay.optimizer)
  end_step = decay.end_step()
  num_t = int(config.eval.num_t_samples)
  eval_graphdef, _ = evaluation_model(model_cfg, placement_for(mesh, config))  # dropless: the bound on any mesh
  bound_fn = make_bound_fn(eval_graphdef, objective, num_t_samples=num_t, mesh=mesh,
                           param_shardings=shardings.params)
  held_out = eval_sets(config, directory, process_index=data_slice, process_count=num_slices)  # each its rows
  unigram = unigram_baseline(config, directory)
  more_sets = heldout_set_batches(config, directory, process_index=data_slice, process_count=num_slices)

  seq_len, batch_size = int(tc.seq_len), int(tc.batch_size)
  local_shape = (batch_size // num_slices, seq_len)
  sharding = batch_sharding(mesh)
  flops = flops_per_token(model_cfg, seq_len)["train_flops_per_token"] * objective.model_passes(seq_len, model_cfg)
  # the evaluations since the best so far, this run's earlier ones included (before the logger rewrites their file)
  rank_by = str(config.eval.rank_by)
  early = replay(EarlyStop(int(tc.early_stop_patience), float(tc.early_stop_min_delta), rank_by), workdir,
                 start_step)
  logger = MetricsLogger(workdir, total_steps=end_step, start_step=start_step, tokens_per_step=batch_size * seq_len,
                         train_flops_per_token=flops, peak_flops=peak_flops_per_device(float(tc.peak_flops_per_device)),
                         num_devices=mesh.devices.size, show_progress=show_progress, wandb=wandb_settings(config))
  if init_from is not None:
    logger.message(f"initialised from {init_from.step_dir}, {init_from.describe()}: parameters only, fresh optimizer"
                   + (f"; model.max_positions={inherited}, the context its weights serve" if inherited else ""))
  elif start_step is not None and config.init.checkpoint:
    logger.message(f"step {start_step}: resuming this workdir's own checkpoint; init.checkpoint "
                   f"({config.init.checkpoint}) initialises a run that has none, and is not read")
  previous = append_run_history(workdir, config_to_dict(config), start_step=start_step, overrides=overrides,
                                command=command)  # the run history; the record of the run resumed from
  if start_step and previous:
    jump = describe_schedule_change(ml_collections.ConfigDict(previous["config"]["train"]), tc, start_step)
    if jump:
      logger.message(jump)
  if skipped:
    logger.message(f"step {start_step}: the data stream skips {skipped} batches after this checkpoint's position "
                   f"(diffgemma-rollback, {ROLLBACK_FILE})")
  if started_average is not None:
    logger.message(f"train.ema_decay={ema_decay:g}: checkpoint {started_average} holds no moving average of the "
                   f"parameters; it starts from them at step {started_average}")
  logger.message(describe_state(state_memory(abstract, shardings, trainable), str(tc.optimizer), mesh.devices.size))
  counts = describe(state.params, trainable)
  if counts["frozen_params"]:
    logger.message(f"training {counts['trainable_params']:,} parameters; {counts['frozen_params']:,} frozen "
                   f"({'LoRA adapters only' if model_cfg.lora_rank else 'train.freeze=' + repr(tuple(tc.freeze))})")
  base_rng = _base_rng(config)
  profiler = StepProfiler(os.path.join(workdir, "tb"), tc.profile_steps)
  log_every = max(int(tc.log_every_steps), 1)
  save_every = max(int(config.checkpoint.every_steps), 1)
  eval_every = int(config.eval.every_steps)
  keep_best = int(config.checkpoint.keep_best)
  one_process = jax.process_count() == 1
  evaluate_first = one_process or keep_best > 0  # a save step's evaluation before its save, recording its bound
  summary: dict[str, Any] = {"workdir": workdir, "start_step": start_step, "final_step": start_step,
                             "final_loss": None, "eval": None, "checkpoint_dir": ckpt.directory,
                             "checkpoint_step": start_step or None}
  timing = {"train_time": 0.0, "tokens": 0, "steps": 0, "clock": None, "first_step_s": None}

  def ranked(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The bound steps rank by (eval.rank_by: the run's own, or one eval.heldout_sets set's), with its set's name:
    what early stopping observes and the step's checkpoint records."""
    if result is None:
      return None
    chosen = result["heldout_sets"][rank_by] if rank_by else result
    return {**chosen, "weights": result["weights"], "set": rank_by}

  def run_eval(step: int, stop=None) -> dict[str, Any]:
    """The held-out bound of the state at `step`, logged; `stop(batch)` True ends it early (EvaluationStopped)."""
    # checkpoint.weights: what a reader of this step's checkpoint evaluates (train/reading.py)
    params = averaged_params(state.params, state.ema, trainable) if evaluate_average else state.params
    result = held_out_bounds(bound_fn, params, held_out, seed=int(config.eval.seed), num_t_samples=num_t, mesh=mesh,
                             stop=stop, more=[(name, batches) for name, batches, _ in more_sets])
    result.update(step=step, weights="ema" if evaluate_average else "params", unigram_ppl=unigram,
                  exact=objective.capabilities.exact)
    logger.write(step, {**{k: float(v) for k, v in result.items() if isinstance(v, (int, float))},
                        "weights": result["weights"]}, prefix=eval_prefix())  # metrics.jsonl says which weights
    logger.message(f"step {step}: held-out{' (moving average)' if evaluate_average else ''} "
                   f"{result['bits_per_token']:.4f} +- {result['stderr_bits_per_token']:.4f} "
                   f"bits/token, ppl <= {result['ppl_bound']:.2f} (unigram {unigram:.2f})")
    summary["eval"] = result
    early.observe(step, float(ranked(result)["bits_per_token"]))
    for name, _, set_unigram in more_sets:  # eval.heldout_sets: logged; ranked only as eval.rank_by
      other = result["heldout_sets"][name]
      other["unigram_ppl"] = set_unigram
      logger.write(step, {k: float(v) for k, v in other.items() if isinstance(v, (int, float))},
                   prefix=eval_prefix(name))
      logger.message(f"step {step}: held-out set {name}: {other['bits_per_token']:.4f} +- "
                     f"{other['stderr_bits_per_token']:.4f} bits/token, ppl <= {other['ppl_bound']:.2f}"
                     + (f" (unigram {other['unigram_ppl']:.2f})" if other["unigram_ppl"] else ""))
    return result

  def finish(step: int, metrics) -> None:
    """Fetches a dispatched step's metrics, stops on a non-finite update, and logs."""
    scalars = step_scalars(jax.device_get(metrics))
    for key in ("loss", "grad_norm", "param_norm"):  # param_norm: the update itself may be what went wrong
      if not math.isfinite(scalars[key]):
        last = ckpt.latest_step()
        kept = f"last good checkpoint: step {last} in {ckpt.directory}" if last is not None else "no checkpoint yet"
        raise NonFiniteLossError(
            f"step {step}: {key} is {scalars[key]}; stopped without saving this or any later step ({kept})")
    now = time.perf_counter()
    if timing["clock"] is None:  # the first step includes compilation: start the clock after it
      logger.throughput(step)
      timing["first_step_s"] = now - t_start
    else:
      timing["train_time"] += now - timing["clock"]
      timing["tokens"] += batch_size * seq_len
      timing["steps"] += 1
    timing["clock"] = now
    summary["final_loss"] = scalars["loss"]
    if step % log_every == 0 or step == end_step:
      scalars.update(logger.throughput(step))
      logger.write(step, scalars)
    logger.progress(step, scalars)

  def out_of_time(step: int) -> bool:
    """Whether train.max_runtime_s is spent after `step`. Several processes act on process 0's clock, read every
    log_every steps (a host sync), so all of them stop at the same step."""
    if not max_runtime_s or step >= end_step:
      return False
    if jax.process_count() == 1:
      return time.perf_counter() - t_start >= max_runtime_s
    if step % log_every:
      return False
    from jax.experimental import multihost_utils
    spent = np.asarray(time.perf_counter() - t_start >= max_runtime_s)
    return bool(multihost_utils.broadcast_one_to_all(spent))

  def place_decay(step: int) -> None:
    """wsd_time: fixes the decay once its time has come (train/time_decay.py); the run then ends at its horizon."""
    nonlocal end_step
    sync = jax.process_count() > 1
    if sync and step % log_every:
      return
    step_time = timing["train_time"] / timing["steps"] if timing["steps"] else None
    if decay.place(step, elapsed_s=time.perf_counter() - t_start, first_step_s=timing["first_step_s"],
                   step_time_s=step_time, sync=sync) is not None:
      end_step = decay.end_step()
      logger.set_total_steps(end_step)
      summary["lr_decay"] = dict(decay.record)
      logger.message(decay.describe())

  def _pause_clock(step: int) -> None:
    logger.reset_clock(step)
    if timing["clock"] is not None:
      timing["clock"] = time.perf_counter()

  try:
    pending = None
    iterator_state = None
    if early.exhausted and start_step < end_step:  # the same command after an early stop trains no further
      summary["stopped_early"] = early.record()
      logger.message(f"step {start_step} of {end_step}: not training: {early.describe()} (an early stop); raise "
                     f"train.early_stop_patience, or set it to 0, to train on")
      end_step = start_step
    with StopRequest() as stop:  # SIGTERM: save the step in flight and stop
      step = start_step
      while step < end_step:
        step += 1
        batch = _to_device(next(data), sharding, local_shape, (batch_size, seq_len))
        profiler.before(step)
        state, metrics = step_fn(state, batch, base_rng, *decay.args())
        if profiler.after(step, metrics):
          logger.message(f"step {step}: profile of steps {tuple(tc.profile_steps)} in {profiler.trace_dir}")
        if pending is not None:
          finish(*pending)
        pending = (step, metrics)
        place_decay(step)
        stopping = stop.reached(step) and step < end_step  # at the last step the run ends anyway
        timed_out = not stopping and out_of_time(step)
        saving = step % save_every == 0 or step == end_step or stopping or timed_out
        # A step both saved and evaluated is evaluated first (evaluate_first): its checkpoint records the bound
        # (checkpoint.keep_best and readers' --step best rank steps by it). checkpoint.keep_best evaluates every
        # save but a SIGTERM's.
        evaluating = not stopping and ((eval_every > 0 and step % eval_every == 0) or step == end_step or timed_out
                                       or (keep_best > 0 and saving))
        if saving or evaluating:
          finish(*pending)
          pending = None
        # A preemption notice must not wait for an evaluation before a save. One process: the evaluation watches
        # the signal and ends after the batch in flight; the step is then saved at once, without a bound. Several
        # processes stop together only at a training step (StopRequest), so they save first and evaluate after
        # (no bound recorded) unless checkpoint.keep_best asks for the bounds (docs/checkpoints.md).
        evaluation = None
        evaluate_now = evaluating and (not saving or evaluate_first)
        if evaluate_now:
          try:
            evaluation = run_eval(step, stop=(lambda _: stop.signal is not None) if one_process else None)
          except EvaluationStopped:
            stopping = saving = True
        stopped_early = evaluation is not None and early.exhausted and step < end_step
        if saving or stopped_early:
          ckpt.save(state, data.get_state(), ranked(evaluation))
          summary["checkpoint_step"] = step
        if evaluating and not evaluate_now:  # several processes, a save step: evaluated after the save
          run_eval(step)
          stopped_early = early.exhausted and step < end_step
        if saving:
          logger.sync()  # a bucket workdir's metrics.jsonl and events through the saved step, uploaded with it
        if saving or evaluating:
          _pause_clock(step)
        if stopping:
          summary.update(final_step=step, stopped_by_signal=True)
          logger.message(f"step {step}: stop requested (SIGTERM): saved checkpoint {step} in {ckpt.directory}; run "
                         f"the same command to resume")
          break
        summary["final_step"] = step
        if stopped_early:
          summary["stopped_early"] = early.record()
          logger.message(f"step {step} of {end_step}: stopped early: {early.describe()}; saved checkpoint {step} in "
                         f"{ckpt.directory}")
          break
        if timed_out:
          summary["stopped_by_time"] = True
          logger.message(f"step {step} of {end_step}: train.max_runtime_s={max_runtime_s:g} spent "
                         f"({time.perf_counter() - t_start:.1f}s since start): saved checkpoint {step} in "
                         f"{ckpt.directory} and evaluated it; run the same command to continue")
          break
    if pending is not None:
      finish(*pending)
    if summary["eval"] is None and not summary.get("stopped_by_signal"):  # resumed a finished run: its bound
      run_eval(int(jax.device_get(state.step)))
    if keep_best:
      ckpt.wait()  # the last save's bound is on disk
      best = ckpt.best()
      if best is not None:
        summary["best_checkpoint"] = {"step": best[0], **best[1]}
  finally:
    profiler.stop()
    ckpt.close()
    logger.close()
  summary["wall_time_s"] = time.perf_counter() - t_start
  if timing["train_time"] > 0:
    summary["tokens_per_sec"] = timing["tokens"] / timing["train_time"]
    summary["mfu"] = summary["tokens_per_sec"] * flops / (logger.peak_flops)
  logger.message(format_summary(summary))
  return summary

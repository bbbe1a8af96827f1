"""Text in, text out: a restored model, the run's tokenizer, and per-request speed numbers.

This is the library behind `diffgemma-generate` (the entry point only parses flags). Which samplers exist, what
they are made of and which options they read is `samplers.py` (`SAMPLERS`, `OPTIONS`); the options of a request
are checked there once (`validate_options`) and turned into the runner's config (`sampler_config`). Canvas
samplers decode in canvases of the training block size (objective.block_size), pad after EOS and report the
denoising steps of every canvas; the entropy-bound defaults are the released model's (`canvas.RELEASED_SAMPLER`).
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffgemma_jax.errors import GenerationError
from diffgemma_jax.parallel.rules import BATCH_AXES
from diffgemma_jax.sampling import (autoregressive, batching, canvas, masked, serving, serving_ar, serving_canvas,
                                    serving_masked, spool)
from diffgemma_jax.sampling.parts import truncate_at_eos
from diffgemma_jax.sampling.samplers import SAMPLERS, GenerationOptions, sampler_config, validate_options
from diffgemma_jax.train.dataset import load_tokenizer
from diffgemma_jax.train.reading import check_workdir, restore_model_run

# With a caller that keeps results as they come (`run_requests`' on_results), the serving engine runs this many
# times its slots of requests at a time: a chunk's results are kept when it ends, at the cost of slots idling as the
# chunk drains.
SERVE_CHUNK_SLOTS = 16


def validate_prompt(text: str, prompt_ids: list[int], context_length: int) -> None:
  """The prompt must hold text and fit the context the model was trained on (bos included)."""
  if not text.strip():
    raise GenerationError("the prompt is empty; pass some text with --prompt or one prompt per line in --prompts")
  if len(prompt_ids) > context_length:
    raise GenerationError(f"the prompt is {len(prompt_ids)} tokens (bos included), longer than the model's context "
                          f"of {context_length} tokens (train.seq_len); shorten it")


class Generator:
  """A model plus the special ids; compiles one sampler per (batch shape, sampler settings) and times runs."""

  def __init__(self, model, *, mask_id: int, eos_id: int, pad_id: int = 0):
    self.graphdef, self.state = nnx.split(model)
    self.mask_id, self.eos_id, self.pad_id = mask_id, eos_id, pad_id
    self._compiled: dict[Any, Any] = {}
    self._engines: dict[Any, serving.Engine] = {}

  def _sample_fn(self, cfg):
    """(state, prompt [B, P], rng, starts [B] or None) -> (tokens [B, P + G], model calls [B], steps per canvas
    [B, C] or None); `starts`: each row's first prompt slot of a left-padded batch."""
    graphdef, mask_id, eos_id, pad_id = self.graphdef, self.mask_id, self.eos_id, self.pad_id
    if isinstance(cfg, autoregressive.ARConfig):
      def sample(state, prompt, rng, starts=None):
        return autoregressive.generate(nnx.merge(graphdef, state), prompt, rng, cfg, eos_id=eos_id,
                                       prompt_starts_B=starts) + (None,)
    elif isinstance(cfg, canvas.CanvasConfig):
      def sample(state, prompt, rng, starts=None):
        out = canvas.generate(nnx.merge(graphdef, state), prompt, rng, cfg, mask_id=mask_id, eos_id=eos_id,
                              pad_id=pad_id, prompt_starts_B=starts)
        return out.tokens, canvas_model_calls(out.steps), out.steps
    else:
      def sample(state, prompt, rng, starts=None):
        denoiser = masked.make_denoiser(nnx.merge(graphdef, state), cfg, prompt.shape[1], starts)
        return masked.generate(denoiser, prompt, rng, cfg, mask_id=mask_id, eos_id=eos_id) + (None,)
    return sample

  def rows_sharding(self, batch_size: int) -> NamedSharding | None:
    """Where a batch's rows go: split over the data axes (data, fsdp, expert) of the mesh the model's parameters
    are placed on, when that mesh has several devices there and they divide `batch_size`; else None (one device,
    or a batch they do not divide: every device then runs every row). Each device then samples only its rows,
    as in training, instead of all of them: an 8-GPU host generates a batch of 32 four rows per GPU."""
    mesh = serving.placed_mesh(self.state)
    if mesh is None:
      return None
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if size <= 1 or batch_size % size:
      return None
    return NamedSharding(mesh, PartitionSpec(axes))

  def _row_inputs(self, batch_size: int, arrays):
    """`arrays` (each [batch_size, ...]) placed by `rows_sharding`, or as they are."""
    rows = self.rows_sharding(batch_size)
    if rows is None:
      return tuple(arrays)
    return tuple(jax.device_put(x, rows) for x in arrays)

  def compiled(self, cfg, batch_size: int, prompt_length: int, *, row_keys: bool = False, padded: bool = False):
    """The compiled sampler of `cfg` for [batch_size, prompt_length] prompts: fn(state, prompt, rng) with one key,
    or with `row_keys` one key per row; `padded` adds a last argument, each row's first prompt slot. Row inputs
    are split over the mesh's data axes where `rows_sharding` says so (`run` places them so)."""
    key = (cfg, batch_size, prompt_length, row_keys, padded)
    if key not in self._compiled:
      rows = self.rows_sharding(batch_size)
      prompt = jax.ShapeDtypeStruct((batch_size, prompt_length), jnp.int32, sharding=rows)
      rng = jax.eval_shape(lambda: batching.row_keys([0] * batch_size) if row_keys else jax.random.key(0))
      if row_keys:
        rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rows)
      extra = (jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows),) if padded else ()
      self._compiled[key] = jax.jit(self._sample_fn(cfg)).lower(self.state, prompt, rng, *extra).compile()
    return self._compiled[key]

  def run(self, prompts, options: GenerationOptions, seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Samples after each prompt (a [B, P] array, or B lists of ids of any lengths: one left-padded batch); per
    row: ids up to EOS, model calls, new tokens, timings, and for canvas samplers the denoising steps of every
    canvas the row ran. Row r draws from `jax.random.key(seeds[r])` alone (default: every row `options.seed`), so
    a request's result does not depend on the batch it ran in."""
    prompt, starts = batching.left_pad([list(map(int, p)) for p in prompts], self.pad_id)
    B, P = prompt.shape
    padded = bool(np.any(starts))
    cfg = sampler_config(options)
    start = time.perf_counter()
    fn = self.compiled(cfg, B, P, row_keys=True, padded=padded)
    compile_seconds = time.perf_counter() - start
    seeds = [options.seed] * B if seeds is None else list(seeds)
    inputs = (jnp.asarray(prompt), batching.row_keys(seeds)) + ((jnp.asarray(starts),) if padded else ())
    inputs = jax.block_until_ready(self._row_inputs(B, inputs))  # not part of the timing
    start = time.perf_counter()
    tokens, calls, steps = jax.block_until_ready(fn(self.state, *inputs))
    seconds = time.perf_counter() - start
    tokens, calls = np.asarray(tokens), np.asarray(calls)
    results = []
    for row in range(B):
      ids = truncate_at_eos(tokens[row, P:], self.eos_id)
      results.append({"sampler": options.sampler, "ids": ids, "sequence": tokens[row, starts[row]:].tolist(),
                      "model_calls": int(calls[row]), "new_tokens": len(ids), "seconds": seconds,
                      "tokens_per_s": len(ids) / seconds if seconds > 0 else float("inf"),
                      "compile_seconds": compile_seconds, "batch_size": B,
                      "steps_per_canvas": None if steps is None else canvas_steps(np.asarray(steps)[row])})
    batch_tokens = sum(r["new_tokens"] for r in results)
    for r in results:
      r["batch_tokens_per_s"] = batch_tokens / seconds if seconds > 0 else float("inf")
    return results

  def run_batches(self, prompts: Sequence[Sequence[int]], options: GenerationOptions, batch_size: int,
                  seeds: Sequence[int] | None = None, on_batch=None) -> list[dict[str, Any]]:
    """`run` over batches of at most `batch_size` prompts, in the given order's results. Prompts of similar
    lengths share a batch (sorted by length), so little padding is run; the results are what one request at a
    time gives (`run`). `on_batch(indices, results)` is called after each batch with its prompts' positions, and the
    results are then not kept here (returned empty: a job of a million requests held every one's ids). `prompts`
    may be read lazily (a `spool.TokenRows` view: its lengths come from `lengths()`, a batch's prompts are read as
    it runs)."""
    if batch_size < 1:
      raise GenerationError(f"--batch_size must be >= 1, got {batch_size}")
    order = np.argsort(spool.lengths(prompts), kind="stable")  # what sorted(..., key=len) gives
    results: list[dict[str, Any]] = [{} for _ in range(len(prompts))] if on_batch is None else []
    for first in range(0, len(order), batch_size):
      chunk = order[first:first + batch_size].tolist()
      done = self.run([prompts[i] for i in chunk], options,
                      [options.seed if seeds is None else seeds[i] for i in chunk])
      if on_batch is not None:
        on_batch(chunk, done)
        continue
      for index, result in zip(chunk, done):
        results[index] = result
    return results

  def engine(self, cfg, num_slots: int, max_prompt_length: int, num_widths: int | None = None) -> serving.Engine:
    """The continuous-batching engine of `cfg` (an ARConfig, a CanvasConfig or a SamplerConfig) with `num_slots`
    slots for prompts up to `max_prompt_length` tokens (rounded up to a prefill width); kept for later calls.
    `num_widths`: the masked engine's slot widths (`MaskedProgram`; None: `serving_masked.NUM_WIDTHS`). The
    slots' rows are split over the mesh's data axes where `rows_sharding` says so, as a static batch's are."""
    num_widths = serving_masked.NUM_WIDTHS if num_widths is None else num_widths
    key = (cfg, num_slots, serving.bucket_width(max_prompt_length), num_widths)
    if key not in self._engines:
      if isinstance(cfg, autoregressive.ARConfig):
        program = serving_ar.ARProgram(cfg, eos_id=self.eos_id)
      elif isinstance(cfg, canvas.CanvasConfig):
        program = serving_canvas.CanvasProgram(cfg, mask_id=self.mask_id, eos_id=self.eos_id, pad_id=self.pad_id)
      else:
        program = serving_masked.MaskedProgram(cfg, mask_id=self.mask_id, eos_id=self.eos_id, pad_id=self.pad_id,
                                               num_widths=num_widths)
      self._engines[key] = serving.Engine(nnx.merge(self.graphdef, self.state), program, num_slots, key[2],
                                          rows=self.rows_sharding(num_slots))
    return self._engines[key]

  def serve(self, prompts: Sequence[Sequence[int]], options: GenerationOptions, num_slots: int,
            seeds: Sequence[int] | None = None, budgets: Sequence[int] | None = None,
            num_widths: int | None = None) -> list[dict[str, Any]]:
    """The results of `run` (in the given order) from the continuous-batching engine (`serving.py`) with
    `num_slots` slots: a finished request's slot takes the next prompt at once. Each request's tokens are what it
    gives alone (with its own budget of new tokens, default every one `options.gen_length`, the most); "seconds"
    is its latency from the start of the run (queueing included), "batch_tokens_per_s" the whole run's new tokens
    per second. `num_widths`: the masked engine's slot widths (`engine`)."""
    check_serving(options.sampler, num_slots, num_widths=num_widths)
    cfg = sampler_config(options)
    prompts = [list(map(int, p)) for p in prompts]
    seeds = [options.seed] * len(prompts) if seeds is None else list(seeds)
    budgets = [options.gen_length] * len(prompts) if budgets is None else list(budgets)
    engine = self.engine(cfg, num_slots, max(map(len, prompts)), num_widths)
    outputs = engine.run([serving.Request(tuple(p), b, s) for p, b, s in zip(prompts, budgets, seeds)])
    seconds = max(out["seconds"] for out in outputs)
    results = []
    for prompt, out in zip(prompts, outputs):
      ids = truncate_at_eos(out["tokens"], self.eos_id)
      results.append({"sampler": options.sampler, "ids": ids, "sequence": prompt + out["tokens"].tolist(),
                      "model_calls": out["model_calls"], "new_tokens": len(ids), "seconds": out["seconds"],
                      "tokens_per_s": len(ids) / out["seconds"], "compile_seconds": engine.compile_seconds,
                      "batch_size": num_slots,
                      "steps_per_canvas": None if out["steps"] is None else canvas_steps(out["steps"])})
    batch_tokens = sum(r["new_tokens"] for r in results)
    for r in results:
      r["batch_tokens_per_s"] = batch_tokens / seconds
    return results

  def run_requests(self, prompts: Sequence[Sequence[int]], options: GenerationOptions, *, batch_size: int = 1,
                   serving_slots: int | None = None, serving_widths: int | None = None,
                   request_options: Sequence[GenerationOptions] | None = None,
                   on_results=None) -> list[dict[str, Any]]:
    """`serve` with `serving_slots` slots, else `run_batches` of `batch_size` prompts: the same results either
    way (the engine keeps requests in flight, static batches run whole). `request_options`: each request's own
    options (`options` but for their gen_length, `with_gen_length`); static batches never mix two, the engine
    serves them together with their own budgets (`serving_widths`: the masked engine's slot widths).

    `on_results(indices, results)`: called as results are ready (after each static batch; the engine then serves
    the requests SERVE_CHUNK_SLOTS x `serving_slots` at a time, its latencies counted from each chunk's start), so a
    caller can keep them before the last request ends; the results are then not kept here (returned empty).
    `prompts` and `request_options` are read a batch (or a chunk) at a time: they may be spooled (`spool.py`)."""
    count = len(prompts)
    own_options = (lambda i: options) if request_options is None else request_options.__getitem__  # noqa: E731
    if serving_slots is not None:
      distinct = {options} if request_options is None else set(request_options)
      largest = serving_options(list(distinct), serving_slots)
      chunk = count if on_results is None else SERVE_CHUNK_SLOTS * serving_slots
      results = []
      for first in range(0, count, chunk):
        indices = list(range(first, min(first + chunk, count)))
        done = self.serve([prompts[i] for i in indices], largest, serving_slots,
                          budgets=[own_options(i).gen_length for i in indices], num_widths=serving_widths)
        if on_results is not None:
          on_results(indices, done)
        else:
          results += done
      return results
    groups: dict[GenerationOptions, array.array] = {}  # 8 bytes a request (a list of ints: 36)
    for index in range(count):
      groups.setdefault(own_options(index), array.array("q")).append(index)
    results: list[dict[str, Any]] = [{} for _ in range(count)] if on_results is None else []
    for own, indices in groups.items():
      report = None if on_results is None else (
          lambda chunk, done, indices=indices: on_results([indices[i] for i in chunk], done))
      for index, result in zip(indices, self.run_batches(spool.Take(prompts, indices), own, batch_size,
                                                         on_batch=report)):
        results[index] = result
    return results


def serving_options(request_options: Sequence[GenerationOptions], num_slots: int) -> GenerationOptions:
  """The options the engine serves `request_options` with: the largest gen_length's, whose sampler config every
  request's own must equal but for its length (each request then gets its own budget)."""
  largest = max(request_options, key=lambda o: o.gen_length)
  check_serving(largest.sampler, num_slots)
  served = sampler_config(largest)
  for own in set(request_options):
    if with_budget_of(sampler_config(own), served) != served:
      raise GenerationError("--serving_slots serves every request with one sampler rule, but --steps spread over "
                            "requests of different gen_length gives them different steps per canvas; drop --steps "
                            "or --serving_slots")
  return largest


def with_budget_of(cfg, served):
  """`cfg` (a runner's config) with the token budget of `served` (one of the same kind): equal to `served` when the
  two differ only in how many new tokens they allow."""
  if isinstance(cfg, autoregressive.ARConfig):
    return dataclasses.replace(cfg, max_new_tokens=served.max_new_tokens)
  if isinstance(cfg, canvas.CanvasConfig):
    return dataclasses.replace(cfg, num_canvases=served.num_canvases)
  return dataclasses.replace(cfg, gen_length=served.gen_length)


def with_gen_length(options: GenerationOptions, gen_length: int, steps: int | None, objective_name: str,
                    block_size: int, context_length: int, where: str) -> GenerationOptions:
  """Validated `options` (already validated) for a request that asks for `gen_length` new tokens, as if run with
  --gen_length gen_length (and the user's --steps, `steps`); errors name the request (`where`)."""
  unit = SAMPLERS[options.sampler].length_unit(options)
  if gen_length < 1 or gen_length % unit:
    raise GenerationError(f"{where}: gen_length {gen_length} must be a positive multiple of {unit}"
                          + (f" (--sampler {options.sampler}'s block length)" if unit > 1 else ""))
  try:
    return validate_options(dataclasses.replace(options, gen_length=gen_length, steps=steps), objective_name,
                            block_size, context_length)
  except GenerationError as e:
    raise GenerationError(f"{where}: gen_length {gen_length}: {e}") from None


def check_serving(sampler: str, num_slots: int | None, batch_size: int = 1, *, flag: str = "--serving_slots",
                  num_widths: int | None = None, widths_flag: str = "--serving_widths") -> None:
  """`flag` (the number of slots; None: static batches, nothing to check unless `num_widths` is given without it)
  must be >= 1, the sampler one the engine runs (`Sampler.serves`), and it replaces --batch_size; `num_widths`
  (`widths_flag`), if given, >= 1 and for a masked sampler (the one engine with slot widths,
  `serving_masked.MaskedProgram`)."""
  if num_slots is None:
    if num_widths is not None:
      raise GenerationError(f"{widths_flag} sets the continuous-batching engine's slot widths; give {flag} too")
    return
  if num_slots < 1:
    raise GenerationError(f"{flag} must be >= 1, got {num_slots}")
  if not SAMPLERS[sampler].serves:
    names = ", ".join(name for name, s in SAMPLERS.items() if s.serves)
    raise GenerationError(f"{flag} runs the samplers {names}, not sampler {sampler}")
  if batch_size != 1:
    raise GenerationError(f"{flag} {num_slots} and --batch_size {batch_size} both set; the engine keeps "
                          f"{flag} requests in flight, drop --batch_size")
  if num_widths is not None:
    if num_widths < 1:
      raise GenerationError(f"{widths_flag} must be an integer >= 1 (the masked engine's slot widths), got "
                            f"{num_widths}")
    if SAMPLERS[sampler].cache not in serving_masked.SERVED_CACHES:
      names = ", ".join(name for name, s in SAMPLERS.items() if s.cache in serving_masked.SERVED_CACHES)
      raise GenerationError(f"{widths_flag} sets the slot widths of the samplers {names} on the engine, not "
                            f"of sampler {sampler}")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any of the `stop` strings."""
  cut = min((at for at in (text.find(s) for s in stop if s) if at >= 0), default=len(text))
  return text[:cut]


def canvas_steps(steps_C) -> list[int]:
  """The denoising steps of the canvases a row ran (every run canvas takes >= 1 step; later ones were skipped)."""
  return [int(s) for s in steps_C if s > 0]


def canvas_model_calls(steps_BC):
  """Model calls of each row of a canvas sampler: the prompt's encoder pass, every denoising step, and one encoder
  pass committing each canvas the row ran but its last."""
  ran_B = jnp.sum(steps_BC > 0, axis=-1)
  return 1 + jnp.sum(steps_BC, axis=-1) + jnp.maximum(ran_B - 1, 0)


def generate_completions(config, workdir: str, prompts: Sequence[str], options: GenerationOptions, *,
                         step: int | None = None, chat_template: str | None = None, batch_size: int = 1,
                         stop: Sequence[str] = (), serving_slots: int | None = None,
                         serving_widths: int | None = None,
                         gen_lengths: Sequence[int | None] | None = None,
                         sources: Sequence[str] | None = None, only: Sequence[int] | None = None,
                         on_result=None, spool_folder: str | None = None) -> list[dict[str, Any]]:
  """Completes each prompt (bos + text), `batch_size` requests at a time (`Generator.run_batches`: the same
  results as one at a time); every option and prompt is checked before the model is restored, so bad input fails
  fast. `options.gen_length=None`: as many new tokens as fit in the model's context after the longest prompt (at
  most GenerationOptions.gen_length, whole canvases or blocks). A completion ends before the first of the `stop`
  strings (the harness's `until`). `serving_slots`: run the continuous-batching engine with that many slots
  (`Generator.serve`: the same results too) instead of static batches, the masked samplers' calls at the narrowest
  of `serving_widths` slot widths (default `serving_masked.NUM_WIDTHS`). `gen_lengths`: a request's own gen_length
  (None: the run's), as if it ran alone with that --gen_length; `sources` name the requests in errors (default
  "request N").

  `only`: the positions of the prompts to run (the others are checked and encoded, and a fitted gen_length still
  fits the longest of all, so each result is what the whole run gives it: a share of a split run, or what a resumed
  one has left); the results are theirs, in that order. `on_result(position, result)` is called for each as soon
  as its batch (or serving chunk) ends, and the results are then not kept (returned empty: the caller keeps them,
  a large job's in a results file).

  The inputs may be spooled sequences (`spool.Texts`, launch/generate.py's): they are read in order, once to check
  and encode them, and then a batch at a time; the prompts' ids are spooled (`spool.TokenRows`, in `spool_folder`,
  default the temporary folder), so memory holds no prompt's text or ids beyond a batch's (a million prompts took
  12 GB)."""
  fill_context, given_steps = options.gen_length is None, options.steps
  objective, block_size, context_length = (str(config.objective.name), int(config.objective.block_size),
                                           int(config.train.seq_len))
  if fill_context:  # provisional, a multiple of every sampler's unit (the release's canvas is 256); fitted below
    options = dataclasses.replace(options, gen_length=math.lcm(GenerationOptions.gen_length,
                                                               max(options.block_length, 1), block_size))
  options = validate_options(options, objective, block_size, context_length)
  if not len(prompts):
    raise GenerationError("no prompts given; pass --prompt TEXT or --prompts FILE with one prompt per line")
  if batch_size < 1:
    raise GenerationError(f"--batch_size must be >= 1, got {batch_size}")
  check_serving(options.sampler, serving_slots, batch_size, num_widths=serving_widths)
  source = (lambda index: f"request {index}") if sources is None else sources.__getitem__  # noqa: E731
  own_lengths: dict[int, GenerationOptions] = {}  # each gen_length a request asks for, validated once
  for index, length in enumerate(gen_lengths if gen_lengths is not None else ()):
    if length is not None and length not in own_lengths:
      own_lengths[length] = with_gen_length(options, length, given_steps, objective, block_size, context_length,
                                            source(index))
  for text in prompts:
    validate_prompt(text, [], 1)
  check_workdir(workdir, reading=True)  # before its tokenizer is looked for there
  tokenizer = load_tokenizer(config, workdir)
  from diffgemma_jax.data.sft import encode_text, marker_ids
  markers = marker_ids(tokenizer, chat_template) if chat_template else None  # chat prompts: turn markers as ids
  encoded = spool.TokenRows(spool_folder, "prompt token spool")  # every prompt's ids, on disk while a share runs
  for text in prompts:
    ids = [tokenizer.bos_id] + list(encode_text(tokenizer, text, markers))
    validate_prompt(text, ids, context_length)
    encoded.append(ids)
  prompt_lengths = encoded.lengths()
  if fill_context:  # --gen_length not given: as much as fits after the longest prompt, at most the default
    room = context_length - int(prompt_lengths.max())
    unit = SAMPLERS[options.sampler].length_unit(options)
    fitted = max(min(GenerationOptions.gen_length, room) // unit, 1) * unit
    options = validate_options(dataclasses.replace(options, gen_length=fitted, steps=given_steps), objective,
                               block_size, context_length)
  request_options = _RequestOptions(options, own_lengths, gen_lengths, len(prompts))
  if serving_slots is not None:
    serving_options(list(set(request_options)), serving_slots)  # before the model is restored
  budgets = np.fromiter((own.gen_length for own in request_options), np.int64, len(prompts))
  longest = int((prompt_lengths + budgets).max())
  if longest > context_length:
    import sys
    print(f"warning: prompt + --gen_length reach {longest} positions, past the {context_length} the model was "
          f"trained on (train.seq_len); text beyond position {context_length} is off-distribution",
          file=sys.stderr)
  positions = range(len(prompts)) if only is None else only
  if not len(positions):
    return []
  model, run = restore_model_run(config, workdir, step)
  generator = Generator(model, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

  def finish(indices, done):
    for i, result in zip(indices, done):
      index = positions[i]
      ids, own = encoded[index], request_options[index]
      completion = cut_at_stop(tokenizer.decode_continuation(ids, result["ids"]), stop)
      result.update(prompt=prompts[index], completion=completion, prompt_tokens=len(ids), step=run.step,
                    weights=run.weights, gen_length=own.gen_length)
      if on_result is not None:
        on_result(index, result)

  results = generator.run_requests(spool.Take(encoded, positions), options, batch_size=batch_size,
                                   serving_slots=serving_slots, serving_widths=serving_widths,
                                   request_options=spool.Take(request_options, positions),
                                   on_results=None if on_result is None else finish)
  if on_result is None:
    finish(range(len(positions)), results)
  return results


class _RequestOptions(Sequence[GenerationOptions]):
  """Each request's options: the run's, or those of the gen_length it asks for (`by_length`, validated once per
  length), without a list of them (ten million requests)."""

  def __init__(self, options: GenerationOptions, by_length: dict[int, GenerationOptions],
               gen_lengths: Sequence[int | None] | None, count: int):
    self.options, self.by_length, self.gen_lengths, self.count = options, by_length, gen_lengths, count

  def _of(self, length: int | None) -> GenerationOptions:
    return self.options if length is None else self.by_length[length]

  def __getitem__(self, index) -> GenerationOptions:
    return self._of(None if self.gen_lengths is None else self.gen_lengths[index])

  def __len__(self) -> int:
    return self.count

  def __iter__(self):
    return map(self._of, itertools.repeat(None, self.count) if self.gen_lengths is None else self.gen_lengths)

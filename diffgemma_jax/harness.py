"""The lm-evaluation-harness model `diffgemma`: `lm_eval --model diffgemma --model_args config=FILE,workdir=DIR`.

Importing this module registers the model with the harness (the installed harness, 0.4.13, discovers no plugins by
entry point, so `diffgemma-lm-eval` imports it and then runs the harness's own CLI). Requests are answered by:
  loglikelihood          the scoring API (`scoring.Scorer`, the SFT evaluation's estimator): -bound in nats of the
                         continuation given the context; `is_greedy` exact for AR models, False for diffusion
                         models (no single argmax pass says what their samplers would write)
  loglikelihood_rolling  the held-out bound of the whole text: the harness's own disjoint rolling windows of the
                         model's context (train.seq_len), each window's new tokens scored given the tokens before
                         it, summed
  generate_until         batched generation (`Generator.run_batches`, or with serving_slots the continuous-batching
                         engine, `Generator.serve`) with the model's sampler, cut at the first
                         of the request's `until` strings; `max_gen_toks` new tokens at most (rounded up to whole
                         canvases or blocks for diffusion samplers)
Several processes of one launch split the documents (`_join_launch`, docs/multihost.md). Model args: config, workdir
(required), step, sampler and its options (block_length, steps, threshold,
temperature, top_p, max_denoising_steps, ...), num_t_samples (default eval.num_t_samples), seed, batch_size (rows
per model call, also the harness's --batch_size; default 8), serving_slots (generate_until by continuous batching
with that many slots: the same texts; every sampler but block_fused*), serving_widths (with serving_slots and a
masked sampler: the engine's slot widths, default 4, as diffgemma-generate --serving_widths).
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from diffgemma_jax.compile_cache import use_compilation_cache
from diffgemma_jax.config import load_config
from diffgemma_jax.data.sft import split_tokens
from diffgemma_jax.errors import ConfigError, DataError
from diffgemma_jax.parallel.distributed import (ENV_SIDE_ADDRESS, ENV_SIDE_PORT, launch_process, side_channel_address,
                                                wait_for_port)
from diffgemma_jax.sampling.requests import Generator, check_serving, cut_at_stop, load_tokenizer
from diffgemma_jax.sampling.samplers import (OPTIONS, SAMPLERS, GenerationOptions, requested_options,
                                             validate_options)
from diffgemma_jax.scoring import Scorer
from diffgemma_jax.train.reading import parse_step, restore_model

DEFAULT_BATCH_SIZE = 8
COLLECTIVE_TIMEOUT_S = 24 * 3600  # ranks wait at the harness's barriers while the others finish their share


def _batch_size(value) -> int:
  if value in (None, "", "auto") or str(value).startswith("auto"):
    return DEFAULT_BATCH_SIZE  # no memory probing: a fixed size that fits the tiny models and the 1B on one GPU
  try:
    size = int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"batch_size={value!r}: give a positive integer") from None
  if size < 1:
    raise ConfigError(f"batch_size={value!r}: give a positive integer")
  return size


def _positive_or_none(name: str, value) -> int | None:
  """A model arg that is a count (serving_slots, serving_widths), None when not given."""
  if value in (None, ""):
    return None
  try:
    return int(value)  # check_serving names what is valid
  except (TypeError, ValueError):
    raise ConfigError(f"{name}={value!r}: give a positive integer") from None


FAILED_KEY = "diffgemma/harness_failed"
_LAUNCH: dict = {}  # this process's group of a launch of several: its store, "process r of n"


def report_failure(message: str) -> None:
  """Leaves this process's one-line error where the launch's other processes look when their next collective finds
  it gone (`_collective`); nothing to do for a single process. The store is process 0's: a failing process 0 takes
  it along, and the others then say only that it ended."""
  if _LAUNCH:
    try:
      _LAUNCH["store"].set(FAILED_KEY, f"{_LAUNCH['who']} failed: {message}")
    except Exception:  # pylint: disable=broad-except (the store is gone too: nothing to leave)
      pass


def _collective(run):
  """`run()`, a collective of the launch's group; a peer gone (gloo: "Connection closed by peer") is a DataError
  with the line it left (`report_failure`), instead of the transport's error and a traceback."""
  try:
    return run()
  except RuntimeError as e:
    try:
      store = _LAUNCH["store"]
      store.set_timeout(datetime.timedelta(seconds=5))
      line = store.get(FAILED_KEY).decode()
    except Exception:  # pylint: disable=broad-except (no line left, or process 0 and its store are gone)
      line = (f"{_LAUNCH.get('who', 'this process')}: another process of this launch ended "
              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    raise DataError(line) from None


@register_model("diffgemma")
class DiffGemmaLM(LM):
  """A trained run (config + workdir) behind the harness's three request types."""

  def __init__(self, config, workdir: str | None = None, step: int | None = None, sampler: str | None = None,
               num_t_samples: int | None = None, seed: int = 0, batch_size=None, max_batch_size=None,
               device=None, overrides: str = "", model=None, tokenizer=None, serving_slots=None,
               serving_widths=None, **sampler_options):
    """`config`: a config file (model_args) or a loaded ConfigDict; the parameters of `workdir`'s checkpoint
    `step` (default the latest), or from Python an already built `model` and `tokenizer`."""
    super().__init__()
    del max_batch_size, device  # JAX places the model; batch_size is the fixed size
    unknown = set(sampler_options) - set(OPTIONS)
    if unknown:
      raise ConfigError(f"--model_args: unknown argument(s) {', '.join(sorted(unknown))}; valid: config, workdir, "
                        f"step, sampler, num_t_samples, seed, batch_size, serving_slots, serving_widths, overrides, "
                        f"{', '.join(OPTIONS)}")
    if isinstance(config, str):  # overrides: "a.b=value;c.d=value" (the harness splits model_args at commas)
      pairs = [item.split("=", 1) for item in str(overrides).split(";") if item]
      config = load_config(config, {key: value for key, value in pairs})
    use_compilation_cache(config)  # before the model is restored and its functions compiled
    self.config = config
    objective = str(config.objective.name)
    self.options = requested_options(sampler, objective, sampler_options, seed=int(seed))
    validated = validate_options(self.options, objective, int(config.objective.block_size),
                                 int(config.train.seq_len))  # bad options fail before the model is restored
    self.batch_size = _batch_size(batch_size)
    self.serving_slots = _positive_or_none("serving_slots", serving_slots)
    self.serving_widths = _positive_or_none("serving_widths", serving_widths)
    check_serving(validated.sampler, self.serving_slots, flag="serving_slots", num_widths=self.serving_widths,
                  widths_flag="serving_widths")
    if model is None:
      if not workdir:
        raise ConfigError("--model_args: give workdir=DIR (a training workdir with checkpoints/)")
      self._join_launch(config)  # the CLI's model: the copies of a multi-process launch split the requests
      tokenizer = load_tokenizer(config, str(workdir))
      model, step = restore_model(config, str(workdir), parse_step(step, "--model_args step"))
    self.tokenizer, self.step = tokenizer, step
    self.seq_len = int(config.train.seq_len)
    self.scorer = Scorer(config, model, tokenizer, num_t_samples=num_t_samples, batch_size=self.batch_size,
                         seed=int(seed), batch_flag="--model_args batch_size")
    self.generator = Generator(model, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

  # ---- several processes: data parallel ---------------------------------------------------------------------
  def _join_launch(self, config) -> None:
    """With several processes in this launch (`distributed.launch_process`: srun's tasks, local.sh's processes, a
    JobSet's pods), each answers its share of the requests on its own host's devices: the harness gives rank r of
    n every n-th document of each task and gathers the metrics (and logged samples) to rank 0, which alone
    reports them, through `all_gather`, `gather_object` and `barrier` below, on a torch.distributed gloo group
    (the harness depends on torch) that meets at `distributed.side_channel_address`. JAX's runtime is not joined:
    each process places the whole model on its own devices, so a model must fit one host."""
    index, count = launch_process(config)
    if count == 1:
      return
    import torch
    import torch.distributed as dist
    address = side_channel_address(config)
    timeout = int(config.distributed.initialization_timeout_s)
    who = f"process {index} of {count}"
    if index:  # process 0 serves the meeting point; the others fail naming it rather than wait for ever
      wait_for_port(address, timeout, who)
    host, _, port = address.rpartition(":")
    try:
      store = dist.TCPStore(host.strip("[]"), int(port), count, index == 0,
                            timeout=datetime.timedelta(seconds=timeout))
      dist.init_process_group("gloo", store=store, rank=index, world_size=count,
                              timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:  # torch's store errors are RuntimeErrors
      raise ConfigError(f"{who}: the harness's processes did not all meet at {address} within {timeout} s "
                        f"(distributed.initialization_timeout_s; ${ENV_SIDE_ADDRESS}:${ENV_SIDE_PORT}, or the "
                        f"coordinator's port + 1): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # the harness's collectives wait while other ranks compute: a group of their own with a long timeout
    self._group = dist.new_group(list(range(count)), timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    self._rank, self._world_size, self._device = index, count, torch.device("cpu")
    _LAUNCH.update(store=store, who=who)
    print(f"{who}: answering documents {index}, {index + count}, ... of each task; process 0 gathers the results",
          file=sys.stderr, flush=True)

  def _share(self, kind: str, requests) -> None:
    """Says how many requests of `kind` this process answers, in a launch of several."""
    if self.world_size > 1:
      print(f"process {self.rank} of {self.world_size}: {len(requests)} {kind} requests", file=sys.stderr, flush=True)

  def all_gather(self, tensor):
    if self.world_size == 1:
      return tensor
    import torch
    import torch.distributed as dist
    parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
    _collective(lambda: dist.all_gather(parts, tensor, group=self._group))
    return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

  def gather_object(self, obj, dst=0):
    if self.world_size == 1:
      return [obj]
    import torch.distributed as dist
    gathered = [None] * self.world_size if self.rank == dst else None
    _collective(lambda: dist.gather_object(obj, gathered, dst=dst, group=self._group))
    return gathered

  def barrier(self) -> None:
    if self.world_size > 1:
      import torch.distributed as dist
      _collective(lambda: dist.barrier(group=self._group))

  # ---- log-likelihoods -----------------------------------------------------------------------------------------
  def _encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text)) if text else []

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    self._share("loglikelihood", requests)
    id_pairs = [split_tokens(self.tokenizer, *request.args) for request in requests]
    names = [f"task {request.task_name}, document {request.doc_id}" for request in requests]
    results = self.scorer.score_ids(id_pairs, names, greedy=True)
    # the harness counts is_greedy (its exact_match metric): "unknown" (diffusion models) counts as not greedy
    return [(-r["nll"], bool(r["greedy"])) for r in results]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    self._share("loglikelihood_rolling", requests)
    windows, owners, names = [], [], []
    for index, request in enumerate(requests):
      (text,) = request.args
      # bos is prepended by every row; the harness's prefix token is then the first context token
      for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self._encode(text), prefix_token=self.tokenizer.bos_id, max_seq_len=self.seq_len - 1,
          context_len=1)):
        windows.append((context[1:] if context[:1] == [self.tokenizer.bos_id] else context, predicted))
        owners.append(index)
        names.append(f"task {request.task_name}, document {request.doc_id}")
    totals = [0.0] * len(requests)
    for owner, result in zip(owners, self.scorer.score_ids(windows, names) if windows else []):
      totals[owner] -= result["nll"]
    return totals

  # ---- generation ----------------------------------------------------------------------------------------------
  def _options_for(self, gen_kwargs: dict) -> GenerationOptions:
    """The run's options with the request's length and temperature; `max_gen_toks` new tokens at most, rounded
    up to whole blocks for diffusion samplers, and no more than fits after the longest context."""
    objective = str(self.config.objective.name)
    options = validate_options(self.options, objective, int(self.config.objective.block_size), self.seq_len)
    unit = SAMPLERS[options.sampler].length_unit(options)
    wanted = int(gen_kwargs.get("max_gen_toks", 256))
    length = max(-(-wanted // unit), 1) * unit
    changes: dict[str, Any] = {"gen_length": length}
    if options.steps is not None and self.options.steps is None:
      changes["steps"] = None  # one step per token of the new length
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
      temperature = 0.0
    if "temperature" in SAMPLERS[options.sampler].options and self.options.temperature == 0.0:
      changes["temperature"] = temperature
    return validate_options(dataclasses.replace(options, **changes), objective,
                            int(self.config.objective.block_size), self.seq_len)

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    self._share("generate_until", requests)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
    out: list[str] = [""] * len(requests)
    for indices in groups.values():
      gen_kwargs = dict(requests[indices[0]].args[1])
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      options = self._options_for(gen_kwargs)
      keep = max(self.seq_len - 1 - options.gen_length, 0)  # contexts keep their last tokens (left truncation)
      prompts = []
      for i in indices:
        ids = self._encode(requests[i].args[0])
        prompts.append([self.tokenizer.bos_id] + (ids[len(ids) - keep:] if keep else []))
      results = self.generator.run_requests(prompts, options, batch_size=self.batch_size,
                                            serving_slots=self.serving_slots,
                                            serving_widths=self.serving_widths)
      for index, prompt, result in zip(indices, prompts, results):
        text = self.tokenizer.decode_continuation(prompt, result["ids"])
        out[index] = cut_at_stop(text, until)
    return out


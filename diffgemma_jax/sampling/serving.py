"""Continuous batching: a fixed number of slots kept busy, each refilled from a queue as its request finishes.

Static batching (`canvas.generate`, `autoregressive.generate` over a left-padded batch) runs a batch until its
slowest row is done, and later requests wait for the whole batch. The engine here instead holds B slots, the rows
of one KV cache [B, S], each with its own write position: every `step` is one jitted model call that advances
every busy slot by one step of its own (a denoising step, a finished canvas's commit pass, a decode step; the
programs `serving_canvas.CanvasProgram` and `serving_ar.ARProgram` say what a step is). Steps run in a device loop
until a request finishes; the host then collects it and refills its slot with the next queued request: one
jitted prefill of its prompt into that row (prompts right-padded to a few widths, `bucket_width`, so a handful of
prefills compile). The programs advance each request's random key exactly as the static path does for that
request alone, so every request's tokens equal `canvas.generate` / `autoregressive.generate` run on it alone with
its seed's key (`batching.row_keys`). docs/batching_and_evaluation.md explains the layout.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffgemma_jax.sampling.batching import slot_mask

MIN_BUCKET = 16  # the narrowest prompt width compiled


@dataclasses.dataclass(frozen=True)
class Request:
  """A prompt (token ids, bos included), the most new tokens it may get (a multiple of the program's unit: a
  canvas for the canvas sampler) and its seed (`jax.random.key(seed)`)."""
  prompt: tuple[int, ...]
  max_new_tokens: int
  seed: int = 0


def bucket_width(length: int) -> int:
  """The padded width of a prompt of `length` tokens: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


# ---- what the programs share ----------------------------------------------------------------------------------
def select_rows(rows_B, new, old):
  """`new` in the selected rows, `old` elsewhere (arrays with a leading row axis, random key arrays included)."""
  return jax.lax.select(jnp.broadcast_to(rows_B.reshape((-1,) + (1,) * (new.ndim - 1)), new.shape), new, old)


def prefill_row(model, cache, row, prompt_1W, length):
  """A prompt right-padded to width W (`length` real tokens) run causally into row `row`'s slots [0, W) of the
  batch cache (one model call on a one-row cache of W slots, then copied in): (float32 logits [1, 1, V] of its last
  real token, the cache). Slot = position, as for the prompt alone; the padding's entries are overwritten by the
  row's first generated window before any query may read them."""
  W = prompt_1W.shape[1]
  positions_1W = jnp.arange(W, dtype=jnp.int32)[None]
  logits, cache_1 = model.decode(prompt_1W, positions_1W, slot_mask(1, W, 0, W), model.init_kv_cache(1, W),
                                 positions_1W, 0, logits_start=length - 1, logits_length=1)
  return logits, jax.tree.map(lambda full, one: jax.lax.dynamic_update_slice(full, one, (0, row, 0, 0, 0)), cache,
                              cache_1)


# ---- the host side -----------------------------------------------------------------------------------------------
class Engine:
  """`num_slots` slots of one KV cache for prompts up to `max_prompt_length` tokens and up to `program`'s
  `max_new_tokens` (its config's); `run(requests)` serves them in arrival order and returns each one's result in
  input order."""

  def __init__(self, model, program, num_slots: int, max_prompt_length: int):
    if num_slots < 1:
      raise ValueError(f"num_slots={num_slots} must be >= 1")
    self.program, self.num_slots = program, num_slots
    self.max_prompt_length, self.max_new_tokens = max_prompt_length, program.max_new_tokens
    self.num_cache_slots = bucket_width(max_prompt_length) + program.max_new_tokens
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef
    self._init = jax.jit(lambda state: program.init(nnx.merge(graphdef, state), num_slots, self.num_cache_slots))
    self._insert = jax.jit(lambda state, slots, *args: program.insert(nnx.merge(graphdef, state), slots, *args),
                           donate_argnums=1)

    def advance(state, slots, watched_B):
      """Steps until a watched row (one the host waits on) is done or no row is active: (slots, steps taken). One
      dispatch and one read-back per finished request, not per step."""
      model = nnx.merge(graphdef, state)

      def cond(carry):
        slots, _ = carry
        return jnp.any(program.active(slots)) & ~jnp.any(slots.done_B & watched_B)

      return jax.lax.while_loop(cond, lambda carry: (program.step(model, carry[0]), carry[1] + 1),
                                (slots, jnp.int32(0)))

    self._advance = jax.jit(advance, donate_argnums=1)
    self._compiled: dict[Any, Any] = {}  # "init", "advance" and each prefill width: compiled ahead of a run
    self.model_calls = 0  # of the last run: prefills and steps (each one call of one row or of the whole batch)
    self.steps = 0
    self.compile_seconds = 0.0  # of the last run

  def compile(self, widths) -> None:
    """Compiles the steps' loop, the slots' init and the prefill of each prompt width not compiled yet."""
    if "advance" not in self._compiled:
      self._compiled["init"] = self._init.lower(self.state).compile()
      self._compiled["advance"] = self._advance.lower(self.state, jax.eval_shape(self._init, self.state),
                                                      jax.ShapeDtypeStruct((self.num_slots,), bool)).compile()
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    for width in sorted(set(widths) - set(self._compiled)):
      self._compiled[width] = self._insert.lower(
          self.state, jax.eval_shape(self._init, self.state), scalar, jax.ShapeDtypeStruct((1, width), jnp.int32),
          scalar, jax.eval_shape(lambda: jax.random.key(0)), scalar).compile()

  def check(self, request: Request) -> None:
    if not 1 <= len(request.prompt) <= self.max_prompt_length:
      raise ValueError(f"a prompt of {len(request.prompt)} tokens; the engine takes 1 to {self.max_prompt_length}")
    if not 1 <= request.max_new_tokens <= self.max_new_tokens or request.max_new_tokens % self.program.unit:
      raise ValueError(f"max_new_tokens={request.max_new_tokens} must be a multiple of {self.program.unit} in "
                       f"[1, {self.max_new_tokens}]")

  def _prefill(self, slots, row: int, request: Request):
    width = bucket_width(len(request.prompt))
    prompt = np.zeros((1, width), np.int32)
    prompt[0, :len(request.prompt)] = request.prompt
    return self._compiled[width](self.state, slots, jnp.int32(row), jnp.asarray(prompt),
                                 jnp.int32(len(request.prompt)), jax.random.key(np.uint32(request.seed)),
                                 jnp.int32(request.max_new_tokens // self.program.unit))

  def run(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
    """Each request's {"tokens": new tokens [its max_new_tokens] (the program's fill after EOS), "model_calls",
    "steps" (denoising steps per canvas, or None), "seconds": from the run's start to its completion}."""
    for request in requests:
      self.check(request)
    start = time.perf_counter()
    self.compile([bucket_width(len(request.prompt)) for request in requests])
    self.compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    slots = self._compiled["init"](self.state)
    queue = collections.deque(enumerate(requests))
    owner: list[int | None] = [None] * self.num_slots
    results: list[dict[str, Any]] = [{} for _ in requests]
    self.model_calls = self.steps = 0
    while True:
      for row in range(self.num_slots):
        if owner[row] is None and queue:
          owner[row], request = queue.popleft()
          slots = self._prefill(slots, row, request)
          self.model_calls += 1
      if all(index is None for index in owner):
        break
      slots, steps = self._compiled["advance"](self.state, slots, np.asarray([i is not None for i in owner]))
      done, steps = jax.device_get((slots.done_B, steps))
      self.model_calls += int(steps)
      self.steps += int(steps)
      finished = [row for row, index in enumerate(owner) if index is not None and done[row]]
      if finished:
        rows = jax.device_get(self.program.results(slots))  # one read-back for every row
        for row in finished:
          index = owner[row]
          results[index] = {"tokens": rows["tokens"][row, :requests[index].max_new_tokens],
                            "model_calls": int(rows["model_calls"][row]),
                            "steps": None if rows["steps"] is None else rows["steps"][row],
                            "seconds": time.perf_counter() - start}
          owner[row] = None
    return results

"""Continuous batching: a fixed number of slots kept busy, each refilled from a queue as its request finishes.

Static batching (`canvas.generate`, `masked.generate`, `autoregressive.generate` over a left-padded batch) runs a
batch until its slowest row is done, and later requests wait for the whole batch. The engine here instead holds B
slots, the rows of one KV cache [B, S], each with its own write position: every `step` is one jitted model call
that advances every busy slot by one step of its own (a denoising step, a finished canvas's commit pass, a decode
step; the programs `serving_canvas.CanvasProgram`, `serving_masked.MaskedProgram` and `serving_ar.ARProgram` say
what a step is; the masked program's step is a window call plus, when some slots start a block, one refresh call
of those slots). Steps run in a device loop until a request finishes (the masked program's steps are run from the
host instead, each class of its calls a program compiled on first use: `_advance_on_host`); the host then collects
it and refills the free slots from the queue: ONE jitted prefill call admits every request taken at that point,
each prompt written into its own row (prompts right-padded to a common width, `bucket_width`; groups padded to a few sizes,
`admission_size`, so a handful of prefills compile; the masked program prefills nothing, its first step runs the
whole row). The programs advance each request's random key exactly as the static path does for that request
alone, so every request's tokens equal the static path's run on it alone with its seed's key
(`batching.row_keys`). A request that outlives the most steps its lone run can take (`max_steps`) stops the run
with `EngineStalledError` instead of looping forever (`Engine.run`). docs/batching_and_evaluation.md explains the
layout.
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
from jax.sharding import NamedSharding, PartitionSpec

from diffgemma_jax.errors import EngineStalledError
from diffgemma_jax.sampling.batching import row_keys, slot_mask

MIN_BUCKET = 16  # the narrowest prompt width compiled


@dataclasses.dataclass(frozen=True)
class Request:
  """A prompt (token ids, bos included), the most new tokens it may get (a multiple of the program's unit: a
  canvas or block for the diffusion samplers) and its seed (`jax.random.key(seed)`)."""
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


def admission_size(count: int, num_slots: int) -> int:
  """The rows of the prefill call admitting `count` requests: the next power of two, at most `num_slots`; the
  rows beyond `count` are dummies that write nowhere."""
  return min(num_slots, 1 << max(count - 1, 0).bit_length())


def put_rows(array, rows_A, values):
  """`array` (leading row axis; None stays None) with `values` (one per admitted row, or one for all) written into
  rows `rows_A`; an index out of range (a dummy row) writes nothing."""
  return None if array is None else array.at[rows_A].set(values, mode="drop")


def prefill_rows(model, cache, rows_A, prompts_AW, lengths_A):
  """Prompts right-padded to width W (`lengths_A` real tokens each) run causally in ONE model call on an A-row
  cache of W slots, then scattered into rows `rows_A` of the batch cache at slots [0, W) (rows not admitted keep
  their entries; an out-of-range index, a dummy row, writes nothing): (float32 logits [A, 1, V] of each prompt's
  last real token, the cache). Slot = position, as for the prompt alone; a real token never attends to the
  padding after it (causal), and the padding's entries are overwritten by the row's first generated window before
  any query may read them."""
  A, W = prompts_AW.shape
  positions_AW = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (A, W))
  logits, cache_A = model.decode(prompts_AW, positions_AW, slot_mask(A, W, 0, W), model.init_kv_cache(A, W),
                                 positions_AW, 0, logits_start=lengths_A - 1, logits_length=1)
  return logits, jax.tree.map(lambda full, part: full.at[:, rows_A, :W].set(part, mode="drop"), cache, cache_A)


def placed_mesh(state):
  """The mesh a model's parameters are placed on (their NamedSharding's), or None (one device, or unplaced)."""
  sharding = getattr(next(iter(jax.tree.leaves(state)), None), "sharding", None)
  return sharding.mesh if isinstance(sharding, NamedSharding) else None


def slot_shardings(slots, rows: NamedSharding):
  """The shardings of a program's slot state (a NamedTuple whose first field, `cache`, is the KV cache
  [repeats, B, S, K, H] per layer; every other array field has the row axis first) that split its B rows as `rows`
  splits a batch: each device holds its rows' cache, canvases and keys."""
  cache = NamedSharding(rows.mesh, PartitionSpec(None, *rows.spec))
  return type(slots)(jax.tree.map(lambda _: cache, slots.cache),
                     *(jax.tree.map(lambda _: rows, field) for field in slots[1:]))


# ---- the host side -----------------------------------------------------------------------------------------------
class Engine:
  """`num_slots` slots of one KV cache for prompts up to `max_prompt_length` tokens and up to `program`'s
  `max_new_tokens` (its config's); `run(requests)` serves them in arrival order and returns each one's result in
  input order. `rows`: where the slots' rows go (`Generator.rows_sharding`: split over the data axes of the mesh
  the model is placed on, each device stepping its own slots, for a program whose steps keep to their rows:
  `splits_rows`), or None (wherever the model is)."""

  def __init__(self, model, program, num_slots: int, max_prompt_length: int, rows: NamedSharding | None = None):
    if num_slots < 1:
      raise ValueError(f"num_slots={num_slots} must be >= 1")
    self.program, self.num_slots = program, num_slots
    self.max_prompt_length, self.max_new_tokens = max_prompt_length, program.max_new_tokens
    self.num_cache_slots = bucket_width(max_prompt_length) + program.max_new_tokens
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef
    initial = lambda state: program.init(nnx.merge(graphdef, state), num_slots, self.num_cache_slots)  # noqa: E731
    # Every program returns the slots where `rows` puts them, and is compiled for slots placed so: a step's
    # outputs stay split as its inputs were, and GSPMD runs each device's rows there.
    shape = jax.eval_shape(initial, self.state)
    if rows is not None and program.splits_rows:
      self.slot_shardings = slot_shardings(shape, rows)
    else:  # on the mesh the model is placed on, if any, whole on each device
      mesh = placed_mesh(self.state)
      self.slot_shardings = None if mesh is None else jax.tree.map(
          lambda _: NamedSharding(mesh, PartitionSpec()), shape)
    self.slots_shape = shape if self.slot_shardings is None else jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shape, self.slot_shardings)
    placed = self._placed
    self._init = jax.jit(lambda state: placed(initial(state)))

    def admit(state, slots, rows_A, prompts_AW, lengths_A, seeds_A, units_A):
      return placed(program.insert(nnx.merge(graphdef, state), slots, rows_A, prompts_AW, lengths_A,
                                   row_keys(seeds_A), units_A))

    self._admit = jax.jit(admit, donate_argnums=1)

    def advance(state, slots, watched_B, limit):
      """Steps until a watched row (one the host waits on) is done, no row is active or `limit` steps are taken:
      (slots, steps taken, model calls made). One dispatch and one read-back per finished request, not per step."""
      model = nnx.merge(graphdef, state)

      def cond(carry):
        slots, steps, _ = carry
        return jnp.any(program.active(slots)) & ~jnp.any(slots.done_B & watched_B) & (steps < limit)

      def body(carry):
        slots, steps, calls = carry
        return placed(program.step(model, slots)), steps + 1, calls + program.step_calls(slots)

      return jax.lax.while_loop(cond, body, (slots, jnp.int32(0), jnp.int32(0)))

    self._advance = jax.jit(advance, donate_argnums=1)
    # A program that steps from the host (`host_steps`: the masked one) instead plans each step on the device
    # (`plan`: which class of each kind of call it makes) and runs each planned call as its own jitted program,
    # compiled when a step first needs that class.
    self.host_steps = getattr(program, "host_steps", False)
    if self.host_steps:
      planned = lambda slots: (program.plan(slots), program.active(slots), slots.done_B)  # noqa: E731
      self._plan = jax.jit(planned)

      def call(state, slots, operands, *, kind, size, width):
        """The call and the plan of the step after it (the host uses the step's last call's)."""
        slots = placed(program.call(nnx.merge(graphdef, state), slots, kind, (size, width), operands))
        return slots, planned(slots)

      self._call = jax.jit(call, static_argnames=("kind", "size", "width"), donate_argnums=1)
    self._compiled: dict[Any, Any] = {}  # "init", "advance" or "plan", each (admission size, prompt width) and each
    # call class (kind, rows, width)
    # Of the last run: the engine's model calls (each batched prefill once, each step's calls once: one, or for
    # the masked program up to two, the classes its `plan` names), its steps, its prefill calls and the requests
    # each admission took, and the seconds spent compiling (excluded from "seconds").
    self.model_calls = self.steps = self.prefill_calls = 0
    self.admissions: list[int] = []
    self.compile_seconds = 0.0

  def _placed(self, slots):
    """`slots` constrained to `slot_shardings` (inside a traced program), or as they are."""
    return slots if self.slot_shardings is None else jax.lax.with_sharding_constraint(slots, self.slot_shardings)

  def _compile(self, key, lower) -> Any:
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = lower().compile()
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[key]

  def _admission(self, size: int, width: int):
    """The prefill of `size` rows of prompts `width` wide, compiled on first use (per width at most
    ceil(log2(num_slots)) + 1 sizes)."""
    rows = jax.ShapeDtypeStruct((size,), jnp.int32)
    return self._compile(("admit", size, width), lambda: self._admit.lower(
        self.state, self.slots_shape, rows, jax.ShapeDtypeStruct((size, width), jnp.int32), rows,
        jax.ShapeDtypeStruct((size,), jnp.uint32), rows))

  def check(self, request: Request) -> None:
    if not 1 <= len(request.prompt) <= self.max_prompt_length:
      raise ValueError(f"a prompt of {len(request.prompt)} tokens; the engine takes 1 to {self.max_prompt_length}")
    if not 1 <= request.max_new_tokens <= self.max_new_tokens or request.max_new_tokens % self.program.unit:
      raise ValueError(f"max_new_tokens={request.max_new_tokens} must be a multiple of {self.program.unit} in "
                       f"[1, {self.max_new_tokens}]")

  def _prefill(self, slots, admitted: list[tuple[int, Request]]):
    """One call of the program's `insert` (one model call, none for the masked program) starting every admitted
    (row, request): the group padded to its admission size with dummy
    rows (index num_slots: they write nowhere), the prompts right-padded to the widest one's bucket width."""
    size = admission_size(len(admitted), self.num_slots)
    width = bucket_width(max(len(request.prompt) for _, request in admitted))
    rows = np.full((size,), self.num_slots, np.int32)
    prompts = np.zeros((size, width), np.int32)
    lengths, seeds, units = np.ones((size,), np.int32), np.zeros((size,), np.uint32), np.ones((size,), np.int32)
    for i, (row, request) in enumerate(admitted):
      rows[i], lengths[i], seeds[i] = row, len(request.prompt), request.seed
      prompts[i, :len(request.prompt)] = request.prompt
      units[i] = request.max_new_tokens // self.program.unit
    return self._admission(size, width)(self.state, slots, rows, prompts, lengths, seeds, units)

  def step_programs(self) -> list[Any]:
    """The step programs compiled so far: "advance", or a host-stepped program's ("call", kind, rows, width) each."""
    return [key for key in self._compiled if key == "advance" or isinstance(key, tuple) and key[0] == "call"]

  def _class_call(self, kind: str, size: int, width: int, operands):
    """The call of `kind` on `size` rows over `width` slots (a host-stepped program's class), compiled on first
    use."""
    return self._compile(("call", kind, size, width), lambda: self._call.lower(
        self.state, self.slots_shape, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), operands), kind=kind,
        size=size, width=width))

  def _advance_on_host(self, slots, watched, limit: int):
    """`advance` stepped from the host: per step the planned calls, in the program's order of kinds, then the next
    step's plan (its classes, read back with the rows' flags), which the step's last call returns (`plan` runs on
    its own only on entry). A run compiles only the classes its steps use."""
    classes = self.program.classes(self.num_slots, self.num_cache_slots)
    steps = calls = 0
    planned = self._compiled["plan"](slots)
    while True:
      (plan_K, operands), active, done = planned
      plan_K, active, done = jax.device_get((plan_K, active, done))
      if not active.any() or (done & watched).any() or steps >= limit:
        return slots, steps, calls
      for kind, index in zip(self.program.kinds, plan_K):
        if index:  # both calls of a step read the step's own plan (`operands`)
          size, width = classes[index - 1]
          slots, planned = self._class_call(kind, size, width, operands)(self.state, slots, operands)
          calls += 1
      steps += 1

  def _stalled(self, slots, row: int, index: int, request: Request, steps: int) -> EngineStalledError:
    """The error for a request still in flight after more steps than its lone run can take: what its slot holds
    (every per-row scalar of the program's state)."""
    names = [name for name, value in slots._asdict().items() if isinstance(value, jax.Array) and value.ndim == 1
             and not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)]
    values = jax.device_get([getattr(slots, name) for name in names])
    fields = " ".join(f"{name}={value[row]}" for name, value in zip(names, values))
    return EngineStalledError(
        f"serving engine stalled: request {index} (row {row}, {len(request.prompt)} prompt tokens, "
        f"max_new_tokens={request.max_new_tokens}) is unfinished after {steps} steps, the most its lone run can "
        f"take ({type(self.program).__name__}.max_steps); its slot: {fields}")

  def run(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
    """Each request's {"tokens": new tokens [its max_new_tokens] (the program's fill after EOS), "model_calls"
    (the calls it took part in: its prefill, shared with the requests admitted beside it, and its steps; what its
    lone run makes), "steps" (denoising steps per canvas, or None), "seconds": from the run's start to its
    completion, compiles excluded}.

    The progress guard: a request takes part in every step from its admission to its end and takes at most
    `program.max_steps(its max_new_tokens)` of them (its lone run's most model calls, less its admission's), so no
    advance runs past the fewest steps any request in flight has left; a request unfinished when it has none left
    means a broken engine, and raises `EngineStalledError` (naming it and its slot's state) instead of looping."""
    for request in requests:
      self.check(request)
    self.compile_seconds = 0.0
    self._compile("init", lambda: self._init.lower(self.state))
    if self.host_steps:
      self._compile("plan", lambda: self._plan.lower(self.slots_shape))
    else:
      self._compile("advance", lambda: self._advance.lower(
          self.state, self.slots_shape, jax.ShapeDtypeStruct((self.num_slots,), bool), jnp.int32(0)))
    start, compiled_before = time.perf_counter(), self.compile_seconds
    elapsed = lambda: time.perf_counter() - start - (self.compile_seconds - compiled_before)  # noqa: E731
    slots = self._compiled["init"](self.state)
    queue = collections.deque(enumerate(requests))
    owner: list[int | None] = [None] * self.num_slots
    left = [0] * self.num_slots  # the steps each row's request may still take
    results: list[dict[str, Any]] = [{} for _ in requests]
    self.model_calls = self.steps = self.prefill_calls = 0
    self.admissions = []
    while True:
      admitted = []
      for row in range(self.num_slots):
        if owner[row] is None and queue:
          owner[row], request = queue.popleft()
          left[row] = self.program.max_steps(request.max_new_tokens)
          admitted.append((row, request))
      if admitted:
        slots = self._prefill(slots, admitted)
        self.model_calls += self.program.admission_calls
        self.prefill_calls += self.program.admission_calls
        self.admissions.append(len(admitted))
      if all(index is None for index in owner):
        break
      watched = np.asarray([i is not None for i in owner])
      limit = min(left[row] for row in range(self.num_slots) if watched[row])
      if self.host_steps:
        slots, steps, calls = self._advance_on_host(slots, watched, limit)
      else:
        slots, steps, calls = self._compiled["advance"](self.state, slots, watched, np.int32(limit))
      done, steps, calls = jax.device_get((slots.done_B, steps, calls))
      self.model_calls += int(calls)
      self.steps += int(steps)
      finished = [row for row, index in enumerate(owner) if index is not None and done[row]]
      for row in range(self.num_slots):
        if watched[row]:
          left[row] -= int(steps)
          if left[row] <= 0 and not done[row]:
            index = owner[row]
            raise self._stalled(slots, row, index, requests[index],
                                self.program.max_steps(requests[index].max_new_tokens))
      if finished:
        rows = jax.device_get(self.program.results(slots))  # one read-back for every row
        for row in finished:
          index = owner[row]
          results[index] = {"tokens": rows["tokens"][row, :requests[index].max_new_tokens],
                            "model_calls": int(rows["model_calls"][row]),
                            "steps": None if rows["steps"] is None else rows["steps"][row],
                            "seconds": elapsed()}
          owner[row] = None
    return results

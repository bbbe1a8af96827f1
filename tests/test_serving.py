"""Continuous batching (`sampling/serving.py`): more requests than slots, of different prompt lengths (two prefill
widths) and stopping points (token budgets, an EOS the requests reach at different steps), each get exactly the
tokens, denoising steps and model calls of the static path (`canvas.generate`, `autoregressive.generate`) run on
the request alone with its seed's key, greedy and sampled, both canvas rules and the AR decoder; every request
admitted at one point is prefilled in one call (prompts of different lengths together, dummy rows that write
nowhere beside a busy row); the masked samplers' requests against `masked.generate` alone, and their refresh and
window calls of some slots (gathered, over fewer slots than the cache) against the static denoiser per row; the
per-row cache write against a direct one; bad --serving_slots values fail with
one line."""

import argparse
import dataclasses
import faulthandler

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffgemma_jax.errors import ConfigError, EngineStalledError, GenerationError
from diffgemma_jax.model import ModelConfig, build_model
from diffgemma_jax.model.transformer import write_window
from diffgemma_jax.sampling import autoregressive, batching, canvas, masked, serving_masked
from diffgemma_jax.sampling import requests as requests_module
from diffgemma_jax.sampling.serving import Engine, Request, bucket_width
from diffgemma_jax.sampling.serving_ar import ARProgram
from diffgemma_jax.sampling.requests import Generator, serving_options
from diffgemma_jax.sampling.samplers import GenerationOptions, validate_options
from diffgemma_jax.sampling.serving_canvas import CanvasProgram
from diffgemma_jax.sampling.serving_masked import MaskedProgram
from launch.generate import _read_requests, main

PAD, MASK = 0, 4
# A token-shift block model (the canvas's first token read from the clean pass before it) with sliding layers
# shorter than the prompts and the canvas input norm: every per-row path of the mixed step is exercised.
TINY = ModelConfig(vocab_size=48, embed_dim=32, num_layers=2, layer_pattern=("sliding", "global"), num_heads=4,
                   head_dim=8, num_kv_heads=2, sliding_window=6, global_head_dim=16, global_num_kv_heads=1,
                   mlp_dim=32, num_experts=4, top_k=2, expert_dim=16, dispatch="dense", canvas_input_norm=True,
                   token_shift=True)
LENGTHS = (5, 19, 11, 5, 19)  # prefill widths 16 and 32
BUDGETS = (12, 8, 12, 4, 12)  # max new tokens: 3, 2, 3 and 1 canvases of 4
CANVAS, SLOTS = 4, 2
CASES = {
    "canvas_greedy": canvas.CanvasConfig(CANVAS, 3, canvas.MaskedRule(2, "low_confidence")),
    "canvas_sampled": canvas.CanvasConfig(CANVAS, 3, canvas.MaskedRule(3, "threshold", 0.5, temperature=1.0)),
    # renoising with partial acceptance; the early stop (argmax stable: every mean entropy of the random model is
    # below 5 nats) ends canvases after 2 to 6 steps
    "entropy_bound": canvas.CanvasConfig(CANVAS, 3, canvas.EntropyBoundRule(
        max_denoising_steps=6, entropy_bound=1.0, temperature_start=0.3, temperature_end=0.1, stop_mean_entropy=5.0)),
    "ar_greedy": autoregressive.ARConfig(max_new_tokens=12),
    "ar_sampled": autoregressive.ARConfig(max_new_tokens=12, temperature=1.0, top_p=0.9),
}


@pytest.fixture(scope="module")
def model():
  return build_model(TINY, 0)


@pytest.fixture(scope="module")
def uniform_model():
  """A uniform-state model: no token shift, self-conditioned (the entropy-bound rule's signal between steps), its
  zero-initialised signal projection made random so that the signal a row carries changes its logits."""
  uniform = build_model(dataclasses.replace(TINY, token_shift=False, self_conditioning=True), 0)
  down = uniform.self_conditioning.w_down
  down[...] = jax.random.normal(jax.random.key(5), down[...].shape, down[...].dtype)
  return uniform


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(1)
  return [[2] + rng.integers(5, TINY.vocab_size, n - 1).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def lone_runs(model, uniform_model, prompts):
  """`_alone` of a case (on its model), computed once per module: (model, runs)."""
  cache = {}

  def runs(case):
    if case not in cache:
      case_model = uniform_model if case == "entropy_bound" else model
      cache[case] = case_model, _alone(case_model, CASES[case], prompts)
    return cache[case]

  return runs


def _alone(model, cfg, prompts):
  """Each prompt alone (a one-row batch, row key `row_keys([request index])`) through the static path with its full
  budget and no EOS: (new tokens, steps per canvas or None) per request. The row is left-padded to the longest
  prompt (`prompt_starts_B`, which changes no logit: test_batched_generation.py), so the path compiles once."""
  graphdef, state = nnx.split(model)
  if isinstance(cfg, canvas.CanvasConfig):
    fn = jax.jit(lambda s, p, k, starts: (lambda out: (out.tokens, out.steps))(canvas.generate(
        nnx.merge(graphdef, s), p, k, cfg, mask_id=MASK, eos_id=None, pad_id=PAD, prompt_starts_B=starts)))
  else:
    fn = jax.jit(lambda s, p, k, starts: autoregressive.generate(nnx.merge(graphdef, s), p, k, cfg,
                                                                 prompt_starts_B=starts))
  runs = []
  for index, prompt in enumerate(prompts):
    padded, starts = batching.left_pad([prompt], PAD, width=max(LENGTHS))
    tokens, steps = fn(state, jnp.asarray(padded), batching.row_keys([index]), jnp.asarray(starts))
    runs.append((np.asarray(tokens[0, max(LENGTHS):]), np.asarray(steps[0]) if steps.ndim == 2 else None))
  return runs


def _stopping_eos(runs, budgets=BUDGETS):
  """A token that first appears at different places in at least two budgets and not in every one: the EOS."""
  candidates = {}
  for (tokens, _), budget in zip(runs, budgets):
    for token in set(tokens[:budget].tolist()) - {PAD, MASK}:
      candidates.setdefault(token, set()).add(int(np.argmax(tokens[:budget] == token)))
  fitting = [t for t, firsts in candidates.items() if len(firsts) >= 2 and 0 < sum(
      t in tokens[:budget] for (tokens, _), budget in zip(runs, budgets)) < len(runs)]
  assert fitting, "no generated token stops some requests at different places; change the prompts' seed"
  return min(fitting)


def _expected(run, budget: int, eos: int, cfg):
  """What the static path gives the request alone with its budget and `eos`: the tokens to the first EOS, then the
  fill (padding for canvases, EOS for the AR decoder); its denoising steps per canvas and model calls."""
  tokens, steps = run[0][:budget].copy(), run[1]
  end = int(np.argmax(tokens == eos)) + 1 if eos in tokens else budget
  tokens[end:] = PAD if steps is not None else eos
  if steps is None:
    return tokens, None, end
  ran = -(-end // CANVAS)
  steps = np.where(np.arange(len(steps)) < ran, steps, 0)
  return tokens, steps, 1 + int(steps.sum()) + ran - 1


def _program(cfg, eos):
  if isinstance(cfg, canvas.CanvasConfig):
    return CanvasProgram(cfg, mask_id=MASK, eos_id=eos, pad_id=PAD)
  return ARProgram(cfg, eos_id=eos)


def _check_each(results, runs, budgets, eos, cfg) -> int:
  """Every request's tokens, steps per canvas and model calls against its lone run: how many ended at `eos`."""
  stopped = 0
  for index, (run, result, budget) in enumerate(zip(runs, results, budgets)):
    tokens, steps, calls = _expected(run, budget, eos, cfg)
    np.testing.assert_array_equal(result["tokens"], tokens, err_msg=f"request {index}")
    assert result["model_calls"] == calls, index
    if steps is not None:
      np.testing.assert_array_equal(result["steps"], steps, err_msg=f"request {index}")
    stopped += eos in tokens
  return stopped


@pytest.mark.parametrize("case", CASES)
def test_each_request_equals_its_lone_static_run(lone_runs, prompts, case):
  cfg = CASES[case]
  model, runs = lone_runs(case)
  eos = _stopping_eos(runs)
  engine = Engine(model, _program(cfg, eos), SLOTS, max(LENGTHS))
  results = engine.run([Request(tuple(p), budget, seed) for seed, (p, budget) in enumerate(zip(prompts, BUDGETS))])
  assert _check_each(results, runs, BUDGETS, eos, cfg) >= 1  # some request ended at its EOS, others at their budget
  # The first admission prefills prompts of both widths (5 and 19 tokens) together.
  assert {bucket_width(n) for n in LENGTHS} == {16, 32} and engine.admissions[0] == SLOTS
  assert sum(engine.admissions) == len(LENGTHS) and engine.prefill_calls == len(engine.admissions)
  assert engine.model_calls == engine.steps + engine.prefill_calls
  # Slots kept busy: fewer batch steps than the requests' calls one after another.
  assert engine.steps < sum(r["model_calls"] for r in results) - len(results)


# The masked samplers (masked.py) with the dual cache on the same model: a slot's step refreshes its whole canvas
# (a block's first step) or steps its block on the cache. Threshold 0.1 ends blocks after different numbers of
# steps, so refreshes and admissions fall between other slots' cached steps; 1 and 2 blocks of 4 per request.
MASKED_BUDGETS = (8, 4, 8, 4, 8)
MASKED = {"threshold_greedy": masked.SamplerConfig(gen_length=8, block_length=CANVAS, steps_per_block=CANVAS,
                                                   acceptance="threshold", threshold=0.1, cache="dual"),
          "threshold_sampled": masked.SamplerConfig(gen_length=8, block_length=CANVAS, steps_per_block=CANVAS,
                                                    acceptance="threshold", threshold=0.1, temperature=1.0,
                                                    cache="dual"),
          # threshold_nocache: every step a refresh, so only the refresh calls (batched by their count) are made
          "uncached_sampled": masked.SamplerConfig(gen_length=8, block_length=CANVAS, steps_per_block=CANVAS,
                                                   acceptance="low_confidence", temperature=1.0, cache="none")}


def _masked_alone(model, cfg, prompts, budgets):
  """fn(eos) -> (new tokens, model calls) of each prompt alone through `masked.generate` with its budget as
  gen_length, row key `row_keys([request index])` and the EOS id `eos` (an argument: one compile per budget serves
  every EOS), left-padded to the longest prompt as `_alone` does."""
  graphdef, state = nnx.split(model)
  fns = {}
  for budget in set(budgets):
    own = dataclasses.replace(cfg, gen_length=budget)
    fns[budget] = jax.jit(lambda s, p, k, starts, eos, own=own: masked.generate(
        masked.make_denoiser(nnx.merge(graphdef, s), own, p.shape[1], starts), p, k, own, mask_id=MASK, eos_id=eos))

  def runs(eos: int):
    out = []
    for index, (prompt, budget) in enumerate(zip(prompts, budgets)):
      padded, starts = batching.left_pad([prompt], PAD, width=max(LENGTHS))
      tokens, calls = fns[budget](state, jnp.asarray(padded), batching.row_keys([index]), jnp.asarray(starts),
                                  jnp.int32(eos))
      out.append((np.asarray(tokens[0, max(LENGTHS):]), int(calls[0])))
    return out

  return runs


@pytest.mark.parametrize("case", MASKED)
def test_masked_requests_equal_their_lone_static_runs(model, prompts, case):
  cfg = MASKED[case]
  alone = _masked_alone(model, cfg, prompts, MASKED_BUDGETS)
  eos = _stopping_eos(alone(-1), MASKED_BUDGETS)
  expected = alone(eos)  # the lone runs stopping at that EOS
  # Greedy: two widths (20 and 40 of the 40 slots; the canvases are 9 to 27 wide), calls run at both; the other
  # cases one width (each class of call compiles on its own: fewer classes, a cheaper test).
  program = MaskedProgram(dataclasses.replace(cfg, gen_length=max(MASKED_BUDGETS)), mask_id=MASK, eos_id=eos,
                          pad_id=PAD, num_widths=2 if case == "threshold_greedy" else 1)
  engine = Engine(model, program, SLOTS, max(LENGTHS))
  results = engine.run([Request(tuple(p), budget, seed)
                        for seed, (p, budget) in enumerate(zip(prompts, MASKED_BUDGETS))])
  assert {width for _, _, _, width in engine.step_programs()} == set(program.widths(engine.num_cache_slots))
  for index, ((tokens, calls), result) in enumerate(zip(expected, results)):
    np.testing.assert_array_equal(result["tokens"], tokens, err_msg=f"request {index}")
    assert result["model_calls"] == calls and result["steps"] is None, index  # calls: its steps, as alone
  assert 0 < sum(eos in tokens for tokens, _ in expected) < len(expected)
  # With the cache some steps made both calls: a refresh beside another slot's cached step. Admissions call nothing.
  assert engine.prefill_calls == 0 and engine.admissions[0] == SLOTS and sum(engine.admissions) == len(LENGTHS)
  if cfg.cache == "dual":
    assert engine.steps < engine.model_calls < 2 * engine.steps
  else:
    assert engine.model_calls == engine.steps
  assert engine.steps < sum(calls for _, calls in expected)


def _four_slots(program, model, lengths, blocks, num_cache_slots):
  """Four slots holding random prompts of `lengths` tokens and `blocks` blocks each, the slot before each row's
  current block (`block_B`) set to a committed token: fn(model, block_B) -> (slots, each row's block start)."""
  rng = np.random.default_rng(2)
  prompts = np.zeros((4, 16), np.int32)
  for row, n in enumerate(lengths):
    prompts[row, :n] = [2] + rng.integers(5, TINY.vocab_size, n - 1).tolist()

  def slots_of(model, block_B):
    slots = program.insert(model, program.init(model, 4, num_cache_slots), jnp.arange(4), prompts,
                           jnp.asarray(lengths), batching.row_keys(range(4)), jnp.asarray(blocks))
    start_B = slots.prompt_B + block_B * CANVAS
    return slots._replace(canvas_BS=slots.canvas_BS.at[jnp.arange(4), start_B - 1].set(7), block_B=block_B), start_B

  return slots_of


def test_masked_refresh_writes_only_the_refreshing_rows(model):
  """Three of four slots refresh (a call of 4 rows, one a dummy, over 13 of the 26 slots: the narrower of two
  widths): each one's block logits and cache row against the static denoiser's whole-canvas pass on its canvas
  alone; the fourth slot, mid-block, keeps its cache row and logits bit for bit, and so do the refreshing rows'
  slots beyond the call's width."""
  program = MaskedProgram(MASKED["threshold_greedy"], mask_id=MASK, eos_id=None, pad_id=PAD, num_widths=2)
  assert program.widths(26) == (13, 26)
  graphdef, state = nnx.split(model)
  lengths, blocks = np.asarray([5, 9, 5, 9], np.int32), np.asarray([2, 1, 2, 1], np.int32)  # each canvas: 13 slots
  slots_of = _four_slots(program, model, lengths, blocks, 26)

  def refresh(state, refresh_B, block_B, cache):
    model = nnx.merge(graphdef, state)
    slots, _ = slots_of(model, block_B)
    rows_R, take_R = program.rows(refresh_B, 4)
    return slots.canvas_BS, rows_R, program.refresh(model, slots._replace(cache=cache), rows_R, take_R, 13)

  sentinel = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), model.init_kv_cache(4, 26))
  block_B = jnp.asarray([1, 0, 0, 0])
  canvas, rows_R, (logits, cache) = jax.jit(refresh)(state, jnp.asarray([True, True, False, True]), block_B,
                                                     sentinel)
  np.testing.assert_array_equal(rows_R, [0, 1, 3, 4])  # the dummy row: 4, written nowhere
  full = jax.jit(lambda state, canvas, start: masked.ModelDenoiser(nnx.merge(graphdef, state), CANVAS, "dual").full(
      canvas, nnx.merge(graphdef, state).init_kv_cache(1, 13), start))
  for call_row, row in enumerate((0, 1, 3)):
    lone_logits, lone_cache = full(state, canvas[row:row + 1, :13], lengths[row] + block_B[row] * CANVAS)
    np.testing.assert_allclose(logits[call_row], lone_logits[0], rtol=1e-5, atol=1e-5)
    for part, lone, before in zip(jax.tree.leaves(cache), jax.tree.leaves(lone_cache), jax.tree.leaves(sentinel)):
      np.testing.assert_allclose(part[:, row, :13], lone[:, 0], rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(part[:, row, 13:], before[:, row, 13:])
  for part, before in zip(jax.tree.leaves(cache), jax.tree.leaves(sentinel)):
    np.testing.assert_array_equal(part[:, 2], before[:, 2])


def test_masked_window_call_runs_only_the_cached_rows(model):
  """After every slot's refresh and a commit in each block, one of four slots steps on the cache (gathered into a
  call of 1 row over 13 of the 26 slots), then three (the whole batch over the first 13 slots of every row): each
  stepping row's block logits against the static denoiser's cached step on its canvas alone (after the lone
  refresh); the other rows' logits untouched, and the cache too (a window's keys/values are read by its own call
  only), bit for bit. The canvases are 9 and 13 slots long, so each row's mask matters."""
  program = MaskedProgram(MASKED["threshold_greedy"], mask_id=MASK, eos_id=None, pad_id=PAD, num_widths=2)
  graphdef, state = nnx.split(model)
  lengths, blocks = np.asarray([5, 9, 5, 9], np.int32), np.asarray([2, 1, 1, 1], np.int32)  # 13, 13, 9, 13 slots
  slots_of = _four_slots(program, model, lengths, blocks, 26)
  block_B = jnp.asarray([1, 0, 0, 0])

  def cached(state, cached_B, size):
    model = nnx.merge(graphdef, state)
    slots, start_B = slots_of(model, block_B)
    _, cache = program.refresh(model, slots, *program.rows(jnp.ones((4,), bool), 4), 13)
    committed = slots.canvas_BS.at[jnp.arange(4), start_B + 1].set(9)  # a step committed a token in each block
    stepped = slots._replace(canvas_BS=committed, cache=cache)
    if size == 4:  # more rows than the largest count below 4: the whole batch
      return slots.canvas_BS, committed, cache, jnp.arange(4), program.whole_batch_window(model, stepped, cached_B, 13)
    rows_R, take_R = program.rows(cached_B, size)
    return slots.canvas_BS, committed, cache, rows_R, program.window(model, stepped, rows_R, take_R, 13)

  lone = masked.ModelDenoiser(model, CANVAS, "dual")
  lone_step = jax.jit(lambda before, after, start: lone.cached(
      after, lone.full(before, model.init_kv_cache(1, before.shape[1]), start)[1], start)[0])
  for rows, size in (((2,), 1), ((0, 2, 3), 4)):
    canvas, committed, before, rows_R, (logits, cache) = jax.jit(cached, static_argnums=2)(
        state, jnp.asarray([row in rows for row in range(4)]), size)
    for call_row, row in enumerate(np.asarray(rows_R)):
      if row in rows:
        end, start = int(lengths[row] + blocks[row] * CANVAS), int(lengths[row] + block_B[row] * CANVAS)
        lone_logits = lone_step(canvas[row:row + 1, :end], committed[row:row + 1, :end], start)
        np.testing.assert_allclose(logits[call_row], lone_logits[0], rtol=1e-5, atol=1e-5)
    assert sum(row in rows for row in np.asarray(rows_R)) == len(rows)
    for part, old in zip(jax.tree.leaves(cache), jax.tree.leaves(before)):
      np.testing.assert_array_equal(part, old)


# 7 requests through 4 slots, no EOS: the first 4 (prompts of 5 to 19 tokens) start in one prefill call; requests
# 0-2 end together while request 3 goes on, and requests 4-6 start in one call of 4 rows (the 4th a dummy that must
# write nowhere, least of all into busy row 3). Budgets, then the engine's steps (AR: budget - 1 each; a canvas
# request of k canvases: 2 denoising steps per canvas and k - 1 commits).
ADMISSION = {"ar_greedy": ((2, 2, 2, 6, 3, 3, 3), 1 + 2 + 2),
             "canvas_greedy": ((4, 4, 4, 12, 8, 8, 8), 2 + 5 + 1)}


@pytest.mark.parametrize("case", ADMISSION)
def test_one_prefill_call_admits_every_free_slot(lone_runs, prompts, case):
  cfg, (budgets, steps) = CASES[case], ADMISSION[case]
  model, runs = lone_runs(case)
  which = [index % len(prompts) for index in range(len(budgets))]
  engine = Engine(model, _program(cfg, None), 4, max(LENGTHS))
  results = engine.run([Request(tuple(prompts[i]), budget, i) for i, budget in zip(which, budgets)])
  _check_each(results, [runs[i] for i in which], budgets, -1, cfg)
  assert engine.admissions == [4, 3] and engine.prefill_calls == 2  # one call per admission, not one per request
  assert engine.steps == steps and engine.model_calls == steps + 2


def test_own_gen_lengths_served_whole_and_never_mixed_in_static_batches(model, prompts, monkeypatch):
  """Requests with their own gen_length (a --prompts JSONL field): the engine gives each its whole budget (an EOS
  id the model never emits) in 4 steps per canvas of 4 and the calls of its lone run; static batches (a spy here;
  they are tested elsewhere) get one budget each."""
  generator = Generator(model, mask_id=MASK, eos_id=TINY.vocab_size, pad_id=PAD)
  masked_cfg = MASKED["threshold_greedy"]  # the masked engine's widths: serving_masked.NUM_WIDTHS, or as given
  assert generator.engine(masked_cfg, 2, 8).program.num_widths == serving_masked.NUM_WIDTHS
  three = generator.engine(masked_cfg, 2, 8, 3)
  assert three.num_cache_slots == 16 + 8 and three.program.widths(three.num_cache_slots) == (8, 16, 24)
  budgets = (4, 8, 4)
  own = [validate_options(GenerationOptions(sampler="block_low_confidence", gen_length=budget, block_length=CANVAS),
                          "block", CANVAS) for budget in budgets]
  served = generator.run_requests(prompts[:3], own[0], serving_slots=4, request_options=own)
  for result, budget in zip(served, budgets):
    canvases = budget // CANVAS
    assert len(result["ids"]) == budget and result["steps_per_canvas"] == [CANVAS] * canvases
    assert result["model_calls"] == 1 + CANVAS * canvases + canvases - 1
  # A caller keeping results as they come (diffgemma-generate --output FILE.jsonl): served a chunk of
  # SERVE_CHUNK_SLOTS x slots requests at a time, each reported when its chunk ends, each the same as before, and
  # none kept by the generator (a large job's results are the caller's to hold)
  monkeypatch.setattr(requests_module, "SERVE_CHUNK_SLOTS", 1)
  reported = []
  kept = generator.run_requests(prompts[:3] * 2, own[0], serving_slots=4, request_options=own * 2,
                                on_results=lambda indices, done: reported.append((indices, done)))
  chunked = [r for _, done in reported for r in done]
  assert kept == [] and [indices for indices, _ in reported] == [[0, 1, 2, 3], [4, 5]]
  assert [r["ids"] for r in chunked] == [r["ids"] for r in served * 2]
  assert [r["model_calls"] for r in chunked] == [r["model_calls"] for r in served * 2]
  batches = []
  monkeypatch.setattr(generator, "run_batches", lambda batch, options, size, on_batch=None: batches.append(
      (options.gen_length, list(batch), size)) or [{"gen_length": options.gen_length} for _ in batch])
  static = generator.run_requests(prompts[:3], own[0], batch_size=4, request_options=own)
  assert batches == [(4, [prompts[0], prompts[2]], 4), (8, [prompts[1]], 4)]
  assert [r["gen_length"] for r in static] == list(budgets)
  # --steps 2 over one canvas and over two: different rules, which one engine cannot serve
  stepped = [validate_options(GenerationOptions(sampler="block_low_confidence", gen_length=budget, block_length=CANVAS,
                                                steps=2), "block", CANVAS) for budget in (4, 8)]
  with pytest.raises(GenerationError, match="different steps per canvas; drop --steps or --serving_slots"):
    serving_options(stepped, 2)
  assert serving_options(own, 2) == own[1]


def test_prompts_jsonl_gen_length_per_request(tmp_path, capsys):
  lines = tmp_path / "p.jsonl"
  lines.write_text('"a"\n{"prompt": "b", "gen_length": 32}\n{"prompt": "c", "gen_length": null}\n')
  read = lambda path: tuple(map(list, _read_requests(argparse.Namespace(prompt=None, prompts=str(path)))))  # noqa: E731
  assert read(lines) == (["a", "b", "c"], [None, 32, None], [f"--prompts {lines}:{n}" for n in (1, 2, 3)])
  text = tmp_path / "p.txt"
  text.write_text('{"prompt": "b", "gen_length": 32}\n')  # a text file's line is its prompt, whatever it holds
  assert read(text)[:2] == (['{"prompt": "b", "gen_length": 32}'], [None])
  for bad in ('"32"', "0", "1.5", "true"):
    lines.write_text('"a"\n{"prompt": "b", "gen_length": %s}\n' % bad)
    with pytest.raises(ConfigError, match=rf"p.jsonl:2: field 'gen_length' must be a whole number >= 1 .*got {bad}$"):
      read(lines)
  # a budget the sampler cannot run fails with one line before any model is restored (the workdir is empty)
  lines.write_text('{"prompt": "b", "gen_length": 32}\n{"prompt": "c", "gen_length": 20}\n')
  code = main(["--config", "configs/block_tiny.py", "--workdir", str(tmp_path), "--prompts", str(lines)])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert "p.jsonl:2: gen_length 20 must be a positive multiple of 16" in err


def test_per_row_cache_write_against_a_direct_write():
  rng = np.random.default_rng(0)
  buffer = rng.normal(size=(2, 3, 10, 2)).astype(np.float32)  # [R, B, S, ...]
  window = rng.normal(size=(3, 4, 2)).astype(np.float32)  # [B, L, ...]
  index = np.asarray([0, 6, 3], np.int32)
  expected = buffer.copy()
  for row, at in enumerate(index):
    expected[1, row, at:at + 4] = window[row]
  np.testing.assert_array_equal(write_window(jnp.asarray(buffer), jnp.asarray(window), jnp.asarray(index), 1),
                                expected)
  shared = write_window(jnp.asarray(buffer), jnp.asarray(window), jnp.int32(3), 1)  # the scalar path
  np.testing.assert_array_equal(write_window(jnp.asarray(buffer), jnp.asarray(window), jnp.full((3,), 3), 1), shared)


@pytest.mark.parametrize("argv,message", [
    (["--serving_slots", "0", "--config.objective.name=ar"], "--serving_slots must be >= 1, got 0"),
    (["--serving_slots", "2", "--config.objective.name=block", "--sampler", "block_fused"],
     "--serving_slots runs the samplers ar, low_confidence, low_confidence_cached, threshold, threshold_nocache, "
     "block_threshold, block_low_confidence, entropy_bound, not sampler block_fused"),
    (["--serving_slots", "2", "--batch_size", "4", "--config.objective.name=ar"], "drop --batch_size"),
    (["--serving_slots", "2", "--serving_widths", "0"],
     "--serving_widths must be an integer >= 1 (the masked engine's slot widths), got 0"),
    (["--serving_slots", "2", "--serving_widths", "2", "--config.objective.name=ar"],
     "--serving_widths sets the slot widths of the samplers low_confidence, low_confidence_cached, threshold, "
     "threshold_nocache on the engine, not of sampler ar"),
    (["--serving_widths", "2"], "--serving_widths sets the continuous-batching engine's slot widths; give "
     "--serving_slots too"),
])
def test_bad_serving_slots_exit_2_with_one_line(argv, message, capsys, tmp_path):
  code = main(["--config", "configs/pretrain_tiny.py", "--workdir", str(tmp_path), "--prompt", "x"] + argv)
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_engine_refuses_what_it_cannot_serve(model):
  engine = Engine(model, CanvasProgram(CASES["canvas_greedy"], mask_id=MASK, eos_id=None), 1, 8)
  with pytest.raises(ValueError, match="a prompt of 9 tokens; the engine takes 1 to 8"):
    engine.check(Request(tuple(range(9)), 4))
  for budget in (6, 16):
    with pytest.raises(ValueError, match=f"max_new_tokens={budget} must be a multiple of 4 in"):
      engine.check(Request((2,), budget))


@pytest.fixture
def hang_guard():
  """A safety net for the tests of the progress guard: without the guard they would loop forever (in the device
  loop, where no Python signal reaches), so the process is ended with a traceback after 3 minutes."""
  faulthandler.dump_traceback_later(180, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()


def test_a_stalled_masked_engine_raises_instead_of_looping(model, prompts, monkeypatch, hang_guard):
  """A broken masked engine (its planned calls change nothing, so no request ever ends; the program steps from
  the host) stops when a request has taken its lone run's most steps (2 blocks x 4 steps) and names it and its
  slot's state."""
  monkeypatch.setattr(MaskedProgram, "call", lambda self, model, slots, *_: slots)
  program = MaskedProgram(MASKED["threshold_greedy"], mask_id=MASK, eos_id=None, pad_id=PAD, num_widths=1)
  assert program.max_steps(8) == 8 and program.max_steps(4) == 4
  engine = Engine(model, program, 1, max(LENGTHS))
  with pytest.raises(EngineStalledError, match=r"^serving engine stalled: request 0 \(row 0, 5 prompt tokens, "
                     r"max_new_tokens=8\) is unfinished after 8 steps, the most its lone run can take "
                     r"\(MaskedProgram.max_steps\); its slot: prompt_B=5 end_B=13 block_B=0 step_B=0 calls_B=0 "
                     r"active_B=True done_B=False$"):
    engine.run([Request(tuple(prompts[0]), 8, 0)])
  assert engine.steps == 8


def test_a_stalled_device_loop_raises_instead_of_looping(model, prompts, monkeypatch, hang_guard):
  """The same guard in the device loop (the AR decoder's step broken to change nothing): of two requests, the one
  with fewer steps left (budget 3: 2 steps after its prefill's token) is named when it has taken them."""
  monkeypatch.setattr(ARProgram, "step", lambda self, model, slots: slots)
  program = ARProgram(autoregressive.ARConfig(max_new_tokens=6), eos_id=None)
  engine = Engine(model, program, 2, max(LENGTHS))
  with pytest.raises(EngineStalledError, match=r"request 1 \(row 1, 19 prompt tokens, max_new_tokens=3\) is "
                     r"unfinished after 2 steps.*ARProgram.max_steps.*count_B=1 "):
    engine.run([Request(tuple(prompts[0]), 6, 0), Request(tuple(prompts[1]), 3, 1)])
  assert engine.steps == 2

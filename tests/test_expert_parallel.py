"""Expert-parallel dispatch (all_to_all in shard_map) against single-device dense dispatch on 8 fake CPU devices.

The device count is fixed when JAX starts, so in a normal (one-device) session `test_on_eight_fake_devices` re-runs
this file in a subprocess with `--xla_force_host_platform_device_count=8`, where the other tests run.
"""

from __future__ import annotations

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model import dispatch
from diffgemma_jax.parallel import make_mesh
from diffgemma_jax.parallel import expert
from diffgemma_jax.parallel.expert import (Capacity, expert_capacity, expert_parallel_routed_experts, plan_pairs,
                                          replicated_token_routed_experts, routed_share)

sys.path.insert(0, os.path.dirname(__file__))
from conftest import rerun_on_eight_devices  # noqa: E402  pylint: disable=wrong-import-position

EIGHT = jax.device_count() >= 8
needs_eight = pytest.mark.skipif(not EIGHT, reason="runs inside test_on_eight_fake_devices")

T, D, F, E, K = 64, 16, 8, 8, 2
MESHES = {"fsdp2_expert4": (1, 2, 4, 1), "expert8": (1, 1, 8, 1), "data2_fsdp2_expert2": (2, 2, 2, 1)}


# Tests of this file that may skip in the 8-device re-run: the re-run itself, and what needs a GPU.
MAY_SKIP_ON_EIGHT_CPUS = {"test_on_eight_fake_devices", "test_ragged_all_to_all_matches_dense_on_gpu"}


@pytest.mark.skipif(EIGHT, reason="already on 8 devices")
def test_on_eight_fake_devices(tmp_path):
  """Re-runs this file on 8 fake devices: every test ran and passed, none skipped but the re-run itself and the
  GPU check."""
  rerun_on_eight_devices(__file__, str(tmp_path / "eight.xml"), MAY_SKIP_ON_EIGHT_CPUS,
                         min_ran=18)  # the tests beside those two when this was written


def _problem(seed: int = 0, skew: float = 0.0, E: int = E, K: int = K):  # pylint: disable=redefined-outer-name
  """Tokens, top-k ids (distinct per token), combine weights and expert weights; `skew` > 0 favours expert 0, 1."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(T, E)) + skew * (np.arange(E) < 2)
  ids = np.argsort(-logits, axis=1)[:, :K].astype(np.int32)
  return dict(x=jnp.asarray(rng.normal(size=(T, D)), jnp.float32),
              ids=jnp.asarray(ids),
              weights=jnp.asarray(rng.uniform(0.2, 1.0, size=(T, K)), jnp.float32),
              w_gate_up=jnp.asarray(rng.normal(size=(E, D, 2 * F)) / 4, jnp.float32),
              w_down=jnp.asarray(rng.normal(size=(E, F, D)) / 4, jnp.float32))


def _reference(p, weights=None):
  return dispatch.routed_experts(p["x"], p["ids"], p["weights"] if weights is None else weights, p["w_gate_up"],
                                 p["w_down"], backend="dense", compute_dtype=jnp.float32)


def _close(actual, expected, rtol=1e-5):
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=rtol * scale)


def _loss_and_grads(fn, p):
  """Value and gradients w.r.t. x, combine weights and both expert weights of sum(sin(y))."""
  def loss(x, weights, w_gate_up, w_down):
    y = fn(dict(p, x=x, weights=weights, w_gate_up=w_gate_up, w_down=w_down))
    return jnp.sum(jnp.sin(y)), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      p["x"], p["weights"], p["w_gate_up"], p["w_down"])
  return y, grads


def _ep(mesh, backend="dense", **kw):
  def fn(p):
    y, _ = expert_parallel_routed_experts(p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"], mesh=mesh,
                                          backend=backend, compute_dtype=jnp.float32, **kw)
    return y
  return fn


@needs_eight
@pytest.mark.parametrize("mesh_name,backend", [(m, "dense") for m in MESHES] + [
    ("fsdp2_expert4", "sorted"), ("data2_fsdp2_expert2", "ragged"), ("expert8", "pallas")])
def test_dropless_matches_single_device(mesh_name, backend):
  mesh = make_mesh(MESHES[mesh_name])
  p = _problem()
  y, grads = _loss_and_grads(_ep(mesh, backend, dropless=True), p)
  y_ref, grads_ref = _loss_and_grads(_reference, p)
  _close(y, y_ref)
  for name, g, g_ref in zip(("x", "combine weights", "w_gate_up", "w_down"), grads, grads_ref):
    assert g.shape == g_ref.shape, name
    _close(g, g_ref)


@needs_eight
@pytest.mark.parametrize("mesh_name,backend", [("expert8", "dense"), ("fsdp2_expert4", "sorted"),
                                               ("data2_fsdp2_expert2", "ragged")])
def test_replicated_tokens_on_their_experts_shards_match_single_device(mesh_name, backend):
  """Tokens that do not split over the mesh (a sampler's 3 rows) run on every expert shard against its own experts,
  the parts summed over `expert`: value and gradients equal single-device dispatch, and no expert weight is
  gathered over `expert`."""
  mesh = make_mesh(MESHES[mesh_name])
  p = dict(_problem(), x=_problem()["x"][:3], ids=_problem()["ids"][:3], weights=_problem()["weights"][:3])

  def fn(q):
    return replicated_token_routed_experts(q["x"], q["ids"], q["weights"], q["w_gate_up"], q["w_down"], mesh=mesh,
                                           backend=backend, compute_dtype=jnp.float32)
  y, grads = _loss_and_grads(fn, p)
  y_ref, grads_ref = _loss_and_grads(_reference, p)
  _close(y, y_ref)
  for name, g, g_ref in zip(("x", "combine weights", "w_gate_up", "w_down"), grads, grads_ref):
    _close(g, g_ref)
  hlo = jax.jit(fn).lower(p).compile().as_text()
  assert not re.search(rf"= f32\[{E},\d+,\d+\]\S* all-gather", hlo)


def _direct_kept(ids, num_token_shards: int, num_expert_shards: int, capacity: Capacity):
  """Kept (token, k) assignments by a plain loop, and how many were dropped on the way and at the receiver.

  Token shards are consecutive blocks of rows, and each run of `num_expert_shards` of them exchanges tokens (the
  expert axis is the last token axis on every mesh tested). A source sends each destination shard the first
  `capacity.send` of its tokens (in token order) that route there, once per token; the destination takes the
  assignments of what it received slot by slot (the first token of every source, then the second, ...), in k
  order, until `capacity.receive` are taken."""
  S = num_expert_shards
  per_expert, per_shard = E // S, ids.shape[0] // num_token_shards
  kept = np.zeros(ids.shape, bool)
  on_the_way = here = 0
  for group in range(0, num_token_shards, S):
    sent = {}
    for source in range(group, group + S):
      for t in range(source * per_shard, (source + 1) * per_shard):
        for dest in set(ids[t] // per_expert):
          tokens = sent.setdefault((source, dest), [])
          if len(tokens) < capacity.send:
            tokens.append(t)
          else:
            on_the_way += int(np.sum(ids[t] // per_expert == dest))
    for dest in range(S):
      taken = 0
      for c in range(capacity.send):
        for source in range(group, group + S):
          tokens = sent.get((source, dest), [])
          for k in range(ids.shape[1]) if c < len(tokens) else ():
            if ids[tokens[c], k] // per_expert == dest:
              kept[tokens[c], k] = taken < capacity.receive
              here += int(taken >= capacity.receive)
              taken += 1
  return kept, on_the_way, here


@needs_eight
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops_match_direct_count(capacity_factor):
  """Skewed routing over-fills both buffers: the assignments dropped on the way (a source's rows past the send
  capacity) and at the receiver (past its receive capacity) are the ones a plain loop names, and each contributes
  nothing to its token's output."""
  mesh = make_mesh(MESHES["fsdp2_expert4"])
  p = _problem(seed=1, skew=2.0)
  token_shards, expert_shards = 8, 4
  capacity = expert_capacity(T // token_shards, K, E, expert_shards, capacity_factor, dropless=False)

  def fn(x, weights, w_gate_up, w_down):
    return expert_parallel_routed_experts(x, p["ids"], weights, w_gate_up, w_down, mesh=mesh, backend="sorted",
                                          compute_dtype=jnp.float32, capacity_factor=capacity_factor)
  y, dropped = jax.jit(fn)(p["x"], p["weights"], p["w_gate_up"], p["w_down"])
  kept, on_the_way, here = _direct_kept(np.asarray(p["ids"]), token_shards, expert_shards, capacity)
  assert int(dropped) == int((~kept).sum()) == on_the_way + here
  assert here > 0 and (on_the_way > 0 or capacity_factor == 1.0), (on_the_way, here)
  # A dropped assignment contributes nothing: the reference with its combine weight zeroed.
  _close(y, _reference(p, weights=p["weights"] * jnp.asarray(kept, jnp.float32)))


@needs_eight
def test_ample_capacity_drops_nothing():
  mesh = make_mesh(MESHES["data2_fsdp2_expert2"])
  p = _problem(seed=2)
  y, dropped = jax.jit(lambda p: expert_parallel_routed_experts(
      p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"], mesh=mesh, backend="sorted",
      compute_dtype=jnp.float32, capacity_factor=2.0))(p)
  assert int(dropped) == 0
  _close(y, _reference(p))


def test_expert_capacity():
  """8 tokens a shard, top-2 of 8 experts over 4 shards: a token routes to a given shard with chance
  1 - C(6,2)/C(8,2) = 13/28, so an even routing sends 8 * 13/28 = 3.71 rows to each shard and each shard runs
  8 * 2 = 16 assignments."""
  assert routed_share(8, 2, 4) == pytest.approx(13 / 28)
  assert routed_share(128, 8, 8) == pytest.approx(0.6674, abs=1e-4)  # DiffusionGemma over 8 expert shards
  assert routed_share(8, 2, 8) == pytest.approx(2 / 8)  # one expert a shard: every assignment is its own pair
  assert expert_capacity(8, 2, 8, 4, 1.0, dropless=False) == Capacity(4, 16)
  assert expert_capacity(8, 2, 8, 4, 1.25, dropless=False) == Capacity(5, 20)
  assert expert_capacity(8, 2, 8, 4, 100.0, dropless=False) == Capacity(8, 64)  # never above the worst case
  assert expert_capacity(8, 2, 8, 4, 0.01, dropless=False) == Capacity(1, 1)
  assert expert_capacity(8, 2, 8, 4, 0.5, dropless=True) == Capacity(8, 64)
  assert expert_capacity(8, 8, 128, 8, 1.0, dropless=True) == Capacity(8, 8 * 8 * 8)
  with pytest.raises(ConfigError, match="capacity_factor"):
    expert_capacity(8, 2, 8, 4, 0.0, dropless=False)


def test_plan_pairs_sends_a_token_once_per_destination():
  ids = jnp.asarray([[3, 0], [1, 2], [0, 3], [1, 0]], jnp.int32)  # 2 experts per shard, 2 shards
  plan = plan_pairs(ids, experts_per_shard=2, num_shards=2)
  assert plan.dest_TK.tolist() == [[1, 0], [0, 1], [0, 1], [0, 0]]
  assert plan.first_TK.tolist() == [[True, True], [True, True], [True, True], [True, False]]
  assert plan.rank_TK.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
  assert plan.counts_S.tolist() == [4, 3]


def _ragged_all_to_all_by_padding(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                  axis_name):
  """`jax.lax.ragged_all_to_all` (its documented semantics) from fixed-size all_to_alls, for XLA:CPU: every
  destination's slice padded to the operand's length, sent with where it goes on the receiver."""
  del recv_sizes  # what the senders' send_sizes say
  N = operand.shape[0]
  i = jnp.arange(N)
  valid_SN = i[None, :] < send_sizes[:, None]
  blocks = operand[jnp.clip(input_offsets[:, None] + i[None, :], 0, N - 1)]
  blocks = jnp.where(valid_SN.reshape(valid_SN.shape + (1,) * (operand.ndim - 1)), blocks, 0)
  exchange = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
  blocks, offsets_S, sizes_S = exchange(blocks), exchange(output_offsets), exchange(send_sizes)
  target = jnp.where(i[None, :] < sizes_S[:, None], offsets_S[:, None] + i[None, :], output.shape[0])
  return output.at[target].set(blocks, mode="drop")


@needs_eight
@pytest.mark.parametrize("mesh_name,backend", [("expert8", "dense"), ("data2_fsdp2_expert2", "sorted")])
def test_ragged_path_matches_single_device_with_an_emulated_collective(mesh_name, backend, monkeypatch):
  """The ragged path's offsets and sizes (what XLA:CPU cannot run) with an all_to_all emulation of the collective:
  value and gradients equal single-device dispatch, and nothing is dropped."""
  monkeypatch.setattr(expert, "_ragged_all_to_all", _ragged_all_to_all_by_padding)
  mesh = make_mesh(MESHES[mesh_name])
  p = _problem(seed=4, skew=1.0)
  y, grads = _loss_and_grads(_ep(mesh, backend, collective="ragged_all_to_all"), p)
  y_ref, grads_ref = _loss_and_grads(_reference, p)
  _close(y, y_ref)
  for g, g_ref in zip(grads, grads_ref):
    _close(g, g_ref)
  _, dropped = jax.jit(lambda p: expert_parallel_routed_experts(
      p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"], mesh=mesh, backend=backend,
      compute_dtype=jnp.float32, collective="ragged_all_to_all"))(p)
  assert int(dropped) == 0


@needs_eight
def test_bad_inputs_fail_before_compiling():
  p = _problem()
  with pytest.raises(ConfigError, match="num_experts=6 is not divisible by the expert mesh axis"):
    expert_parallel_routed_experts(p["x"], p["ids"] % 6, p["weights"], p["w_gate_up"][:6], p["w_down"][:6],
                                   mesh=make_mesh((1, 1, 4, 2)), backend="dense", compute_dtype=jnp.float32)
  with pytest.raises(ConfigError, match="60 tokens do not split over the 8 token shards"):
    expert_parallel_routed_experts(p["x"][:60], p["ids"][:60], p["weights"][:60], p["w_gate_up"], p["w_down"],
                                   mesh=make_mesh(MESHES["expert8"]), backend="dense", compute_dtype=jnp.float32)
  with pytest.raises(ConfigError, match="XLA:CPU has none"):
    expert_parallel_routed_experts(p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"],
                                   mesh=make_mesh(MESHES["expert8"]), backend="dense", compute_dtype=jnp.float32,
                                   collective="ragged_all_to_all")


# ---- the whole train step on each mesh ------------------------------------------------------------------------

TRAIN_MESHES = {"data8": (8, 1, 1, 1), "fsdp2_expert4": (1, 2, 4, 1), "data2_fsdp2_expert2": (2, 2, 2, 1),
                "expert8": (1, 1, 8, 1)}
TRAIN_STEPS = 3
LEARNING_RATE = 0.005  # small enough that float noise is not amplified into different top-k choices in 3 steps


def _sgd_keeping_gradients(learning_rate: float):
  """Plain SGD whose optimizer state is the last gradient, so the test reads exact gradients off the state."""
  import optax
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(lambda g: -learning_rate * g, grads), grads))


def _train_setup():
  from conftest import TINY_MODEL
  from diffgemma_jax.config import base_config
  from diffgemma_jax.model.config import ModelConfig
  c = base_config()
  c.model.update(TINY_MODEL)
  # One layer keeps the compile per mesh short; num_experts=8 splits over every expert axis tested.
  c.model.update(num_layers=1, layer_pattern=("global",), num_experts=8, dispatch="sorted", dropless=True)
  c.train.update(batch_size=8, seq_len=16)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(5, c.model.vocab_size, (8, 16)).astype(np.int32),
           "segment_ids": np.repeat(np.array([[1] * 10 + [2] * 6]), 8, 0).astype(np.int32),
           "positions": np.repeat(np.array([list(range(10)) + list(range(6))]), 8, 0).astype(np.int32)}
  return c, ModelConfig.from_config_dict(c.model), batch


def _compiled_step(shape, **model_overrides):
  """The masked-diffusion step of `_train_setup`'s config with `model_overrides` on the mesh `shape` (its first
  devices), trained by SGD that keeps each gradient."""
  import optax

  from diffgemma_jax.train import compile_train_step
  c, _, _ = _train_setup()
  c.model.update(model_overrides)
  mesh = make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
  optimizer = (_sgd_keeping_gradients(LEARNING_RATE), optax.constant_schedule(LEARNING_RATE))
  return compile_train_step(c, mask_id=4, mesh=mesh, optimizer=optimizer)


@functools.lru_cache(maxsize=None)
def _initial_state():
  """The initial train state on the host, initialised once and placed onto every mesh (one init compile)."""
  return jax.device_get(_compiled_step((1, 1, 1, 1)).init_state())


def _train_three_steps(shape, **model_overrides):
  """Losses, gradients, parameters and dropped assignments of three SGD steps from the same initialisation, and
  whether the step's lowered program exchanges tokens with all_to_all (the expert-parallel path)."""
  compiled = _compiled_step(shape, **model_overrides)
  _, _, batch = _train_setup()
  mesh = compiled.mesh
  state = jax.device_put(_initial_state(), compiled.state_shardings)
  lowered = compiled.step.lower(state, batch, jax.random.key(0))
  all_to_all = "all_to_all" in lowered.as_text()
  step = lowered.compile()
  losses, grads, dropped = [], [], []
  for _ in range(TRAIN_STEPS):
    state, metrics = step(state, batch, jax.random.key(0))
    grads.append([np.asarray(x) for x in jax.tree.leaves(state.opt_state)])
    losses.append(float(metrics["loss"]))
    dropped.append(float(metrics["dropped_tokens"]))
  params = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  return dict(losses=losses, grads=grads, params=params, dropped=dropped, state=state, mesh=mesh,
              all_to_all=all_to_all)


@pytest.fixture(scope="module")
def single_device_run():
  return _train_three_steps((1, 1, 1, 1))


def _assert_same_gradients(run, ref):
  """Gradients: 1e-5 of the step's largest gradient entry. A sharded sum adds in another order, and a few entries
  (the per-layer scalar: one number summed over every activation) cancel enough to lose digits relative to
  themselves, so a per-entry relative bound would test float32 summation order rather than the sharding."""
  for step_grads, ref_grads in zip(run["grads"], ref["grads"]):
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for g, g_ref in zip(step_grads, ref_grads):
      np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * scale)


@needs_eight
@pytest.mark.parametrize("mesh_name", list(TRAIN_MESHES))
def test_three_train_steps_match_single_device(mesh_name, single_device_run):
  """Exact gradients on each mesh; the MoE takes the expert-parallel path (all_to_all in the lowered step)
  exactly where the expert axis is above 1."""
  run = _train_three_steps(TRAIN_MESHES[mesh_name])
  ref = single_device_run
  assert run["all_to_all"] == (TRAIN_MESHES[mesh_name][2] > 1) and not ref["all_to_all"]
  np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5)
  assert run["dropped"] == [0.0] * TRAIN_STEPS
  _assert_same_gradients(run, ref)
  for p, p_ref in zip(run["params"], ref["params"]):
    np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)


@needs_eight
def test_capacity_limited_train_step_drops_and_reports(single_device_run, monkeypatch):
  """Expert parallelism with a capacity of one row per (token shard, expert shard) and one assignment received per
  shard: each step drops what a plain loop over the router's choices in that step says (`_direct_kept`), and reports it; the router's
  choices are read off the compiled step by a host callback."""
  from diffgemma_jax.model import moe
  routed = []

  def route(*args, **kwargs):
    routing = moe_route(*args, **kwargs)
    jax.debug.callback(lambda ids: routed.append(np.asarray(ids)), routing.expert_ids_TK)
    return routing

  moe_route = moe.route
  monkeypatch.setattr(moe, "route", route)
  shape = TRAIN_MESHES["fsdp2_expert4"]
  run = _train_three_steps(shape, dropless=False, capacity_factor=0.01)
  assert run["all_to_all"] and len(routed) == TRAIN_STEPS
  token_shards = int(np.prod(shape[:3]))
  c, cfg, _ = _train_setup()
  capacity = expert_capacity(c.train.batch_size * c.train.seq_len // token_shards, cfg.top_k, cfg.num_experts,
                             shape[2], 0.01, dropless=False)
  assert capacity == Capacity(1, 1)
  expected = [float((~_direct_kept(ids, token_shards, shape[2], capacity)[0]).sum()) for ids in routed]
  assert run["dropped"] == expected and min(expected) > 0, (run["dropped"], expected)
  assert abs(run["losses"][0] - single_device_run["losses"][0]) > 1e-3  # the drops change the result
  assert all(np.all(np.isfinite(g)) for step_grads in run["grads"] for g in step_grads)


@needs_eight
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_bfloat16_pair_rows_come_back_as_accurate_as_one_device(mesh_name):
  """In bfloat16 each shard sends back one row per pair, a float32 sum of its experts' weighted outputs rounded to
  bfloat16 once: the result is about as far from the float32 reference as single-device bfloat16 dispatch, whose
  outputs are combined in float32. Top-8 of 16 experts, so a row sums up to 8 outputs (2 expert shards: 8 experts
  a shard); weighting and summing them in bfloat16 instead fails this."""
  mesh = make_mesh(MESHES[mesh_name])
  p = _problem(seed=7, E=16, K=8)
  reference = _reference(p)
  y, _ = jax.jit(lambda p: expert_parallel_routed_experts(
      p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"], mesh=mesh, backend="sorted",
      compute_dtype=jnp.bfloat16, dropless=True))(p)
  local = dispatch.routed_experts(p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"], backend="sorted",
                                  compute_dtype=jnp.bfloat16)
  error, local_error = (float(jnp.max(jnp.abs(a - reference))) for a in (y, local))
  # measured: 0.94-1.16x on the three meshes; 1.6-1.7x with the outputs weighted and summed in bfloat16
  assert 0 < error <= 1.35 * local_error, (error, local_error)


@needs_eight
def test_evaluation_is_dropless_where_training_drops():
  """The held-out bound the trainer and diffgemma-eval compute (`make_bound_fn` on `evaluation_model`) at a capacity
  that drops most assignments in training (model.capacity_factor=0.01): on an 8-way expert mesh it equals one
  device's row by row, where the training model's dispatch on the same mesh gives another bound."""
  from diffgemma_jax.model.config import ModelConfig
  from diffgemma_jax.model.transformer import abstract_model
  from diffgemma_jax.objectives import make_objective
  from diffgemma_jax.parallel.placement import placement_for
  from diffgemma_jax.train.bound import make_bound_fn
  from diffgemma_jax.train.state import evaluation_model, split_model
  c, _, batch = _train_setup()
  c.model.update(dropless=False, capacity_factor=0.01)
  cfg = ModelConfig.from_config_dict(c.model)
  params = jax.device_get(_initial_state().params)
  objective = make_objective(c.objective, mask_id=4)
  rows = jnp.arange(8, dtype=jnp.uint32)

  def bound(graphdef, mesh):
    nelbo, _, tokens = make_bound_fn(graphdef, objective, num_t_samples=2, mesh=mesh)(
        params, batch, jax.random.key(5), rows)
    return np.asarray(nelbo), np.asarray(tokens)

  one = make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
  experts = make_mesh(TRAIN_MESHES["expert8"])
  nelbo_one, tokens_one = bound(evaluation_model(cfg, placement_for(one))[0], one)
  nelbo, tokens = bound(evaluation_model(cfg, placement_for(experts))[0], experts)
  np.testing.assert_array_equal(tokens, tokens_one)
  np.testing.assert_allclose(nelbo, nelbo_one, rtol=1e-5)
  dropping, _ = bound(split_model(abstract_model(cfg, placement_for(experts)))[0], experts)
  assert np.max(np.abs(dropping - nelbo_one) / np.abs(nelbo_one)) > 1e-3


@needs_eight
def test_checkpoint_restores_onto_every_mesh(single_device_run, tmp_path):
  """Saved from 8-way FSDP, restored on one device and on each training mesh: identical arrays, new shardings."""
  from diffgemma_jax.train import Checkpointer, abstract_train_state
  c, cfg, _ = _train_setup()
  tx = _sgd_keeping_gradients(LEARNING_RATE)
  _, abstract, fsdp_shardings = abstract_train_state(cfg, tx, make_mesh((1, 8, 1, 1)))
  saved = jax.device_put(jax.device_get(single_device_run["state"]), fsdp_shardings)
  embedding = saved.params["embedder"]["embedding"].get_value()
  assert embedding.sharding.spec[1] == "fsdp" and not embedding.sharding.is_fully_replicated  # saved from shards
  ckpt = Checkpointer(str(tmp_path / "ckpt"), c)
  ckpt.save(saved, {"position": 7})
  ckpt.wait()
  expected = [np.asarray(x) for x in jax.tree.leaves(saved)]
  for shape in [(1, 1, 1, 1)] + list(TRAIN_MESHES.values()):
    mesh = make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    _, _, shardings = abstract_train_state(cfg, tx, mesh)
    restored, iterator_state = ckpt.restore(TRAIN_STEPS, abstract, shardings)
    assert iterator_state == {"position": 7}
    for got, want, sharding in zip(jax.tree.leaves(restored), expected, jax.tree.leaves(shardings)):
      assert got.sharding == sharding, (shape, got.sharding, sharding)
      np.testing.assert_array_equal(np.asarray(got), want)
  ckpt.close()


@pytest.mark.skipif(jax.default_backend() != "gpu" or 8 % jax.device_count() != 0,
                    reason="ragged_all_to_all needs a GPU (XLA:CPU has none)")
def test_ragged_all_to_all_matches_dense_on_gpu():
  mesh = make_mesh((1, 1, jax.device_count(), 1))
  p = _problem()
  with jax.default_matmul_precision("highest"):  # no TF32 on either side
    y, grads = _loss_and_grads(_ep(mesh, "ragged", collective="ragged_all_to_all"), p)
    y_ref, grads_ref = _loss_and_grads(_reference, p)
  _close(y, y_ref)
  for g, g_ref in zip(grads, grads_ref):
    _close(g, g_ref)


@needs_eight
@pytest.mark.parametrize("backend", ["dense", "sorted"])
def test_bf16_runs_gather_expert_slices_in_bf16_with_the_same_numbers(backend, monkeypatch):
  """With bfloat16 compute the fsdp slices of the expert weights are cast before they are gathered (half the bytes
  of float32 parameters) and their gradient reduce-scattered in float32: the lowered step gathers bfloat16 expert
  weights and reduce-scatters float32 ones, and its output and every gradient equal the former gather-then-cast
  (the backends' own cast) exactly."""
  from diffgemma_jax.parallel import expert
  mesh = make_mesh(MESHES["fsdp2_expert4"])
  p = _problem(seed=3)

  def fn(p):
    y, _ = expert_parallel_routed_experts(p["x"], p["ids"], p["weights"], p["w_gate_up"], p["w_down"], mesh=mesh,
                                          backend=backend, compute_dtype=jnp.bfloat16, dropless=True)
    return y

  def collectives():
    def loss(w_gate_up, w_down):
      return jnp.sum(jnp.sin(fn(dict(p, w_gate_up=w_gate_up, w_down=w_down))))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p["w_gate_up"], p["w_down"]).as_text()
    weights = rf"{E}x{D}x{2 * F}|{E // 4}x{D}x{2 * F}|{E}x{F}x{D}|{E // 4}x{F}x{D}"  # whole or expert-split shapes
    gathers = re.findall(rf"all_gather.*-> tensor<(?:{weights})x(\w+)>", text)
    # a reduce_scatter's types follow its reduction region: `}) : (tensor<...>) -> tensor<AxBxCxTYPE>`
    scatters = re.findall(r"reduce_scatter\"[^\n]*\n(?:[^\n]*\n)*?\s*\}\) : \([^)]*\) -> tensor<\d+x\d+x\d+x(\w+)>",
                          text)
    assert len(gathers) == 2 and len(scatters) == 2, (gathers, scatters)
    return sorted(set(gathers)), sorted(set(scatters))

  ours = _loss_and_grads(fn, p)
  assert collectives() == (["bf16"], ["f32"])
  monkeypatch.setattr(expert, "_gather_cast", lambda w, axis, dtype: jax.lax.all_gather(
      w, expert.FSDP_AXIS, axis=axis, tiled=True))  # the former path: gather the float32 slices, the backend casts
  former = _loss_and_grads(fn, p)
  assert collectives() == (["f32"], ["f32"])
  for name, a, b in zip(("y", "x", "combine weights", "w_gate_up", "w_down"), (ours[0], *ours[1]),
                        (former[0], *former[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)

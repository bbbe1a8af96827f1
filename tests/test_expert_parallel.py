"""Expert-parallel dispatch (all_to_all in shard_map) against single-device dense dispatch on 8 fake CPU devices.

The device count is fixed when JAX starts, so in a normal (one-device) session `test_on_eight_fake_devices` re-runs
this file in a subprocess with `--xla_force_host_platform_device_count=8`, where the other tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.model import dispatch
from diffgemma_jax.model.config import ConfigError
from diffgemma_jax.parallel import make_mesh
from diffgemma_jax.parallel.expert import (expert_capacity, expert_parallel_routed_experts, plan_sends)

EIGHT = jax.device_count() >= 8
needs_eight = pytest.mark.skipif(not EIGHT, reason="runs inside test_on_eight_fake_devices")

T, D, F, E, K = 64, 16, 8, 8, 2
MESHES = {"fsdp2_expert4": (1, 2, 4, 1), "expert8": (1, 1, 8, 1), "data2_fsdp2_expert2": (2, 2, 2, 1)}


@pytest.mark.skipif(EIGHT, reason="already on 8 devices")
def test_on_eight_fake_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                        capture_output=True, text=True, timeout=600, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "skipped" in proc.stdout  # only the re-run itself skips there


def _problem(seed: int = 0, skew: float = 0.0):
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


def _direct_kept(ids, num_token_shards: int, num_expert_shards: int, capacity: int):
  """Kept (token, k) assignments by a plain loop: in each token shard, in token-major order, the first `capacity`
  assignments to each destination shard survive."""
  kept = np.zeros(ids.shape, bool)
  per_shard = ids.shape[0] // num_token_shards
  for shard in range(num_token_shards):
    used = [0] * num_expert_shards
    for t in range(shard * per_shard, (shard + 1) * per_shard):
      for k in range(ids.shape[1]):
        dest = ids[t, k] // (E // num_expert_shards)
        kept[t, k] = used[dest] < capacity
        used[dest] += 1
  return kept


@needs_eight
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops_match_direct_count(capacity_factor):
  mesh = make_mesh(MESHES["fsdp2_expert4"])
  p = _problem(seed=1, skew=2.0)
  token_shards, expert_shards = 8, 4
  capacity = expert_capacity(T // token_shards, K, expert_shards, capacity_factor, dropless=False)
  assert capacity == int(np.ceil(capacity_factor * (T // token_shards) * K / expert_shards))

  def fn(x, weights, w_gate_up, w_down):
    return expert_parallel_routed_experts(x, p["ids"], weights, w_gate_up, w_down, mesh=mesh, backend="sorted",
                                          compute_dtype=jnp.float32, capacity_factor=capacity_factor)
  y, dropped = jax.jit(fn)(p["x"], p["weights"], p["w_gate_up"], p["w_down"])
  kept = _direct_kept(np.asarray(p["ids"]), token_shards, expert_shards, capacity)
  assert int(dropped) == int((~kept).sum()) > 0
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
  assert expert_capacity(8, 2, 4, 1.0, dropless=False) == 4
  assert expert_capacity(8, 2, 4, 1.25, dropless=False) == 5
  assert expert_capacity(8, 2, 4, 100.0, dropless=False) == 16  # never above the worst case
  assert expert_capacity(8, 2, 4, 0.01, dropless=False) == 1
  assert expert_capacity(8, 2, 4, 0.5, dropless=True) == 16
  with pytest.raises(ConfigError, match="capacity_factor"):
    expert_capacity(8, 2, 4, 0.0, dropless=False)


def test_plan_sends_orders_by_destination_then_token():
  ids = jnp.asarray([[3, 0], [1, 2], [0, 3]], jnp.int32)  # 2 experts per shard, 2 shards
  plan = plan_sends(ids, experts_per_shard=2, num_shards=2)
  assert plan.counts_S.tolist() == [3, 3]
  assert plan.order_A.tolist() == [1, 2, 4, 0, 3, 5]
  assert plan.slot_A.tolist() == [0, 0, 1, 1, 2, 2]


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

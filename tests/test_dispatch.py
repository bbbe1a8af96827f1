"""Every MoE dispatch backend against the dense reference: outputs and gradients, jitted, awkward routings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.model import dispatch

T, D, E, K, F = 13, 16, 6, 2, 8  # T*K = 26: not a multiple of any row tile


def _routing(kind: str, key):
  """Distinct top-k expert ids per token and float32 combine weights."""
  if kind == "random":
    ids = jax.vmap(lambda k: jax.random.permutation(k, E)[:K])(jax.random.split(key, T))
  elif kind == "some_idle":  # experts 1, 3 and 4 never chosen
    ids = jnp.stack([jnp.where(jnp.arange(T) % 2 == 0, 0, 5), jnp.where(jnp.arange(T) % 3 == 0, 2, 0)], 1)
    ids = jnp.where(ids[:, :1] == ids[:, 1:], jnp.stack([ids[:, 0], jnp.full((T,), 2)], 1), ids)
  elif kind == "one_expert":  # expert 4 in every row (the other slot varies)
    ids = jnp.stack([jnp.full((T,), 4), jnp.arange(T) % 4], 1)
  else:
    raise ValueError(kind)
  ids = ids.astype(jnp.int32)
  assert bool(jnp.all(ids[:, 0] != ids[:, 1]))
  combine = jax.random.uniform(jax.random.fold_in(key, 1), (T, K), minval=0.1, maxval=1.0)
  return ids, combine


def _params(key):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  x = jax.random.normal(k1, (T, D))
  w_gate_up = jax.random.normal(k2, (E, D, 2 * F)) * D ** -0.5
  w_down = jax.random.normal(k3, (E, F, D)) * F ** -0.5
  probe = jax.random.normal(k4, (T, D))
  return x, w_gate_up, w_down, probe


@functools.partial(jax.jit, static_argnames="backend")
def _value_and_grads(x, ids, combine, w_gate_up, w_down, probe, backend):
  def loss(x, combine, w_gate_up, w_down):
    y = dispatch.routed_experts(x, ids, combine, w_gate_up, w_down, backend=backend)
    return jnp.sum(probe * y), y
  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, combine, w_gate_up, w_down)
  return y, grads


def _assert_close(actual, expected):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-30
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * scale)


def _check_backend(backend, routing):
  key = jax.random.key(["random", "some_idle", "one_expert"].index(routing))
  x, w_gate_up, w_down, probe = _params(key)
  ids, combine = _routing(routing, jax.random.fold_in(key, 7))
  expected = _value_and_grads(x, ids, combine, w_gate_up, w_down, probe, "dense")
  actual = _value_and_grads(x, ids, combine, w_gate_up, w_down, probe, backend)
  _assert_close(actual, expected)
  return actual


@pytest.mark.parametrize("routing", ["random", "some_idle", "one_expert"])
@pytest.mark.parametrize("backend", ["ragged", "sorted"])
def test_backend_matches_dense(backend, routing):
  _check_backend(backend, routing)


@pytest.mark.parametrize("routing", ["random", "some_idle"])
def test_pallas_matches_dense(routing):
  _check_backend("pallas", routing)


def test_idle_experts_get_zero_weight_gradients():
  _, (_, _, dw_gate_up, dw_down) = _check_backend("sorted", "some_idle")
  for idle in (1, 3, 4):
    assert not np.any(np.asarray(dw_gate_up[idle])) and not np.any(np.asarray(dw_down[idle]))


@pytest.mark.parametrize("tile", [8, 32])
def test_sorted_any_tile_matches_dense(tile, monkeypatch):
  monkeypatch.setattr(dispatch, "choose_tile", lambda num_rows, num_experts: tile)
  key = jax.random.key(3)
  x, w_gate_up, w_down, probe = _params(key)
  ids, combine = _routing("random", key)
  expected = _value_and_grads(x, ids, combine, w_gate_up, w_down, probe, "dense")
  # A fresh jit, not the shared helper: its cache would hide the patched tile.
  def loss(x, combine, w_gate_up, w_down):
    y = dispatch.routed_experts(x, ids, combine, w_gate_up, w_down, backend="sorted")
    return jnp.sum(probe * y), y
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  (_, y), grads = grad_fn(x, combine, w_gate_up, w_down)
  _assert_close((y, grads), expected)


@pytest.mark.parametrize("backend", ["ragged", "sorted"])
def test_grouped_geglu_on_sorted_rows(backend):
  """The local compute EP reuses: rows already grouped by expert, including rows past sum(group_sizes)."""
  key = jax.random.key(5)
  _, w_gate_up, w_down, _ = _params(key)
  group_sizes = jnp.array([3, 0, 7, 1, 0, 4], jnp.int32)  # 15 rows used out of 18
  x_sorted = jax.random.normal(key, (18, D))
  expert_of_row = np.repeat(np.arange(E), np.asarray(group_sizes))
  expected = np.zeros((18, D), np.float32)
  for row, e in enumerate(expert_of_row):
    gate_up = x_sorted[row] @ w_gate_up[e]
    expected[row] = (jax.nn.gelu(gate_up[:F], approximate=True) * gate_up[F:]) @ w_down[e]
  actual = jax.jit(functools.partial(dispatch.grouped_geglu, backend=backend))(x_sorted, group_sizes, w_gate_up,
                                                                               w_down)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_close_to_float32():
  key = jax.random.key(9)
  x, w_gate_up, w_down, _ = _params(key)
  ids, combine = _routing("random", key)
  y32 = dispatch.routed_experts(x, ids, combine, w_gate_up, w_down, backend="dense")
  for backend in ("ragged", "sorted"):
    run = jax.jit(functools.partial(dispatch.routed_experts, backend=backend, compute_dtype=jnp.bfloat16))
    y16 = run(x.astype(jnp.bfloat16), ids, combine, w_gate_up, w_down)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.1, atol=0.05)


def test_resolve_backend(monkeypatch):
  if jax.default_backend() == "cpu":
    assert dispatch.resolve_backend("auto") == "sorted"
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "tpu")
  assert dispatch.resolve_backend("auto") == "ragged"  # XLA's native grouped matmul on TPU
  monkeypatch.undo()
  for name in ("dense", "ragged", "sorted", "pallas"):
    assert dispatch.resolve_backend(name) == name
  valid = r"'dense', 'ragged', 'sorted', 'pallas', 'pallas_mosaic', 'auto'"
  with pytest.raises(ValueError, match=r"model\.dispatch.*" + valid):
    dispatch.resolve_backend("magic")
  with pytest.raises(ValueError, match=r"model\.dispatch"):
    dispatch.routed_experts(jnp.zeros((2, D)), jnp.zeros((2, K), jnp.int32), jnp.ones((2, K)),
                            jnp.zeros((E, D, 2 * F)), jnp.zeros((E, F, D)), backend="magic")


def test_tile_layout_bound_holds_when_one_expert_takes_all():
  rows, tile = 26, 8
  layout = dispatch.tile_layout(jnp.array([0, 0, 26, 0, 0, 0], jnp.int32), rows, tile)
  assert int(layout.num_used_tiles) == 4 <= layout.expert_of_tile_N.shape[0]
  assert sorted(np.asarray(layout.slot_of_row_M).tolist()) == list(range(26))

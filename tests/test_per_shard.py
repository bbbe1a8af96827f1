"""Kernels on a mesh (`parallel/per_shard.py`) against the same call on one device, on 8 fake CPU devices.

- Attention per shard (rows over the batch axes, heads over `tensor`, and with a `context` axis the queries'
  sequence over it, keys and values gathered): values and q/k/v gradients equal the single-device call for the
  Pallas kernel and, under context parallelism, every implementation; each Pallas call sees its shard's rows.
- Grouped MoE dispatch per token shard (no expert axis): values and gradients equal the dense reference, and the
  sort of the routed rows is the shard's own, not the batch's.
- A whole train step on a `data x context` mesh equals the single-device step (masked and block objectives).
- Load-balanced context parallelism (`parallel/balance.py`): attention over a row dealt out in the balanced order,
  canvases straddling the chunks, equals one device; the block objective's train step (balanced) and the AR's
  held-out bounds (balanced and not) equal one device, and the balanced ones do reorder their rows. For every
  registered objective the start-up check sees the rows the model sees and refuses exactly the unbalanced ones.

The device count is fixed when JAX starts, so in a normal (one-device) session `test_on_eight_fake_devices` re-runs
this file in a subprocess with 8 devices, where the other tests run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffgemma_jax.model import attention_impl, dispatch
from diffgemma_jax.objectives.block import block_ids
from diffgemma_jax.parallel import make_mesh
from diffgemma_jax.parallel import balance, collectives, per_shard
from pallas_kernels import MaskSpec

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TINY_MODEL, rerun_on_eight_devices  # noqa: E402  pylint: disable=wrong-import-position
from test_attention_masks import packed_rows  # noqa: E402  pylint: disable=wrong-import-position
from test_flash_attention import _inputs, _value_and_grads  # noqa: E402  pylint: disable=wrong-import-position

EIGHT = jax.device_count() >= 8
needs_eight = pytest.mark.skipif(not EIGHT, reason="runs inside test_on_eight_fake_devices")
RTOL = 1e-5


@pytest.mark.skipif(EIGHT, reason="already on 8 devices")
def test_on_eight_fake_devices(tmp_path):
  rerun_on_eight_devices(__file__, str(tmp_path / "eight.xml"), {"test_on_eight_fake_devices"}, min_ran=21)


def _close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = max(1.0, float(np.abs(expected).max()))
  error = float(np.abs(actual - expected).max())
  assert error <= RTOL * scale, f"{what}: max abs error {error} (scale {scale})"


def _packed_causal():
  segments, positions = packed_rows([[20, 12], [32], [5, 9, 18], [30]], 32)
  return MaskSpec.packed("causal", segments, positions)


def _canvas_clean_window():
  """The block objectives' [canvas ; clean] rows (64 tokens), blocks of 4, sliding window 6."""
  segments, positions = packed_rows([[20, 12], [32], [16, 16], [28]], 32)
  blocks = block_ids({"tokens": segments}, 4)
  return MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks).with_window(6)


def _canvas_clean_straddling():
  """[canvas ; clean] rows whose canvases (blocks of 4 shifted by 2, as an SFT response starting mid-row) straddle
  every context shard's and balanced chunk's edge: a shard sees part of a canvas, whose window start lies in
  another shard."""
  segments, positions = packed_rows([[18, 14], [32], [10, 22], [28]], 32)
  blocks = jnp.broadcast_to((jnp.arange(32) + 2) // 4, (4, 32))
  return MaskSpec.canvas_clean(segments, positions, blocks, segments, positions, blocks).with_window(6)


MASKS = {"packed_causal": _packed_causal, "canvas_clean_window": _canvas_clean_window,
         "canvas_clean_straddling": _canvas_clean_straddling}
# name -> (mesh shape, axes): rows x heads without context; rows x context (8 queries per context shard)
MESHES = {"data2_fsdp2_tensor2": ((2, 2, 2), ("data", "fsdp", "tensor")),
          "data2_context4": ((2, 4), ("data", "context")),
          "context4_tensor2": ((4, 2), ("context", "tensor")),
          "data2_tensor4": ((2, 4), ("data", "tensor"))}  # 4 query heads, 2 KV heads: each KV head on 2 shards


def _mesh(name):
  shape, axes = MESHES[name]
  return make_mesh(shape, axes)


def _on_mesh(mesh, *arrays):
  """`arrays` placed on `mesh` split over rows (what the trainer's batches are); the shard_map gathers the rest."""
  rows = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return [jax.device_put(a, NamedSharding(mesh, P(rows or None))) for a in arrays]


# (implementation, mask, mesh): the kernel on rows x heads and under context parallelism; the XLA paths, which run
# per shard only under context parallelism, there.
ATTENTION_CASES = [("pallas", "packed_causal", "data2_fsdp2_tensor2"),
                   ("pallas", "canvas_clean_window", "data2_context4"),
                   ("chunked", "canvas_clean_window", "context4_tensor2"), ("xla", "packed_causal", "data2_context4"),
                   ("xla", "canvas_clean_straddling", "data2_context4"),
                   ("pallas", "canvas_clean_window", "data2_tensor4")]


@needs_eight
@pytest.mark.parametrize("impl,mask_name,mesh_name", ATTENTION_CASES)
def test_attention_per_shard_equals_one_device(impl, mask_name, mesh_name):
  mesh = _mesh(mesh_name)
  spec = MASKS[mask_name]()
  q, k, v, cotangent = _inputs(spec, 4, 2, 8, jnp.float32)
  # chunked: chunks of 4 queries (8 or 16 per shard); the spans' plan runs per shard
  chunked = lambda q, k, v, s: attention_impl.chunked_attention(q, k, v, s, chunk=4)  # noqa: E731
  local = {"pallas": lambda q, k, v, s: attention_impl.attend(q, k, v, s, "pallas"), "chunked": chunked,
           "xla": lambda q, k, v, s: attention_impl.attend(q, k, v, s, "xla")}[impl]
  expected, expected_grads = _value_and_grads(local, spec, q, k, v, cotangent)
  if impl == "chunked":  # the per-shard call goes through `attend`, whose chunks are CHUNK queries: force small ones
    original = attention_impl.CHUNK
    attention_impl.CHUNK = 4
  try:
    sharded = lambda q, k, v, s: per_shard.sharded_attend(q, k, v, s, impl, mesh)  # noqa: E731
    out, grads = _value_and_grads(sharded, spec, *_on_mesh(mesh, q, k, v, cotangent))
  finally:
    if impl == "chunked":
      attention_impl.CHUNK = original
  _close(out, expected, "output")
  for name, g, g0 in zip("qkv", grads, expected_grads):
    _close(g, g0, f"d{name}")


@needs_eight
@pytest.mark.parametrize("mask_name", ["packed_causal", "canvas_clean_straddling"])
def test_balanced_attention_equals_one_device(mask_name):
  """The row dealt out in the balanced order (`balance.reorder_inputs`: shard i holds chunks i and 2C-1-i, the
  canvases' window starts found in row order), attended per context shard, put back in row order: the values and
  gradients of one device."""
  mesh = _mesh("data2_context4")
  spec = MASKS[mask_name]()
  assert balance.balances(mesh, spec)
  q, k, v, cotangent = _inputs(spec, 4, 2, 8, jnp.float32)
  expected, expected_grads = _value_and_grads(lambda q, k, v, s: attention_impl.attend(q, k, v, s, "xla"),
                                              spec, q, k, v, cotangent)

  def balanced(q, k, v, s):
    (q, k, v), s = balance.reorder_inputs(mesh, (q, k, v), s)
    return balance.reorder(per_shard.sharded_attend(q, k, v, s, "xla", mesh), mesh, inverse=True)

  out, grads = _value_and_grads(balanced, spec, *_on_mesh(mesh, q, k, v, cotangent))
  _close(out, expected, "output")
  for name, g, g0 in zip("qkv", grads, expected_grads):
    _close(g, g0, f"d{name}")


def test_balanced_order():
  """Shard i of C holds the row's chunks i and 2C-1-i; `reorder` and its inverse move whole chunks."""
  np.testing.assert_array_equal(balance.balanced_chunks(4), [0, 7, 1, 6, 2, 5, 3, 4])
  np.testing.assert_array_equal(balance.balanced_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])


def _walk(jaxpr, inside=()):
  """(primitive name, enclosing shard_maps' mesh-axis names, operand shapes) of every equation, nested ones too."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name, inside, [tuple(getattr(x.aval, "shape", ())) for x in eqn.invars]
    here = inside + (eqn.primitive.name,) if eqn.primitive.name == "shard_map" else inside
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _walk(inner, here)


@needs_eight
@pytest.mark.parametrize("mesh_name", ["data2_fsdp2_tensor2", "data2_context4", "data2_tensor4"])
def test_each_pallas_call_sees_its_shard(mesh_name):
  """Under GSPMD a Pallas call is a custom call XLA cannot split: every device would run the whole batch. Here
  each runs inside the shard_map on its rows (and heads, and queries under context parallelism)."""
  mesh = _mesh(mesh_name)
  spec = _canvas_clean_window()
  q, k, v, _ = _inputs(spec, 4, 2, 8, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, k, v: per_shard.sharded_attend(q, k, v, spec, "pallas", mesh))(q, k, v)
  calls = [(inside, shapes) for name, inside, shapes in _walk(jaxpr.jaxpr) if name == "pallas_call"]
  assert calls and all(inside for inside, _ in calls), calls
  # The kernel's operands are those of the kernel called on one shard: its rows, heads and queries.
  rows, heads, queries = {"data2_context4": (2, 1, 4), "data2_fsdp2_tensor2": (4, 2, 1),
                           "data2_tensor4": (2, 4, 1)}[mesh_name]
  B, L = spec.q.segment_ids.shape
  b, n, kv = B // rows, 4 // heads, max(2 // heads, 1)  # 2 KV heads on 4 shards: one (repeated) each
  shard = jax.tree.map(lambda x: x[:b], spec)
  shard = dataclasses.replace(shard, q=jax.tree.map(lambda x: x[:, :L // queries], shard.q))
  one = jax.make_jaxpr(lambda q, k, v: attention_impl.attend(q, k, v, shard, "pallas"))(
      q[:b, :L // queries, :n], k[:b, :, :kv], v[:b, :, :kv])
  expected = [shapes for name, _, shapes in _walk(one.jaxpr) if name == "pallas_call"]
  assert [shapes for _, shapes in calls] == expected


@needs_eight
def test_each_mosaic_call_sees_its_shard():
  """model.attention_impl='pallas_mosaic' runs per shard as 'pallas' does (a Mosaic GPU kernel is a custom call
  XLA cannot split either): its three kernels' launches (forward, dQ, dK/dV) all sit inside the shard_map."""
  mesh = _mesh("data2_tensor4")
  spec = _canvas_clean_window()
  q, k, v, cotangent = _inputs(spec, 4, 2, 16, jnp.bfloat16)
  grads = lambda q, k, v: jax.vjp(  # noqa: E731
      lambda q, k, v: per_shard.sharded_attend(q, k, v, spec, "pallas_mosaic", mesh), q, k, v)[1](
          cotangent.astype(q.dtype))
  calls = [inside for name, inside, _ in _walk(jax.make_jaxpr(grads)(q, k, v).jaxpr) if name == "mpmd_map"]
  assert len(calls) == 3 and all(calls), calls


T, D, F, E, K = 64, 16, 8, 8, 2


def _moe_problem(seed=0):
  rng = np.random.default_rng(seed)
  ids = np.argsort(-rng.normal(size=(T, E)), axis=1)[:, :K].astype(np.int32)
  return (jnp.asarray(rng.normal(size=(T, D)), jnp.float32), jnp.asarray(ids),
          jnp.asarray(rng.uniform(0.2, 1.0, size=(T, K)), jnp.float32),
          jnp.asarray(rng.normal(size=(E, D, 2 * F)) / 4, jnp.float32),
          jnp.asarray(rng.normal(size=(E, F, D)) / 4, jnp.float32))


def _moe_loss_and_grads(fn, args):
  x, ids, weights, w_gate_up, w_down = args
  loss = lambda x, w, g, d: jnp.sum(jnp.sin(fn(x, ids, w, g, d)))  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, weights, w_gate_up, w_down)


@needs_eight
@pytest.mark.parametrize("backend", ["sorted", "ragged", "pallas"])
def test_grouped_dispatch_per_token_shard_equals_dense(backend):
  mesh = make_mesh((4, 2, 1, 1))  # data x fsdp: the experts' embed dimension split over fsdp
  args = _moe_problem()
  assert per_shard.dispatches_token_parallel(mesh, T, backend)
  reference = lambda x, ids, w, g, d: dispatch.routed_experts(  # noqa: E731
      x, ids, w, g, d, backend="dense", compute_dtype=jnp.float32)
  sharded = lambda x, ids, w, g, d: per_shard.token_parallel_routed_experts(  # noqa: E731
      x, ids, w, g, d, mesh=mesh, backend=backend, compute_dtype=jnp.float32)
  expected, expected_grads = _moe_loss_and_grads(reference, args)
  fsdp = NamedSharding(mesh, P(None, "fsdp"))
  placed = (*_on_mesh(mesh, *args[:3]), jax.device_put(args[3], fsdp),
            jax.device_put(args[4], NamedSharding(mesh, P(None, None, "fsdp"))))
  value, grads = _moe_loss_and_grads(sharded, placed)
  _close(value, expected, "loss")
  for name, g, g0 in zip(["x", "weights", "w_gate_up", "w_down"], grads, expected_grads):
    _close(g, g0, f"d{name}")
  # Each shard sorts its own T*K/8 assignments, never the batch's T*K.
  jaxpr = jax.make_jaxpr(sharded)(*args)
  sorts = [(inside, shapes) for name, inside, shapes in _walk(jaxpr.jaxpr) if name == "sort"]
  assert sorts and all(inside and shapes[0] == (T * K // 8,) for inside, shapes in sorts), sorts


STEP_MESHES = {"masked": ((2, 4), ("data", "context")), "block": ((2, 2, 2), ("fsdp", "tensor", "context")),
               "ar": ((2, 4), ("data", "context"))}


def _step_config(objective: str, attention: str, load_balance: bool):
  from diffgemma_jax.config import base_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.model.update(TINY_MODEL)
  config.model.attention_impl = attention
  config.objective.name = objective
  if objective == "block":
    config.objective.block_size = 4
  config.train.update(batch_size=4, seq_len=32, warmup_steps=0)
  config.mesh.context_load_balance = load_balance
  return config


class _CountReorders:
  """Counts the calls of `balance.reorder` (each traced call: a reordered row or a row restored)."""

  def __enter__(self):
    self.calls, self._saved = 0, balance.reorder

    def counted(*args, **kwargs):
      self.calls += 1
      return self._saved(*args, **kwargs)

    balance.reorder = counted
    return self

  def __exit__(self, *exc):
    balance.reorder = self._saved


def _meshes(objective):
  return [make_mesh(shape, axes, devices=jax.devices()[:int(np.prod(shape))])
          for shape, axes in [((1,), ("data",)), STEP_MESHES[objective]]]


def _step_results(objective: str, attention: str):
  """[(loss, gradient leaves, reorder calls)] of one train step on one device and on the objective's mesh of
  STEP_MESHES (the optimizer keeps the gradient)."""
  import optax  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train import compile_train_step, synthetic_batch  # pylint: disable=import-outside-toplevel
  config = _step_config(objective, attention, True)
  batch = synthetic_batch(4, 32, TINY_MODEL["vocab_size"], seed=0)
  record = optax.GradientTransformation(init=lambda params: jax.tree.map(jnp.zeros_like, params),
                                        update=lambda grads, state, params=None: (grads, grads))
  out = []
  for mesh in _meshes(objective):
    compiled = compile_train_step(config, mask_id=4, mesh=mesh, optimizer=(record, optax.constant_schedule(0.0)))
    with _CountReorders() as reorders:
      state, metrics = compiled.step(compiled.init_state(), compiled.place(batch), jax.random.key(0))
    out.append((float(metrics["loss"]), [np.asarray(g) for g in jax.tree.leaves(state.opt_state)], reorders.calls))
  return out


@needs_eight
@pytest.mark.parametrize("objective,attention", [("masked", "xla"), ("block", "chunked")])
def test_context_parallel_step_equals_one_device(objective, attention):
  """One train step on a data x context (masked) or fsdp x tensor x context (block, load-balanced) mesh: the loss
  and every gradient entry equal the single-device step's (to 1e-5 of the largest gradient entry: float32 sums in
  another order). The block objective's causal rows are reordered (in and back, in the forward pass); the masked
  objective's bidirectional rows never are."""
  (loss0, grads0, _), (loss, grads, reorders) = _step_results(objective, attention)
  assert reorders == (0 if objective == "masked" else 2)
  scale = max(float(np.max(np.abs(g))) for g in grads0)
  np.testing.assert_allclose(loss, loss0, rtol=RTOL)
  for g, g0 in zip(grads, grads0):
    np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5 * scale)


@needs_eight
def test_a_data_parallel_step_gathers_nothing():
  """A train step on an 8-way data mesh keeps every device on its own rows: its compiled program has no all-gather
  (the gradients' all-reduce is its one kind of collective). The MoE router's top-k once gathered every token's
  router probabilities [global tokens, E] on every device at every MoE layer (XLA's TopK custom call is not split
  over tokens; `moe.top_k_per_row`)."""
  from diffgemma_jax.train import compile_train_step, synthetic_batch  # pylint: disable=import-outside-toplevel
  config = _step_config("masked", "xla", False)
  config.train.batch_size = 8
  compiled = compile_train_step(config, mask_id=4, mesh=make_mesh((8,), ("data",)))
  batch = compiled.place(synthetic_batch(8, 32, TINY_MODEL["vocab_size"], seed=0))
  hlo = compiled.step.lower(compiled.init_state(), batch, jax.random.key(0)).compile().as_text()
  gathers = [line.split("metadata")[0] for line in hlo.splitlines() if "all-gather" in line]
  assert not gathers, gathers[:3]
  assert set(collectives.summary(collectives.inventory(hlo))) == {"all-reduce"}


@needs_eight
def test_collectives_benchmark_reads_a_configs_step(capsys):
  """bench/collectives.py compiles a config's step on its mesh (pretrain_tiny, scanned layers, data 2 x fsdp 4)
  and reports what it moves: the fsdp parameters' all-gathers, each run once per layer of the scan, the
  gradients' reductions, and their bytes against the parameters a device holds."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
  import collectives as bench_collectives  # pylint: disable=import-outside-toplevel
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain_tiny.py")
  assert bench_collectives.main(["--config", config, "--json", "--config.mesh.shape=(2,4,1,1)",
                                 "--config.model.scan_layers=True", "--config.train.batch_size=8"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["mesh"] == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
  assert {"all-gather", "all-reduce"} <= set(report["by_kind"])
  gathers = report["by_kind"]["all-gather"]
  assert gathers["runs"] > gathers["ops"]  # the scan's gathers run once per layer
  assert report["bytes_per_step"] == sum(k["bytes"] for k in report["by_kind"].values()) > 0
  assert 0 < report["param_bytes_per_device"] and report["ratio_moved_to_params"] > 0
  assert report["temp_bytes_per_device"] > 0  # XLA:CPU gives a memory analysis


def _collectives(hlo: str) -> list[str]:
  """The result shapes of the collectives of a compiled program's text."""
  return re.findall(r"= (\(.*?\)|\S+) (?:all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                    r"(?:-start)?\(", hlo)


@needs_eight
def test_row_reductions_stay_on_their_devices():
  """Per-row segment reductions over rows split on a 4-way data mesh run on each device's rows: a canvas mask's
  window starts (every sliding layer of the block objectives) need no collective at all, and the SFT loss's
  per-example sums only scalar ones (once made over the flattened batch, every device scattered into a [B * L]
  array of the whole batch and all-reduced it); both equal the unsplit values."""
  from diffgemma_jax.objectives.rows import normalise_loss  # pylint: disable=import-outside-toplevel
  mesh = make_mesh((4,), ("data",), devices=jax.devices()[:4])
  spec = _canvas_clean_window()
  placed = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))), spec)
  starts = jax.jit(lambda s: s.window_starts())
  assert _collectives(starts.lower(placed).compile().as_text()) == []
  np.testing.assert_array_equal(starts(placed), spec.window_starts())
  rng = np.random.default_rng(0)
  contrib = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
  segments = jnp.asarray(np.sort(rng.integers(0, 3, (4, 32)), axis=1), jnp.int32)
  scored = jnp.asarray(rng.random((4, 32)) < 0.5)
  args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (contrib * scored, scored, segments)]
  loss = jax.jit(normalise_loss)
  shapes = _collectives(loss.lower(*args).compile().as_text())
  assert shapes and all(re.fullmatch(r"\(?([a-z0-9]+\[\](\{[^}]*\})?(, )?)+\)?", s) for s in shapes), shapes
  np.testing.assert_allclose(loss(*args), normalise_loss(contrib * scored, scored, segments), rtol=1e-6)


@needs_eight
def test_chunked_attention_on_split_rows_moves_no_keys():
  """The chunked path's forward and backward on rows split over a 4-way data mesh (the block objectives' [canvas ;
  clean] rows with a window, chunks of 16 on key blocks of 8: narrow spans gathered per chunk) equal one device's,
  and their only collectives are the small integer one choosing each chunk's span (the widest any row needs) and
  the scalar loss's. The
  span gather once indexed the batch flattened to [B * blocks], so every device built every row's gathered keys
  and values and all-reduced them, at every chunk of every layer."""
  from pallas_kernels import chunked_attention  # pylint: disable=import-outside-toplevel
  mesh = make_mesh((4,), ("data",), devices=jax.devices()[:4])
  spec = _canvas_clean_window()
  q, k, v, cotangent = _inputs(spec, 4, 2, 8, jnp.float32)
  fn = lambda q, k, v, s: chunked_attention(q, k, v, s, chunk=16, key_block=8)  # noqa: E731
  expected = _value_and_grads(fn, spec, q, k, v, cotangent)
  rows = NamedSharding(mesh, P("data"))
  placed_spec = jax.tree.map(lambda a: jax.device_put(a, rows), spec)
  placed = [jax.device_put(a, rows) for a in (q, k, v, cotangent)]
  got = _value_and_grads(fn, placed_spec, *placed)
  for what, a, b in zip(["out", "dq", "dk", "dv"], jax.tree.leaves(got), jax.tree.leaves(expected)):
    _close(a, b, what)
  loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s) * placed[3])  # noqa: E731
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*placed[:3], placed_spec).compile().as_text()
  shapes = _collectives(hlo)
  assert all(not re.search(r"\b(f32|bf16)\[\d", shape) for shape in shapes), shapes  # the loss: f32[]


@needs_eight
def test_balanced_bound_equals_unbalanced_and_one_device():
  """Held-out bounds (`make_bound_fn`, the trainer's and diffgemma-evaluate's) of the AR baseline (exact NLL) on a
  data x context mesh, with and without `mesh.context_load_balance`, equal one device's row by row."""
  from diffgemma_jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.transformer import abstract_model, build_model  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.objectives import make_objective  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.parallel.placement import placement_for  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train import synthetic_batch  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train.bound import make_bound_fn  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train.state import split_model  # pylint: disable=import-outside-toplevel
  model_config = ModelConfig.from_config_dict(_step_config("ar", "chunked", True).model)
  _, params = split_model(build_model(model_config, 0))
  batch = synthetic_batch(4, 32, TINY_MODEL["vocab_size"], seed=1)
  one, mesh = _meshes("ar")
  results = []
  for on, load_balance in [(one, True), (mesh, True), (mesh, False)]:
    config = _step_config("ar", "chunked", load_balance)
    graphdef, _ = split_model(abstract_model(model_config, placement_for(on, config)))
    bound_fn = make_bound_fn(graphdef, make_objective(config.objective, mask_id=4), num_t_samples=1, mesh=on)
    with _CountReorders() as reorders:
      nelbo, _, tokens = bound_fn(params, batch, jax.random.key(3), jnp.arange(4, dtype=jnp.uint32))
    results.append((np.asarray(nelbo), np.asarray(tokens), reorders.calls))
  (nelbo0, tokens0, _), *sharded = results
  assert [calls for _, _, calls in sharded] == [2, 0]
  for nelbo, tokens, _ in sharded:
    np.testing.assert_array_equal(tokens, tokens0)
    np.testing.assert_allclose(nelbo, nelbo0, rtol=RTOL)


@needs_eight
def test_balanced_rows_must_cut_into_twice_the_context_shards():
  """A row that the context axis splits but that does not cut into 2C equal chunks is refused at start, naming
  the keys; without `mesh.context_load_balance` it runs contiguously, and so do the masked objective's rows."""
  from diffgemma_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.parallel import check_mesh_fits  # pylint: disable=import-outside-toplevel
  config = _step_config("ar", "chunked", True)
  config.train.seq_len = 36  # 4 context shards of 9 tokens: no 8 equal chunks
  mesh = _meshes("ar")[1]
  with pytest.raises(ConfigError, match=r"train.seq_len=36 .*mesh.context_load_balance=False"):
    check_mesh_fits(config, mesh)
  check_mesh_fits(config, mesh, training=False, objective_rows=False)  # generation's reader runs no objective
  config.mesh.context_load_balance = False
  check_mesh_fits(config, mesh)
  config.mesh.context_load_balance = True
  config.objective.name = "masked"  # bidirectional rows are never reordered: any multiple of the context axis
  check_mesh_fits(config, mesh)


@needs_eight
@pytest.mark.parametrize("name", ["masked", "ar", "block", "uniform"])
def test_the_start_up_check_asks_the_models_question_of_the_models_rows(name, monkeypatch):
  """Every registered objective (OBJECTIVES) on a data x context mesh, with rows that cut into 2C chunks and rows
  that do not: the masks the start-up check traces (`objectives.attended`) are the ones the model hands its
  MeshPlacement when the objective's loss and bound run on the mesh, and `check_mesh_fits` refuses the run exactly
  when one of those rows is uneven but `balance.balances` leaves it in row order (the uniform objective's b + L
  training rows, the AR baseline's L; never the block objective's 2L rows, which cut whenever L splits)."""
  from diffgemma_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.transformer import build_model  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.objectives import OBJECTIVES, make_objective  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.objectives.attended import attended_masks  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.parallel import check_mesh_fits  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.parallel.placement import MeshPlacement, placement_for  # pylint: disable=import-outside-toplevel
  assert sorted(OBJECTIVES) == sorted(["masked", "ar", "block", "uniform"])  # a new objective joins the parameters
  mesh = _meshes("ar")[1]  # data 2 x context 4: rows cut into 8 chunks
  summary = lambda m: (m.kind, m.q.length, m.kv.length, m.q.has_canvas, m.window)  # noqa: E731
  seen = []
  reorder_row = MeshPlacement.reorder_row
  monkeypatch.setattr(MeshPlacement, "reorder_row", lambda self, inputs, mask: (
      seen.append(mask), reorder_row(self, inputs, mask))[1])
  refused = {}
  for seq_len in (32, 36):
    config = _step_config(name, "xla", True)
    config.model.self_conditioning = name == "uniform"
    config.objective.block_size = 4
    config.train.seq_len = seq_len
    objective = make_objective(config.objective, mask_id=4)
    cfg = ModelConfig.from_config_dict(config.model)
    row = jax.ShapeDtypeStruct((4, seq_len), jnp.int32)

    def run(batch):
      model = build_model(cfg, 0, placement_for(mesh, config))
      return (objective.loss_fn(model, batch, jax.random.key(0))[0],
              objective.sequence_bound(model, batch, jax.random.key(1), num_t_samples=1)[0])

    seen.clear()
    jax.eval_shape(run, {"tokens": row, "segment_ids": row, "positions": row})
    assert seen and sorted(map(summary, attended_masks(objective, cfg, seq_len))) == sorted(map(summary, seen))
    left_in_order = [m.q.length for m in seen if balance.uneven(m) and not balance.balances(mesh, m)]
    try:
      check_mesh_fits(config, mesh)
      refused[seq_len] = None
    except ConfigError as error:
      refused[seq_len] = str(error)
    assert (refused[seq_len] is not None) == bool(left_in_order), (seq_len, left_in_order, refused[seq_len])
    if left_in_order:
      assert (f"train.seq_len={seq_len}" in refused[seq_len] and f"rows of {left_in_order[0]} tokens"
              in refused[seq_len] and "mesh.context_load_balance=False" in refused[seq_len]), refused[seq_len]
  expected = {"masked": [], "ar": [36], "block": [], "uniform": [32]}[name]  # uniform at 32: rows of 4 + 32
  assert [seq_len for seq_len, error in refused.items() if error] == expected, refused


EMBED_MESHES = {"fsdp x expert": (1, 2, 4, 1), "fsdp x tensor": (1, 4, 1, 2), "data x fsdp x expert": (2, 2, 2, 1),
                "data x tensor": (4, 1, 1, 2)}


@needs_eight
@pytest.mark.parametrize("mesh_name", sorted(EMBED_MESHES))
def test_embedding_table_on_a_mesh_equals_one_device_without_a_whole_table(mesh_name):
  """The token lookup, the tied logits and self-conditioning's mix of the stored table (parallel/embedding.py):
  values and gradients (table, activations, weights) equal one device's, and the compiled gradient makes no array
  of the whole table [V, D]; what the logits and the mix gather at a time is one vocabulary tile, no more rows
  than the shard's own slice (V / (tensor x fsdp)) nor an eighth of its vocabulary (V / tensor / 8)."""
  from diffgemma_jax.parallel import embedding, rules  # pylint: disable=import-outside-toplevel
  V, D, B, L = 64, 16, 8, 4
  shape = EMBED_MESHES[mesh_name]
  mesh = make_mesh(shape)
  rng = np.random.default_rng(0)
  table, x, probs, w_lookup, w_logits, w_mix = (
      jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(V, D), (B, L, D), (B, L, V), (B, L, D), (B, L, V),
                                                              (B, L, D)])
  tokens = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)

  def total(lookup, logits, mix, table, x, probs):
    return (jnp.sum(lookup(table, tokens, jnp.float32) * w_lookup) + jnp.sum(logits(x, table) * w_logits)
            + jnp.sum(mix(probs, table) * w_mix))

  local = jax.value_and_grad(functools.partial(
      total, lambda t, k, dtype: jnp.take(t, k, axis=0).astype(dtype), embedding.local_logits,
      lambda p, t: jnp.einsum("BLV,VD->BLD", p, t)), argnums=(0, 1, 2))(table, x, probs)
  sharded_fn = jax.jit(jax.value_and_grad(functools.partial(
      total, functools.partial(embedding.sharded_lookup, mesh=mesh),
      functools.partial(embedding.sharded_logits, mesh=mesh),
      functools.partial(embedding.sharded_mix, mesh=mesh)), argnums=(0, 1, 2)))
  args = (jax.device_put(table, NamedSharding(mesh, embedding.table_spec(table.shape, mesh))),
          jax.device_put(x, rules.batch_sharding(mesh, 3)), jax.device_put(probs, rules.batch_sharding(mesh, 3)))
  sharded = sharded_fn(*args)
  for what, a, b in zip(["value", "d table", "d x", "d probs"], jax.tree.leaves(sharded), jax.tree.leaves(local)):
    _close(a, b, what)
  hlo = sharded_fn.lower(*args).compile().as_text()
  assert not re.search(rf"\[{V},{D}\]", hlo), "a whole [V, D] table on a device"
  shard_rows = V // mesh.shape["tensor"]
  most = min(shard_rows // mesh.shape["fsdp"], shard_rows // 8)  # the shard's own rows, an eighth of its vocabulary
  gathered = [int(r) for r in re.findall(rf"= f32\[(\d+),{D}\]\S* all-gather", hlo)]
  assert (max(gathered) <= most if mesh.shape["fsdp"] > 1 else not gathered), (gathered, most)


@needs_eight
@pytest.mark.parametrize("sampler,objective,extra", [
    ("ar", "ar", {}), ("threshold", "masked", dict(temperature=1.0)),
    ("block_threshold", "block", {}), ("entropy_bound", "uniform", dict(max_denoising_steps=4))])
def test_generation_splits_a_batch_over_the_data_axis_with_one_devices_tokens(sampler, objective, extra):
  """A model placed on an 8-device data mesh samples a batch of 8 prompts (left-padded, 3 lengths) with its rows
  split over the devices (the compiled sampler's inputs carry the batch sharding: one row per device, and it
  gathers nothing across devices), and every row's tokens and model calls equal those of the same model on one
  device."""
  from flax import nnx

  from diffgemma_jax.model import build_model
  from diffgemma_jax.sampling.requests import GenerationOptions, Generator, validate_options
  from test_batched_generation import MASK, PAD, TINY
  model = build_model(TINY, 0)
  graphdef, state = nnx.split(model)
  mesh = make_mesh((8, 1, 1, 1))
  placed = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
  rng = np.random.default_rng(1)
  prompts = [[2] + rng.integers(5, TINY.vocab_size, n - 1).tolist() for n in (4, 9, 4, 6, 9, 3, 5, 4)]
  options = validate_options(GenerationOptions(sampler=sampler, gen_length=16, block_length=8, seed=3, **extra),
                             objective, block_size=8)
  one, split = (Generator(m, mask_id=MASK, eos_id=7, pad_id=PAD) for m in (model, placed))
  assert one.rows_sharding(8) is None and split.rows_sharding(3) is None  # one device; 3 rows on 8 devices
  rows = split.rows_sharding(8)
  assert rows is not None and rows.spec == P(("data",))
  expected, got = one.run(prompts, options), split.run(prompts, options)
  prompt_sharding = split._compiled[next(iter(split._compiled))].input_shardings[0][1]  # (state, prompt, ...)
  assert prompt_sharding.is_equivalent_to(NamedSharding(mesh, P(("data",), None)), 2)
  hlo = split._compiled[next(iter(split._compiled))].as_text()
  assert "all-gather" not in hlo, "a row's sampling reads another device's rows"
  for row, (a, b) in enumerate(zip(expected, got)):
    assert (b["ids"], b["model_calls"]) == (a["ids"], a["model_calls"]), f"row {row}"


@needs_eight
@pytest.mark.parametrize("sampler,objective,extra", [
    ("ar", "ar", {}), ("threshold", "masked", dict(temperature=1.0)),
    ("block_threshold", "block", {}), ("entropy_bound", "uniform", dict(max_denoising_steps=4))])
def test_serving_splits_the_slots_over_the_data_axis_with_one_devices_tokens(sampler, objective, extra):
  """The continuous-batching engine of a model placed on an 8-device data mesh serves 11 requests (3 prompt
  lengths, 2 budgets: slots refilled as they free) with every request's tokens and model calls equal to those of
  the same engine on one device. The AR and canvas engines hold their 8 slots one per device: every program is
  compiled for slot state split over the data axis (the KV cache on its row axis, the other fields on their first),
  and no step gathers anything across devices (per-row cache writes and the router's top-k stay on each device).
  The masked engine, whose calls gather a class of rows from any slots, keeps its slots where the model is (8
  slots, and 3)."""
  from flax import nnx

  from diffgemma_jax.model import build_model
  from diffgemma_jax.sampling.requests import GenerationOptions, Generator, validate_options
  from test_batched_generation import MASK, PAD, TINY
  model = build_model(TINY, 0)
  graphdef, state = nnx.split(model)
  mesh = make_mesh((8, 1, 1, 1))
  placed = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
  rng = np.random.default_rng(2)
  prompts = [[2] + rng.integers(5, TINY.vocab_size, n - 1).tolist() for n in (4, 9, 4, 6, 9, 3, 5, 4, 7, 9, 2)]
  budgets = [16 if i % 3 else 8 for i in range(len(prompts))]
  options = validate_options(GenerationOptions(sampler=sampler, gen_length=16, block_length=8, seed=3, **extra),
                             objective, block_size=8)
  one, split = (Generator(m, mask_id=MASK, eos_id=7, pad_id=PAD) for m in (model, placed))
  expected = one.serve(prompts, options, 8, budgets=budgets)
  got = split.serve(prompts, options, 8, budgets=budgets)
  for index, (a, b) in enumerate(zip(expected, got)):
    assert (b["ids"], b["model_calls"]) == (a["ids"], a["model_calls"]), f"request {index}"
  engine = next(iter(split._engines.values()))
  assert next(iter(one._engines.values())).slot_shardings is None
  if sampler == "threshold":
    assert engine.slot_shardings.cache[0][0].is_equivalent_to(NamedSharding(mesh, P()), 5)
    # 3 slots (not split): every program, the host-stepped plan included, compiled for the model's mesh
    for a, b in zip(one.serve(prompts[:4], options, 3, budgets=budgets[:4]),
                    split.serve(prompts[:4], options, 3, budgets=budgets[:4])):
      assert (b["ids"], b["model_calls"]) == (a["ids"], a["model_calls"])
    return
  rows, cache = NamedSharding(mesh, P(("data",))), NamedSharding(mesh, P(None, ("data",)))
  assert engine.slot_shardings.cache[0][0].is_equivalent_to(cache, 5)
  assert engine.slot_shardings.done_B.is_equivalent_to(rows, 1)
  advance = engine._compiled["advance"]
  assert advance.input_shardings[0][1].done_B.is_equivalent_to(rows, 1)
  assert advance.output_shardings[0].cache[0][0].is_equivalent_to(cache, 5)
  for key, program in engine._compiled.items():
    gathers = [line.split("metadata")[0] for line in program.as_text().splitlines() if "all-gather" in line]
    assert not gathers, (key, gathers[:3])


@needs_eight
@pytest.mark.parametrize("batch", [8, 3])
def test_generation_on_an_expert_mesh_keeps_the_experts_on_their_shards(batch):
  """A model built for an 8-way expert mesh (its experts split over `expert`, the grouped `sorted` dispatch,
  dropless), as `restore_model` builds one, samples a batch that splits over the devices (8 rows: expert-parallel dispatch)
  and one that does not (3 rows: every shard runs its own experts on every token,
  `expert.replicated_token_routed_experts`) with one device's tokens, and the compiled samplers gather no expert
  weights: under GSPMD the sorted dispatch gathered every expert's weights on every device at every model call."""
  import dataclasses as dc  # pylint: disable=import-outside-toplevel

  from flax import nnx

  from diffgemma_jax.model import build_model
  from diffgemma_jax.model.transformer import abstract_model
  from diffgemma_jax.parallel.placement import placement_for
  from diffgemma_jax.parallel.rules import shardings_for
  from diffgemma_jax.sampling.requests import GenerationOptions, Generator, validate_options
  from diffgemma_jax.train.state import split_model
  from test_batched_generation import MASK, PAD, TINY
  cfg = dc.replace(TINY, num_experts=8, dispatch="sorted")
  model = build_model(cfg, 0)
  _, params = split_model(model)
  mesh = make_mesh((1, 1, 8, 1), ("data", "fsdp", "expert", "tensor"))
  graphdef, _ = split_model(abstract_model(dc.replace(cfg, dropless=True), placement_for(mesh)))  # as restore_model
  placed = nnx.merge(graphdef, jax.device_put(params, shardings_for(params, mesh)))
  rng = np.random.default_rng(4)
  prompts = [[2] + rng.integers(5, cfg.vocab_size, n - 1).tolist() for n in (4, 9, 4, 6, 9, 3, 5, 4)[:batch]]
  for sampler, objective in (("ar", "ar"), ("block_threshold", "block")):
    options = validate_options(GenerationOptions(sampler=sampler, gen_length=16, block_length=8, seed=3), objective,
                               block_size=8)
    one, split = (Generator(m, mask_id=MASK, eos_id=7, pad_id=PAD) for m in (model, placed))
    expected, got = one.run(prompts, options), split.run(prompts, options)
    for row, (a, b) in enumerate(zip(expected, got)):
      assert (b["ids"], b["model_calls"]) == (a["ids"], a["model_calls"]), f"{sampler} row {row}"
    hlo = split._compiled[next(iter(split._compiled))].as_text()
    shapes = [shape for shape, kind in re.findall(r"= (\(.*?\)|\S+) (all-gather|all-reduce|all-to-all)\(", hlo)
              if kind == "all-gather"]
    # expert weights or their tiles: [E = 8, ., .] (a row-split activation [T, D] may be gathered back)
    assert not any(re.search(r"\b(f32|bf16)\[8,\d+,\d+\]", shape) for shape in shapes), (sampler, shapes)

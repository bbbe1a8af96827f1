"""pallas_kernels against the pure-jnp reference: forward, dlhs, drhs, tgmm, group metadata, and the bench.

On CPU the kernels run in Pallas interpret mode, where out-of-bounds reads come back as NaN and unwritten
outputs as NaN, so a missing mask or an unwritten row fails here just as it would corrupt results on a GPU.
Set DIFFGEMMA_PALLAS_GPU=1 to run the same tests on the compiled Triton kernels (bench/gpu_check.sh does).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cuda_lowering
import pallas_kernels as pk
from pallas_kernels import metadata

ON_GPU = os.environ.get("DIFFGEMMA_PALLAS_GPU", "0") == "1"
INTERPRET = not ON_GPU
REPO = pathlib.Path(__file__).resolve().parents[1]
# bfloat16: about one ulp (2^-8) of the largest value, twice the worst error seen (5.2e-3 on a weight gradient, whose
# reference widens before gathering; the kernels round the incoming gradient to bfloat16 as they should).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _group_sizes(case: str, m: int, num_groups: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if case == "random_with_zeros":
    weights = rng.random(num_groups) * (rng.random(num_groups) > 0.3)
    weights[0] = 0.0
    sizes = np.floor(weights / weights.sum() * m).astype(np.int32)
    sizes[np.argmax(weights)] += m - sizes.sum()
  elif case == "one_group_holds_all":
    sizes = np.zeros(num_groups, np.int32)
    sizes[num_groups // 2] = m
  elif case == "last_group_holds_all":
    sizes = np.zeros(num_groups, np.int32)
    sizes[-1] = m
  elif case == "short_of_m":  # sum(group_sizes) < m: trailing rows belong to no group.
    sizes = np.full(num_groups, m // (num_groups + 1), np.int32)
  elif case == "tiny_groups":  # Many boundaries inside one tile.
    sizes = np.ones(num_groups, np.int32)
    sizes[-1] = m - (num_groups - 1)
  else:
    raise ValueError(case)
  assert sizes.sum() <= m and (sizes >= 0).all()
  return sizes


def _inputs(m, k, n, num_groups, dtype, seed=0, transpose_rhs=False):
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  rhs_shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
  rhs = (jax.random.normal(keys[1], rhs_shape, jnp.float32) / np.sqrt(k)).astype(dtype)
  cotangent = jax.random.normal(keys[2], (m, n), jnp.float32)
  return lhs, rhs, cotangent


def _assert_close(actual, expected, dtype):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert actual.shape == expected.shape
  assert np.isfinite(actual).all(), "non-finite values: a masked load or an unwritten output"
  scale = max(1.0, float(np.abs(expected).max()))
  error = float(np.abs(actual - expected).max())
  assert error <= TOLERANCE[dtype] * scale, f"max abs error {error} (scale {scale})"


# (m, k, n, tiling): m, k and n off the tile multiples, and one case on them.
SHAPES = [
    (90, 40, 35, (16, 16, 16)),
    (96, 48, 48, (32, 32, 32)),
    (64, 32, 32, (16, 16, 16)),
]
GROUP_CASES = ["random_with_zeros", "one_group_holds_all", "last_group_holds_all", "short_of_m", "tiny_groups"]


def test_visits_write_every_row_once_with_its_group():
  m, block_m, num_groups = 90, 16, 6
  for case in GROUP_CASES:
    sizes = jnp.asarray(_group_sizes(case, m, num_groups))
    for offset, num_local in [(0, num_groups), (2, 3)]:
      visits = jax.tree.map(np.asarray, metadata.gmm_visits(sizes, m, block_m, num_local, offset))
      assert visits.row_tile.shape == (metadata.num_visits(m, block_m, num_local),)
      expected_group = np.asarray(pk.reference.local_group_of_rows(sizes, m, offset, num_local))
      writes = np.zeros(m, np.int32)
      for tile, group, start, end in zip(*visits):
        rows = np.arange(tile * block_m, (tile + 1) * block_m)
        rows = rows[(rows >= start) & (rows < end)]
        writes[rows] += 1
        np.testing.assert_array_equal(expected_group[rows], group, err_msg=f"{case} offset {offset}")
      np.testing.assert_array_equal(writes, 1, err_msg=f"{case} offset {offset}")


@pytest.mark.parametrize("case", GROUP_CASES)
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gmm_forward_float32(case, shape):
  m, k, n, tiling = shape
  sizes = jnp.asarray(_group_sizes(case, m, 5))
  lhs, rhs, _ = _inputs(m, k, n, 5, jnp.float32)
  out = pk.gmm_kernel(lhs, rhs, sizes, tiling=tiling, interpret=INTERPRET)
  _assert_close(out, pk.gmm_reference(lhs, rhs, sizes), jnp.float32)


def test_gmm_forward_bfloat16_output_dtype():
  m, k, n, tiling = SHAPES[0]
  sizes = jnp.asarray(_group_sizes("random_with_zeros", m, 4))
  lhs, rhs, _ = _inputs(m, k, n, 4, jnp.bfloat16)
  out = pk.gmm_kernel(lhs, rhs, sizes, preferred_element_type=jnp.bfloat16, tiling=tiling, interpret=INTERPRET)
  assert out.dtype == jnp.bfloat16
  _assert_close(out, pk.gmm_reference(lhs, rhs, sizes), jnp.bfloat16)


def test_gmm_default_tiling_transpose_rhs():
  m, k, n = 80, 24, 40
  sizes = jnp.asarray(_group_sizes("random_with_zeros", m, 3, seed=2))
  lhs, rhs, _ = _inputs(m, k, n, 3, jnp.float32, transpose_rhs=True)
  out = pk.gmm_kernel(lhs, rhs, sizes, transpose_rhs=True, interpret=INTERPRET)
  _assert_close(out, pk.gmm_reference(lhs, rhs, sizes, transpose_rhs=True), jnp.float32)


@pytest.mark.parametrize("offset,num_local", [(0, 2), (2, 3), (4, 2)])
def test_gmm_group_offset_zeroes_other_shards_rows(offset, num_local):
  m, k, n, tiling = SHAPES[0]
  sizes = jnp.asarray(_group_sizes("random_with_zeros", m, 6, seed=3))
  lhs, rhs, _ = _inputs(m, k, n, 6, jnp.float32)
  local_rhs = rhs[offset:offset + num_local]
  out = pk.gmm_kernel(lhs, local_rhs, sizes, tiling=tiling, group_offset=offset, interpret=INTERPRET)
  expected = pk.gmm_reference(lhs, local_rhs, sizes, group_offset=offset)
  _assert_close(out, expected, jnp.float32)
  is_local = np.asarray(pk.reference.local_group_of_rows(sizes, m, offset, num_local)) >= 0
  assert not np.asarray(out)[~is_local].any()


@pytest.mark.parametrize("transpose_lhs", [False, True])
@pytest.mark.parametrize("case", ["random_with_zeros", "one_group_holds_all", "short_of_m"])
def test_tgmm(case, transpose_lhs):
  m, k, n, tiling = SHAPES[0]
  sizes = jnp.asarray(_group_sizes(case, m, 5, seed=4))
  lhs_mk, _, rhs = _inputs(m, k, n, 5, jnp.float32)
  lhs = lhs_mk if transpose_lhs else lhs_mk.T
  out = pk.tgmm(lhs, rhs, sizes, tiling=tiling, interpret=INTERPRET, transpose_lhs=transpose_lhs)
  _assert_close(out, pk.tgmm_reference(lhs_mk.T, rhs, sizes), jnp.float32)


def test_tgmm_group_offset_and_default_tiling():
  m, k, n = 72, 40, 24
  sizes = jnp.asarray(_group_sizes("random_with_zeros", m, 6, seed=5))
  lhs_mk, _, rhs = _inputs(m, k, n, 6, jnp.float32)
  out = pk.tgmm(lhs_mk.T, rhs, sizes, group_offset=3, num_actual_groups=3, interpret=INTERPRET)
  assert out.shape == (3, k, n)
  _assert_close(out, pk.tgmm_reference(lhs_mk.T, rhs, sizes, group_offset=3, num_actual_groups=3), jnp.float32)


def _loss(gmm_fn, cotangent):
  return lambda lhs, rhs: jnp.sum(gmm_fn(lhs, rhs).astype(jnp.float32) * cotangent)


GRAD_CASES = [
    # (dtype, transpose_rhs, group_offset, num_local, case, shape index)
    (jnp.float32, False, None, 5, "random_with_zeros", 0),
    (jnp.float32, True, None, 5, "one_group_holds_all", 0),
    (jnp.float32, False, 1, 3, "random_with_zeros", 1),
    (jnp.float32, True, 2, 2, "short_of_m", 0),
    (jnp.bfloat16, False, None, 5, "random_with_zeros", 0),
    (jnp.bfloat16, True, 1, 3, "tiny_groups", 1),
]


@pytest.mark.parametrize("dtype,transpose_rhs,offset,num_local,case,shape_index", GRAD_CASES)
def test_gmm_forward_and_gradients_match_reference(dtype, transpose_rhs, offset, num_local, case, shape_index):
  m, k, n, tiling = SHAPES[shape_index]
  sizes = jnp.asarray(_group_sizes(case, m, 5, seed=6))
  lhs, rhs, cotangent = _inputs(m, k, n, num_local, dtype, seed=7, transpose_rhs=transpose_rhs)
  ours = lambda x, w: pk.gmm(x, w, sizes, tiling=tiling, group_offset=offset, transpose_rhs=transpose_rhs,
                             interpret=INTERPRET)
  reference = lambda x, w: pk.gmm_reference(x, w, sizes, group_offset=offset, transpose_rhs=transpose_rhs)
  _assert_close(ours(lhs, rhs), reference(lhs, rhs), dtype)
  dlhs, drhs = jax.grad(_loss(ours, cotangent), argnums=(0, 1))(lhs, rhs)
  dlhs_ref, drhs_ref = jax.grad(_loss(reference, cotangent), argnums=(0, 1))(lhs, rhs)
  assert dlhs.dtype == lhs.dtype and drhs.dtype == rhs.dtype
  _assert_close(dlhs, dlhs_ref, dtype)
  _assert_close(drhs, drhs_ref, dtype)


def test_gmm_under_jit_with_traced_group_sizes():
  m, k, n, tiling = SHAPES[2]
  lhs, rhs, cotangent = _inputs(m, k, n, 4, jnp.float32, seed=8)

  @jax.jit
  def grads(lhs, rhs, sizes):
    return jax.grad(_loss(lambda x, w: pk.gmm(x, w, sizes, tiling=tiling, interpret=INTERPRET), cotangent),
                    argnums=(0, 1))(lhs, rhs)

  for case in ["random_with_zeros", "tiny_groups"]:
    sizes = jnp.asarray(_group_sizes(case, m, 4, seed=9))
    expected = jax.grad(_loss(lambda x, w: pk.gmm_reference(x, w, sizes), cotangent), argnums=(0, 1))(lhs, rhs)
    for got, want in zip(grads(lhs, rhs, sizes), expected):
      _assert_close(got, want, jnp.float32)


def test_tiling_table_and_validation():
  tiling = pk.choose_tiling("gmm", 8192, 4096, 14336, jnp.bfloat16)
  assert (tiling.block_m, tiling.block_n) == (128, 256)
  small = pk.choose_tiling("tgmm", 20, 5, 33, jnp.float32)
  assert (small.block_m, small.block_k, small.block_n) == (32, 16, 64)
  assert pk.choose_tiling("gmm", 1, 1, 1, jnp.float32, override=(16, 32, 64)).block_k == 32
  with pytest.raises(ValueError, match="power of two"):
    pk.Tiling(48, 16, 16)


@pytest.mark.parametrize("m,k,n", [(8192, 4096, 14336), (65536, 2816, 1408), (65536, 704, 2816), (8192, 4096, 1024)])
def test_table_tilings_fit_shared_memory(m, k, n):
  """Every launch of a bench shape (forward, dlhs with a float32 gradient, drhs) fits a Hopper block's shared
  memory, and a smaller card gets fewer stages or a shallower k step instead of a launch that cannot compile."""
  hopper = 232448
  launches = [("gmm", m, k, n, (jnp.bfloat16, jnp.bfloat16)),     # forward
              ("gmm", m, n, k, (jnp.float32, jnp.bfloat16)),      # dlhs: float32 gradient x weights
              ("tgmm", m, k, n, (jnp.bfloat16, jnp.float32))]     # drhs: activations^T x gradient
  for kernel, mm, kk, nn, dtypes in launches:
    tiling = pk.choose_tiling(kernel, mm, kk, nn, jnp.bfloat16, operand_dtypes=dtypes, shared_memory_bytes=hopper)
    table = pk.choose_tiling(kernel, mm, kk, nn, jnp.bfloat16, shared_memory_bytes=10**9)
    sizes = tuple(jnp.dtype(d).itemsize for d in dtypes)
    assert pk.pipeline_shared_bytes(kernel, tiling, sizes) <= hopper
    if pk.pipeline_shared_bytes(kernel, table, sizes) <= hopper:
      assert tiling == table  # the table is kept whenever it fits
    small = pk.choose_tiling(kernel, mm, kk, nn, jnp.bfloat16, operand_dtypes=dtypes, shared_memory_bytes=65536)
    assert pk.pipeline_shared_bytes(kernel, small, sizes) <= 65536
    assert (small.block_m, small.block_n) == (tiling.block_m, tiling.block_n) or small.block_k == 16
  # 128x64 bf16 + 64x256 bf16 tiles: 48 KiB a stage.
  forward = pk.choose_tiling("gmm", 8192, 4096, 14336, jnp.bfloat16, shared_memory_bytes=hopper)
  assert pk.pipeline_shared_bytes("gmm", forward) == forward.num_stages * 48 * 1024
  tight = pk.choose_tiling("gmm", 8192, 4096, 14336, jnp.bfloat16, shared_memory_bytes=100 * 1024)
  assert (tight.num_stages, tight.block_k) == (2, 64)


def test_shape_errors_name_the_inputs():
  lhs = jnp.zeros((16, 8))
  with pytest.raises(ValueError, match="has k=9"):
    pk.gmm_kernel(lhs, jnp.zeros((2, 9, 4)), jnp.array([8, 8], jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="group_sizes"):
    pk.gmm_kernel(lhs, jnp.zeros((2, 8, 4)), jnp.array([8.0, 8.0]), interpret=True)


class _VerifiedTritonModules:
  """Wraps jax's Pallas-Triton lowering so that every Triton module it builds is run through MLIR's verifier.

  Lowering alone does not verify: a module the GPU then refuses to parse (an scf.for whose bounds have different
  integer types, say) lowers without complaint on a CPU. Reaches into jax internals; where they moved, nothing is
  wrapped and `count` stays 0 (the callers then skip)."""

  def __init__(self):
    self.count = 0
    self.failures = []
    try:
      from jax._src.pallas.triton import lowering  # pylint: disable=import-outside-toplevel
    except ImportError:
      lowering = None
    self._lowering = lowering
    self._original = getattr(lowering, "lower_jaxpr_to_triton_module", None)

  def __enter__(self):
    if self._original is not None:
      def verified(*args, **kwargs):
        result = self._original(*args, **kwargs)
        self.count += 1
        try:
          ok = result.module.operation.verify()
        except Exception as e:  # pylint: disable=broad-except  (MLIRError carries the diagnostics)
          self.failures.append(str(e)[:2000])
        else:
          if not ok:
            self.failures.append("verify() returned False")
        return result
      self._lowering.lower_jaxpr_to_triton_module = verified
    return self

  def __exit__(self, *exc):
    if self._original is not None:
      self._lowering.lower_jaxpr_to_triton_module = self._original


def _lowered_for_gpu(fn, *args) -> str:
  """fn lowered for CUDA (works without a GPU), as module text, every Triton module in it verified; skips where
  this jaxlib cannot lower for CUDA."""
  with _VerifiedTritonModules() as modules:
    lowered = cuda_lowering.lowered_for_cuda(fn, *args)
  text = lowered.as_text()
  if "__gpu$xla.gpu.triton" in text and not modules.count:
    pytest.skip("jax's Pallas-Triton lowering moved: its modules cannot be verified here")
  assert not modules.failures, "a Triton module the GPU would refuse:\n" + "\n".join(modules.failures)
  return text


def _triton_calls_when_lowered_for_gpu(fn, *args) -> int:
  """The Pallas-Triton kernel calls in fn's module lowered for CUDA."""
  return _lowered_for_gpu(fn, *args).count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n", [(90, 40, 35), (8192, 4096, 14336)])
def test_kernels_lower_to_triton(dtype, m, k, n):
  """Catches what interpret mode cannot: block shapes or primitives the Triton lowering rejects."""
  sds = jax.ShapeDtypeStruct
  lhs, rhs, sizes = sds((m, k), dtype), sds((5, k, n), dtype), sds((5,), jnp.int32)
  grads = lambda transpose_rhs: lambda x, w, s: jax.grad(
      lambda x, w: pk.gmm(x, w, s, transpose_rhs=transpose_rhs, group_offset=1, interpret=False).sum(),
      argnums=(0, 1))(x, w)
  assert _triton_calls_when_lowered_for_gpu(
      lambda x, w, s: pk.gmm(x, w, s, interpret=False), lhs, rhs, sizes) == 1
  assert _triton_calls_when_lowered_for_gpu(grads(False), lhs, rhs, sizes) == 2
  assert _triton_calls_when_lowered_for_gpu(grads(True), lhs, sds((5, n, k), dtype), sizes) == 2
  assert _triton_calls_when_lowered_for_gpu(
      lambda x, y, s: pk.tgmm(x, y, s, interpret=False), sds((k, m), dtype), sds((m, n), dtype), sizes) == 1


def test_train_step_with_pallas_dispatch_lowers_to_triton(monkeypatch):
  """The whole jitted train step with model.dispatch='pallas', lowered for a GPU from this CPU: the MoE's two
  grouped matmuls forward and their four gradients (dlhs, drhs each) become Triton kernels, nothing else fails
  to lower, and no interpreter is left in the program."""
  from diffgemma_jax.config import base_config
  from diffgemma_jax.train import compile_train_step, synthetic_batch
  from pallas_kernels import _compat

  # What `interpret=None` resolves to on a GPU backend; traces cached for this CPU must not be reused.
  monkeypatch.setattr(_compat, "resolve_interpret", lambda interpret: False if interpret is None else interpret)
  jax.clear_caches()
  try:
    config = base_config()
    config.model.dispatch = "pallas"
    config.train.update(batch_size=2, seq_len=48)
    compiled = compile_train_step(config, mask_id=4)  # base_config's objective: masked diffusion
    cfg = compiled.model_config
    batch = synthetic_batch(2, 48, cfg.vocab_size)
    text = _lowered_for_gpu(compiled.step, compiled.abstract_state, batch, jax.random.key(0))
  finally:
    jax.clear_caches()
  # One kernel per distinct call site: the layers share them (scanned, or one outlined function per shape).
  assert text.count("__gpu$xla.gpu.triton") in (6, 6 * cfg.num_layers)
  assert 'name = "gmm"' in text and 'name = "tgmm"' in text


@pytest.mark.skipif(ON_GPU, reason="the GPU check runs the full benchmark itself")
def test_benchmark_script_runs_in_interpret_mode(tmp_path):
  out_json = tmp_path / "gmm_bench.json"
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / "gmm_gpu.py"), "--interpret", "--small", "--runs", "3",
       "--json", str(out_json)],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out_json.read_text())
  assert len(report["results"]) == 6
  for row in report["results"]:
    for direction in ("forward", "dlhs", "drhs"):
      ours = row[direction]["ours"]
      assert ours["ok"], ours
      assert ours["tflops"] > 0


@pytest.mark.skipif(ON_GPU, reason="a GPU session runs the sweep on the real shapes")
def test_tiling_sweep_runs_in_interpret_mode(tmp_path):
  out_json = tmp_path / "sweep.json"
  result = subprocess.run(
      [sys.executable, str(REPO / "bench" / "gmm_gpu.py"), "--sweep", "--interpret", "--small", "--runs", "2",
       "--warmup", "1", "--candidates", "2", "--shapes", "mixtral_up_small", "--json", str(out_json)],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out_json.read_text())
  rows = report["sweep"]["mixtral_up_small"]
  assert len(rows) == 2
  for row in rows:
    for direction in ("forward", "dlhs", "drhs"):
      assert row[direction]["ok"] and row[direction]["tflops"] > 0
  assert set(report["best"]["mixtral_up_small"]) == {"forward", "dlhs", "drhs"}

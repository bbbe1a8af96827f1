"""The Mosaic GPU grouped matmuls (pallas_kernels/gmm_mosaic.py, ops_mosaic.py) against the pure-jnp reference.

On CPU the kernels run in jax's Mosaic GPU interpret mode: SMEM, GMEM, TMA copies, barriers and wgmma simulated,
out-of-bounds reads raising, and buffers (the output included) starting as NaN, so an unwritten output row or a
read past an array fails here. The inputs are bf16 (or f16) and the reference multiplies the same 16-bit values
in float32, so the comparison is tight: only the float32 summation order may differ. Set DIFFGEMMA_PALLAS_GPU=1
to run the same tests on the compiled kernels (bench/gpu_check.sh does).

What interpret mode cannot see (layouts, wgmma shapes, swizzles, SMEM size) is checked by lowering the kernels
for CUDA on this CPU: jax runs the whole Mosaic GPU lowering there, short of ptxas. Interpret mode also runs TMA
copies and wgmma synchronously; the waits and fences that real asynchrony needs are checked on the lowered kernels
(tests/mosaic_sync.py).
"""

import json
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.model import dispatch
from diffgemma_jax.model.config import ModelConfig
from pallas_kernels import _mosaic_compat
from pallas_kernels import gmm_mosaic
from pallas_kernels import metadata
from pallas_kernels import ops_mosaic
from pallas_kernels import reference

sys.path.insert(0, os.path.dirname(__file__))
import cuda_lowering  # noqa: E402  pylint: disable=wrong-import-position
import mosaic_sync  # noqa: E402  pylint: disable=wrong-import-position

ON_GPU = os.environ.get("DIFFGEMMA_PALLAS_GPU", "0") == "1"
INTERPRET = not ON_GPU
TILE = (64, 64, 64)  # the smallest wgmma-friendly tiles: cheap in interpret mode
F32_TOLERANCE = 1e-5  # relative to the largest reference entry: float32 summation order only


@pytest.fixture(autouse=True)
def _clean_interpreter():
  """Mosaic GPU interpret mode keeps global state that a kernel failing mid-run leaves dirty."""
  yield
  if not ON_GPU:
    _mosaic_compat.reset_interpret_state()


def _group_sizes(case: str, m: int, num_groups: int) -> np.ndarray:
  if case == "uneven_with_empty":  # empty first, middle and last groups; boundaries inside tiles
    fractions = np.array([0.0, 0.05, 0.0, 0.45, 0.02, 0.0, 0.48, 0.0])[:num_groups]
    sizes = np.floor(fractions / fractions.sum() * m).astype(np.int32)
    sizes[3] += m - sizes.sum()
  elif case == "one_group_holds_all":
    sizes = np.zeros(num_groups, np.int32)
    sizes[num_groups // 2] = m
  elif case == "short_of_m":  # sum(group_sizes) < m: trailing rows belong to no group
    sizes = np.full(num_groups, m // (num_groups + 2), np.int32)
  elif case == "tiny_groups":  # many boundaries inside one tile
    sizes = np.ones(num_groups, np.int32)
    sizes[-1] = m - (num_groups - 1)
  else:
    raise ValueError(case)
  assert sizes.sum() <= m and (sizes >= 0).all()
  return sizes


def _operands(m, k, n, num_groups, dtype=jnp.bfloat16, seed=0, transpose_rhs=False):
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
  rhs = (jax.random.normal(keys[1], shape, jnp.float32) / np.sqrt(k)).astype(dtype)
  # A cotangent of exactly representable 16-bit values: the backward's cast to the operand dtype loses nothing.
  cotangent = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype).astype(jnp.float32)
  return lhs, rhs, cotangent


def _assert_close(actual, expected, out_dtype=jnp.float32):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert actual.shape == expected.shape
  assert np.isfinite(actual).all(), "non-finite values: an unwritten output or a read of uninitialised memory"
  scale = max(1.0, float(np.abs(expected).max()))
  if jnp.dtype(out_dtype) == jnp.float32:
    error = float(np.abs(actual - expected).max())
    assert error <= F32_TOLERANCE * scale, f"max abs error {error} (scale {scale})"
  else:  # both sides rounded from (nearly) the same float32 value: at most one unit in the last place apart
    ulp = 2.0 ** -jnp.finfo(out_dtype).nmant  # one unit in the last place is at most this much of a value
    np.testing.assert_allclose(actual, expected, rtol=ulp, atol=1e-6 * scale)


_tile_groups = jax.jit(metadata.tile_groups, static_argnums=(1, 2, 3))


def test_tile_groups_cover_each_row_once_with_its_group():
  """The gmm kernel's work list: every row of a tile is multiplied by exactly its own local group's weights."""
  m, block_m, num_groups = 150, 16, 8
  for case in ["uneven_with_empty", "one_group_holds_all", "short_of_m", "tiny_groups"]:
    sizes = jnp.asarray(_group_sizes(case, m, num_groups))
    for offset, num_local in [(0, num_groups), (2, 3), (7, 1)]:
      pairs = jax.tree.map(np.asarray, _tile_groups(sizes, m, block_m, num_local, offset))
      num_tiles = -(-m // block_m)
      assert pairs.first.shape == (num_tiles,) and pairs.group.shape == (num_tiles + num_local,)
      expected = np.asarray(reference.local_group_of_rows(sizes, m, offset, num_local))
      covered = np.zeros(m, np.int32)
      for tile in range(num_tiles):
        rows = np.arange(tile * block_m, min((tile + 1) * block_m, m))
        for entry in range(pairs.first[tile], pairs.end[tile]):
          mine = rows[(rows >= pairs.row_start[entry]) & (rows < pairs.row_end[entry])]
          assert mine.size, f"{case}: an entry of tile {tile} owns none of its rows"
          covered[mine] += 1
          np.testing.assert_array_equal(expected[mine], pairs.group[entry], err_msg=f"{case} offset {offset}")
      np.testing.assert_array_equal(covered, (expected >= 0).astype(np.int32), err_msg=f"{case} offset {offset}")


FORWARD_CASES = [
    # (m, k, n, num_local, offset, case, transpose_rhs, out dtype, operand dtype)
    (150, 64, 64, 8, None, "uneven_with_empty", False, jnp.float32, jnp.bfloat16),
    (150, 64, 64, 8, None, "tiny_groups", False, jnp.float32, jnp.bfloat16),
    (128, 64, 64, 8, None, "short_of_m", False, jnp.float32, jnp.bfloat16),
    (150, 64, 64, 3, 2, "uneven_with_empty", False, jnp.float32, jnp.bfloat16),  # a shard's groups only
    (150, 80, 72, 8, None, "uneven_with_empty", True, jnp.float32, jnp.bfloat16),  # k, n padded; [G, n, k]
    (130, 64, 128, 8, None, "one_group_holds_all", False, jnp.bfloat16, jnp.bfloat16),
    (150, 64, 64, 8, None, "uneven_with_empty", False, jnp.float32, jnp.float16),
]


@pytest.mark.parametrize("m,k,n,num_local,offset,case,transpose_rhs,out_dtype,dtype", FORWARD_CASES)
def test_gmm_forward(m, k, n, num_local, offset, case, transpose_rhs, out_dtype, dtype):
  sizes = jnp.asarray(_group_sizes(case, m, 8))
  lhs, rhs, _ = _operands(m, k, n, num_local, dtype, seed=1, transpose_rhs=transpose_rhs)
  out = gmm_mosaic.gmm(lhs, rhs, sizes, preferred_element_type=out_dtype, tiling=TILE, group_offset=offset,
                       transpose_rhs=transpose_rhs, interpret=INTERPRET)
  assert out.dtype == out_dtype
  expected = reference.gmm_reference(lhs, rhs, sizes, group_offset=offset, transpose_rhs=transpose_rhs)
  _assert_close(out, expected.astype(out_dtype), out_dtype)


@pytest.mark.parametrize("transpose_lhs,case,offset,num_groups", [
    (True, "uneven_with_empty", None, None),
    (False, "uneven_with_empty", None, None),
    (True, "tiny_groups", 1, 4),
    (True, "short_of_m", None, None),
])
def test_tgmm(transpose_lhs, case, offset, num_groups):
  m, k, n = 150, 64, 128
  sizes = jnp.asarray(_group_sizes(case, m, 8))
  lhs_mk, _, _ = _operands(m, k, n, 1, seed=2)
  grad = jax.random.normal(jax.random.key(3), (m, n)).astype(jnp.bfloat16)
  lhs = lhs_mk if transpose_lhs else lhs_mk.T
  out = gmm_mosaic.tgmm(lhs, grad, sizes, tiling=TILE, group_offset=offset, num_actual_groups=num_groups,
                        interpret=INTERPRET, transpose_lhs=transpose_lhs)
  expected = reference.tgmm_reference(lhs_mk.T, grad, sizes, group_offset=offset, num_actual_groups=num_groups)
  _assert_close(out, expected)
  empty = np.flatnonzero(np.asarray(sizes)[(offset or 0):][:out.shape[0]] == 0)
  assert not np.any(np.asarray(out)[empty]), "empty groups must get exactly zero"


def _loss(fn, cotangent):
  return lambda lhs, rhs: jnp.sum(fn(lhs, rhs).astype(jnp.float32) * cotangent)


@pytest.mark.parametrize("transpose_rhs,offset,num_local,case", [
    (False, None, 8, "uneven_with_empty"),
    (True, 2, 3, "tiny_groups"),
])
def test_custom_vjp_gradients_match_reference(transpose_rhs, offset, num_local, case):
  m, k, n = 150, 64, 128
  sizes = jnp.asarray(_group_sizes(case, m, 8))
  lhs, rhs, cotangent = _operands(m, k, n, num_local, seed=4, transpose_rhs=transpose_rhs)
  ours = lambda x, w: ops_mosaic.gmm(x, w, sizes, tiling=TILE, group_offset=offset, transpose_rhs=transpose_rhs,
                                     interpret=INTERPRET)
  ref = lambda x, w: reference.gmm_reference(x, w, sizes, group_offset=offset, transpose_rhs=transpose_rhs)
  dlhs, drhs = jax.grad(_loss(ours, cotangent), argnums=(0, 1))(lhs, rhs)
  # The reference differentiates at the same values held in float32: differentiating it at the bf16 operands
  # would round each row's weight-gradient term to bf16 and sum them in bf16.
  dlhs_ref, drhs_ref = jax.grad(_loss(ref, cotangent), argnums=(0, 1))(lhs.astype(jnp.float32),
                                                                       rhs.astype(jnp.float32))
  assert dlhs.dtype == lhs.dtype and drhs.dtype == rhs.dtype
  _assert_close(dlhs, dlhs_ref.astype(lhs.dtype), lhs.dtype)
  _assert_close(drhs, drhs_ref.astype(rhs.dtype), rhs.dtype)


def _wgmma_reading_transposed_operands(token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
                                       acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
                                       b_allocation_key_as_array, b_transforms, source_info=None):
  """jax's Mosaic GPU interpreter's wgmma callback (gpu_callbacks.wgmma in jax 0.10.2), taught one thing: an
  operand seen through `transpose_ref` is read, then transposed. Its own callback applies only indexing to an
  operand, so interpreted kernels otherwise transpose in HBM (gmm_mosaic._transpose_in_kernel)."""
  from jax._src.pallas.mosaic.interpret import utils  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as callbacks  # pylint: disable=import-outside-toplevel
  from jax._src.state.types import TransposeTransform  # pylint: disable=import-outside-toplevel
  device_id, thread_id = int(device_id), int(thread_id)
  memory = callbacks._get_shared_memory()  # pylint: disable=protected-access
  thread = memory.get_global_thread_id(device_id, thread_id)
  info = utils.GPULoggingInfo(device_id=device_id, grid_point_coords=tuple(int(x) for x in grid_point_coords),
                              thread_id=thread_id, source_info=source_info)

  def read(key, transforms):
    transforms = list(jax.tree.map(int, callbacks._remove_noop_transforms(transforms)))  # pylint: disable=protected-access
    permutation = None
    if transforms and isinstance(transforms[-1], TransposeTransform):
      permutation = transforms.pop().permutation
    assert not any(isinstance(t, TransposeTransform) for t in transforms), transforms
    where = utils.to_range(transforms)
    value, _, _ = memory.get_buffer_content(callbacks.HostAllocationKey.from_array(key), where, thread,
                                            logging_info=info)
    return (value if permutation is None else np.transpose(value, permutation)), where

  a, _ = read(a_allocation_key_as_array, a_transforms)
  b, _ = read(b_allocation_key_as_array, b_transforms)
  acc, acc_range = read(acc_allocation_key_as_array, acc_transforms)
  memory.store_buffer_content(callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array), acc_range,
                              acc + np.matmul(a, b, dtype=acc_dtype), thread, logging_info=info)
  return token


@pytest.mark.skipif(ON_GPU, reason="compiled kernels always transpose in SMEM; this is for the interpreter")
def test_in_kernel_transposes_through_a_taught_interpreter(monkeypatch):
  """The transposed-operand kernel forms (gmm reading [n, k] weight tiles, tgmm reading [m, k] activation tiles,
  both through transpose_ref, and tgmm's row mask on that layout) are what compiled kernels run, yet the stock
  interpreter of jax 0.10 and 0.11 cannot run them. With its wgmma callback taught transposed operands they run
  here: the forward with [G, n, k] weights, and the gradients, whose dlhs and drhs kernels both take the transposed
  forms. jax 0.12's interpreter reads transposed operands itself (nothing is taught) and runs these forms anyway."""
  if not _mosaic_compat.interpreter_reads_transposed():
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(gpu_callbacks, "wgmma", _wgmma_reading_transposed_operands)
  monkeypatch.setattr(gmm_mosaic, "_transpose_in_kernel", lambda interpret: True)
  jax.clear_caches()  # traces of the HBM-transposing form must not be reused
  try:
    m, k, n = 150, 64, 128
    sizes = jnp.asarray(_group_sizes("uneven_with_empty", m, 8))
    lhs, rhs_t, _ = _operands(m, k, n, 8, seed=5, transpose_rhs=True)
    out = gmm_mosaic.gmm(lhs, rhs_t, sizes, tiling=TILE, transpose_rhs=True, interpret=INTERPRET)
    _assert_close(out, reference.gmm_reference(lhs, rhs_t, sizes, transpose_rhs=True))
    lhs, rhs, cotangent = _operands(m, k, n, 8, seed=6)
    ours = lambda x, w: ops_mosaic.gmm(x, w, sizes, tiling=TILE, interpret=INTERPRET)
    ref = lambda x, w: reference.gmm_reference(x, w, sizes)
    dlhs, drhs = jax.grad(_loss(ours, cotangent), argnums=(0, 1))(lhs, rhs)
    dlhs_ref, drhs_ref = jax.grad(_loss(ref, cotangent), argnums=(0, 1))(lhs.astype(jnp.float32),
                                                                         rhs.astype(jnp.float32))
    _assert_close(dlhs, dlhs_ref.astype(lhs.dtype), lhs.dtype)
    _assert_close(drhs, drhs_ref.astype(rhs.dtype), rhs.dtype)
  finally:
    jax.clear_caches()


# A tiny MoE layer: T*K = 26 sorted rows (not a tile multiple), D and F far below a tile (padded).
T, D, E, K, F = 13, 16, 6, 2, 8


def _moe_inputs(key):
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  x = jax.random.normal(k1, (T, D)).astype(jnp.bfloat16)
  w_gate_up = (jax.random.normal(k2, (E, D, 2 * F)) * D ** -0.5).astype(jnp.bfloat16)
  w_down = (jax.random.normal(k3, (E, F, D)) * F ** -0.5).astype(jnp.bfloat16)
  ids = jax.vmap(lambda k: jax.random.permutation(k, E - 2)[:K])(jax.random.split(k4, T)).astype(jnp.int32)
  combine = jax.random.uniform(k5, (T, K), minval=0.1, maxval=1.0)
  probe = jax.random.normal(jax.random.fold_in(key, 9), (T, D))
  return x, ids, combine, w_gate_up, w_down, probe  # experts 4 and 5 idle


def _moe_value_and_grads(backend, x, ids, combine, w_gate_up, w_down, probe):
  def loss(x, combine, w_gate_up, w_down):
    y = dispatch.routed_experts(x, ids, combine, w_gate_up, w_down, backend=backend, compute_dtype=jnp.bfloat16)
    return jnp.sum(probe * y.astype(jnp.float32)), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, combine, w_gate_up,
                                                                                         w_down)
  return (y,) + grads


def test_dispatch_pallas_mosaic_matches_dense():
  """model.dispatch='pallas_mosaic' in a MoE layer (bf16 compute): the values and gradients of `dense`, the
  reference every dispatch backend is held to, in the same dtype. The values agree exactly here; the gradients
  within a bf16 unit or two of scale (0.5% measured), because the Mosaic backward rounds the incoming float32
  gradient to bf16 (as the Triton one does) where dense's dots take it in float32. A wrong expert, a missing row
  or a lost gradient term moves them by far more (a 3% error fails)."""
  inputs = _moe_inputs(jax.random.key(0))
  ours = _moe_value_and_grads("pallas_mosaic", *inputs)
  names = ("y", "dx", "dcombine", "dw_gate_up", "dw_down")
  for got, want, name in zip(ours, _moe_value_and_grads("dense", *inputs), names):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), name
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * scale, err_msg=name)
  # Idle experts get exactly zero weight gradients.
  assert not np.any(np.asarray(ours[3][4:])) and not np.any(np.asarray(ours[4][4:]))


def test_dispatch_selection_and_bad_combinations(monkeypatch):
  assert dispatch.resolve_backend("pallas_mosaic") == "pallas_mosaic"
  # 'auto' keeps its choice: nothing is measured on a GPU yet.
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  assert dispatch.resolve_backend("auto") == "pallas"
  monkeypatch.undo()
  ModelConfig(dispatch="pallas_mosaic", compute_dtype="bfloat16").validate()
  ModelConfig(dispatch="pallas_mosaic", compute_dtype="float16").validate()
  with pytest.raises(ConfigError, match=r"^model\.dispatch='pallas_mosaic' needs model\.compute_dtype bfloat16"):
    ModelConfig(dispatch="pallas_mosaic", compute_dtype="float32").validate()
  with pytest.raises(ValueError, match=r"model\.dispatch='pallas_mosaic' needs model\.compute_dtype"):
    dispatch.grouped_geglu(jnp.zeros((4, D)), jnp.array([4, 0, 0, 0, 0, 0], jnp.int32), jnp.zeros((E, D, 2 * F)),
                           jnp.zeros((E, F, D)), backend="pallas_mosaic", compute_dtype=jnp.float32)


def test_compiled_kernels_refuse_a_gpu_without_wgmma(monkeypatch):
  """On a GPU backend, a card that is not Hopper fails in one line naming the key, before any lowering."""
  device = lambda kind, capability: types.SimpleNamespace(platform="gpu", device_kind=kind,
                                                          compute_capability=capability)
  assert gmm_mosaic.device_problem(device("NVIDIA H100 80GB HBM3", "9.0")) is None
  assert gmm_mosaic.device_problem(device("NVIDIA H200", "9.0")) is None
  assert "compute capability 8.0" in gmm_mosaic.device_problem(device("NVIDIA A100-SXM4-80GB", "8.0"))
  assert "Hopper" in gmm_mosaic.device_problem(device("NVIDIA B200", "10.0"))
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gmm_mosaic.jax, "devices", lambda: [device("NVIDIA A100-SXM4-80GB", "8.0")])
  with pytest.raises(ConfigError, match=r"^model\.dispatch='pallas_mosaic' needs a Hopper GPU .*A100.*use 'pallas'"):
    dispatch.grouped_geglu(jnp.zeros((4, D)), jnp.array([4, 0, 0, 0, 0, 0], jnp.int32), jnp.zeros((E, D, 2 * F)),
                           jnp.zeros((E, F, D)), backend="pallas_mosaic", compute_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"gmm \(Mosaic GPU\) needs a Hopper GPU"):
    gmm_mosaic.gmm(jnp.zeros((64, 64), jnp.bfloat16), jnp.zeros((1, 64, 64), jnp.bfloat16),
                   jnp.array([64], jnp.int32), interpret=False)


def test_kernel_argument_errors():
  x = jnp.zeros((64, 64), jnp.bfloat16)
  sizes = jnp.array([64], jnp.int32)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    gmm_mosaic.gmm(x.astype(jnp.float32), jnp.zeros((1, 64, 64), jnp.float32), sizes, interpret=True)
  with pytest.raises(ValueError, match="one dtype"):
    gmm_mosaic.gmm(x, jnp.zeros((1, 64, 64), jnp.float16), sizes, interpret=True)
  with pytest.raises(ValueError, match="has k=32"):
    gmm_mosaic.gmm(x, jnp.zeros((1, 32, 64), jnp.bfloat16), sizes, interpret=True)
  with pytest.raises(ValueError, match="multiple of 64"):
    gmm_mosaic.MosaicTiling(64, 32, 64)
  with pytest.raises(ValueError, match="at most 256"):
    gmm_mosaic.MosaicTiling(64, 64, 512)


def _lowered_for_cuda(fn, *args) -> str:
  """fn lowered for CUDA on this machine: jax runs the full Mosaic GPU lowering (layout inference, wgmma and TMA
  emission, the SMEM budget) and stops before ptxas. Skips where this jaxlib cannot lower for CUDA."""
  return cuda_lowering.lowered_for_cuda(fn, *args).as_text()


LOWERING_ONLY = pytest.mark.skipif(ON_GPU, reason="lowering runs in the CPU suite; on a GPU the kernels run")


# The bench shapes (bench/gmm_gpu.py): DiffusionGemma's experts (k=2816, F=704) and Mixtral's (4096, 14336).
@LOWERING_ONLY
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m,k,n", [(150, 80, 72), (65536, 2816, 1408), (8192, 4096, 14336)])
def test_kernels_lower_to_mosaic_gpu(dtype, m, k, n):
  """Catches what interpret mode cannot: register layouts, wgmma shapes and swizzles, the transposed-operand
  wgmma the interpreter does not run, and SMEM beyond a Hopper block's 227 KiB."""
  sds = jax.ShapeDtypeStruct
  x, w, w_t, sizes = sds((m, k), dtype), sds((8, k, n), dtype), sds((8, n, k), dtype), sds((8,), jnp.int32)

  def grads(transpose_rhs):
    return lambda x, w, s: jax.grad(lambda x, w: ops_mosaic.gmm(x, w, s, transpose_rhs=transpose_rhs,
                                                                interpret=False).sum(), argnums=(0, 1))(x, w)

  calls = lambda text: text.count("@mosaic_gpu_v2")
  forward = _lowered_for_cuda(lambda x, w, s: gmm_mosaic.gmm(x, w, s, interpret=False), x, w, sizes)
  assert calls(forward) == 1 and "callback" not in forward
  assert calls(_lowered_for_cuda(grads(False), x, w, sizes)) == 2  # dlhs (transposed rhs in SMEM), drhs
  assert calls(_lowered_for_cuda(grads(True), x, w_t, sizes)) == 2
  assert calls(_lowered_for_cuda(lambda a, b, s: gmm_mosaic.tgmm(a, b, s, interpret=False),
                                 sds((k, m), dtype), sds((m, n), dtype), sizes)) == 1


@LOWERING_ONLY
@pytest.mark.parametrize("k", [64, 192])
def test_lowered_kernels_wait_and_fence_before_reusing_smem(k):
  """What interpret mode's synchronous wgmma and TMA cannot show: in the lowered gmm (plain and transposed rhs) and
  tgmm (both lhs layouts) a wgmma_wait sits between each wgmma and the TMA load that refills a pipeline slot, the
  masked lhs tile is fenced (commit_smem) before its wgmma, and the output's TMA store is waited for. k=192 (three
  64-deep steps, delay_release=1) pipelines; k=64 (one step) does not."""
  sds = jax.ShapeDtypeStruct
  m, n, dtype = 150, 72, jnp.bfloat16
  sizes = sds((8,), jnp.int32)
  kernels = {
      "gmm": (lambda x, w, s: gmm_mosaic.gmm(x, w, s, tiling=TILE, interpret=False),
              sds((m, k), dtype), sds((8, k, n), dtype)),
      "gmm transpose_rhs": (lambda x, w, s: gmm_mosaic.gmm(x, w, s, tiling=TILE, transpose_rhs=True, interpret=False),
                            sds((m, k), dtype), sds((8, n, k), dtype)),
      "tgmm": (lambda a, b, s: gmm_mosaic.tgmm(a, b, s, tiling=TILE, interpret=False),
               sds((k, m), dtype), sds((m, n), dtype)),
      "tgmm transpose_lhs": (lambda a, b, s: gmm_mosaic.tgmm(a, b, s, tiling=TILE, transpose_lhs=True,
                                                             interpret=False), sds((m, k), dtype), sds((m, n), dtype)),
  }
  for name, (fn, a, b) in kernels.items():
    modules = mosaic_sync.kernel_modules(_lowered_for_cuda(fn, a, b, sizes))
    assert len(modules) == 1, name
    assert mosaic_sync.hazards(modules[0]) == [], name


@LOWERING_ONLY
def test_lowering_refuses_a_block_beyond_shared_memory():
  """The SMEM check the previous test relies on is real: an oversized tiling fails to lower."""
  sds = jax.ShapeDtypeStruct
  tiling = gmm_mosaic.MosaicTiling(256, 256, 256, max_concurrent_steps=8)
  with pytest.raises(Exception, match="exceeds available shared memory"):
    _lowered_for_cuda(lambda x, w, s: gmm_mosaic.gmm(x, w, s, tiling=tiling, interpret=False),
                      sds((1024, 1024), jnp.bfloat16), sds((4, 1024, 1024), jnp.bfloat16), sds((4,), jnp.int32))
  table = gmm_mosaic.choose_mosaic_tiling("gmm", 65536, 2816, 1408)
  assert table.shared_bytes("gmm") <= 232448 and table.max_concurrent_steps >= 2


@pytest.mark.parametrize("m,k,n", [(65536, 2816, 1408), (65536, 704, 2816), (8192, 4096, 14336)])
def test_table_tiles_divide_the_bench_shapes(m, k, n):
  """No padded copy of an operand at the model's shapes: every launch's blocks divide its dimensions (DiffusionGemma's
  704-wide expert dimension takes 64-deep steps and 64-wide drhs tiles rather than 128)."""
  launches = [("gmm", m, k, n), ("gmm", m, n, k), ("tgmm", m, k, n)]  # forward, dlhs, drhs
  for kernel, mm, kk, nn in launches:
    tiling = gmm_mosaic.choose_mosaic_tiling(kernel, mm, kk, nn)
    assert mm % tiling.block_m == 0 and kk % tiling.block_k == 0 and nn % tiling.block_n == 0, (kernel, tiling)
    assert tiling.shared_bytes(kernel) <= 232448
  assert gmm_mosaic.choose_mosaic_tiling("tgmm", m, 704, 2816).block_k == 64
  assert gmm_mosaic.choose_mosaic_tiling("gmm", m, 2816, 1408) == gmm_mosaic.MosaicTiling(128, 64, 128, 4)
  assert gmm_mosaic.choose_mosaic_tiling("gmm", 150, 80, 72).block_n == 128  # not a multiple of 64: padded


@LOWERING_ONLY
def test_train_step_with_pallas_mosaic_dispatch_lowers_to_mosaic_gpu(monkeypatch):
  """The whole jitted train step with model.dispatch='pallas_mosaic' (bf16 compute), lowered for a GPU from this
  CPU: the MoE's two grouped matmuls forward and their four gradients become Mosaic GPU kernels, nothing else
  fails to lower, and no interpreter callback is left in the program."""
  from diffgemma_jax.config import base_config  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.train import compile_train_step, synthetic_batch  # pylint: disable=import-outside-toplevel

  resolve = _mosaic_compat.interpret_params
  # What `interpret=None` resolves to on a GPU backend; traces cached for this CPU must not be reused.
  monkeypatch.setattr(_mosaic_compat, "interpret_params", lambda i: None if i is None else resolve(i))
  jax.clear_caches()
  try:
    config = base_config()
    config.model.update(dispatch="pallas_mosaic", compute_dtype="bfloat16")
    config.train.update(batch_size=2, seq_len=48)
    compiled = compile_train_step(config, mask_id=4)  # base_config's objective: masked diffusion
    batch = synthetic_batch(2, 48, compiled.model_config.vocab_size)
    text = _lowered_for_cuda(compiled.step, compiled.abstract_state, batch, jax.random.key(0))
  finally:
    jax.clear_caches()
  # One kernel per distinct call site: the layers share them (scanned, or one outlined function per shape).
  assert text.count("@mosaic_gpu_v2") in (6, 6 * compiled.model_config.num_layers)
  assert "callback" not in text


@pytest.mark.skipif(ON_GPU, reason="the GPU check runs the benchmark itself")
def test_benchmark_reports_the_mosaic_ratio_in_interpret_mode(tmp_path):
  """bench/gmm_gpu.py with the Mosaic column named (interpret mode leaves it out unless named): checked against
  the reference like the others, and its speed reported as ratios over the Triton kernels and ragged_dot."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
  import gmm_gpu  # pylint: disable=import-outside-toplevel
  out = tmp_path / "gmm.json"
  assert gmm_gpu.main(["--interpret", "--small", "--runs", "1", "--warmup", "0", "--shapes", "diffgemma_up_small",
                       "--impls", "ours,ours_mosaic,xla_ragged_dot", "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  assert len(report["results"]) == 2
  for row in report["results"]:
    for direction in ("forward", "dlhs", "drhs"):
      mosaic = row[direction]["ours_mosaic"]
      assert mosaic["ok"] and mosaic["max_rel_error"] < 1e-2, mosaic
      ratios = row["mosaic_ratios"][direction]
      assert ratios["ours"] == pytest.approx(mosaic["tflops"] / row[direction]["ours"]["tflops"])
      assert ratios["xla_ragged_dot"] > 0

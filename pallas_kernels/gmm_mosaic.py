"""Grouped matmuls on the Pallas Mosaic GPU backend (Hopper, sm_90a): gmm (forward / dlhs) and tgmm (weight gradient).

The same API and semantics as the Triton kernels in gmm.py (rows sorted by group, `group_sizes` over all shards,
`group_offset`, rows of other groups giving zeros, empty groups giving zero weight gradients), written the way
Hopper wants a matmul: operand tiles move GMEM -> SMEM by TMA under `plgpu.emit_pipeline` (barriers, several
steps in flight), `wgmma` multiplies them into a float32 accumulator, and the finished tile goes SMEM -> GMEM by
TMA. Warpgroup lowering semantics (one warpgroup per block), as jax's own Hopper kernels use.

gmm: one block per (row tile, column tile). The block runs one pipeline over k per local group its row tile
overlaps (the entries of `metadata.tile_groups`), all into one accumulator; where a tile is shared with other
groups, the rows that are not this group's are zeroed in the SMEM lhs tile before the wgmma. Every block then
writes its whole output tile once with one TMA store, and rows of no local group come out zero. A tile inside one
group (the common case) runs one pipeline and masks nothing.

tgmm: one block per (local group, k tile, n tile). The pipeline walks the row tiles the group overlaps; the
first and last may hold other groups' rows, which are zeroed in SMEM before the wgmma (the grouped rows are the
contraction, so the mask must sit on an operand). Empty groups skip the pipeline and store zeros.

TMA tiles are static, so m, k and n are padded with zeros to whole tiles in the wrapper when they are not
multiples (never, for the usual model widths and token counts; a copy when they are). Operands are bf16 or f16
(wgmma's 16-bit forms; f32 operands would run as TF32 and are refused), accumulation is float32.

Interpret mode (`interpret=True`, or a parameters instance; the default off a GPU) runs these kernels on the
CPU through jax's Mosaic GPU interpreter; see docs/grouped_matmul.md for what it checks and what only a GPU can.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu

from pallas_kernels import _mosaic_compat
from pallas_kernels import metadata
from pallas_kernels.tiling import device_shared_memory_bytes

# Every block side is a multiple of 64: a warpgroup's wgmma covers 64 accumulator rows, and a 64-element minor
# dimension of a 16-bit tile is the 128-byte row that the widest TMA/wgmma swizzle wants.
BLOCK_MULTIPLE = 64
MAX_BLOCK_N = 256  # wgmma's widest N.
OPERAND_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
  """Blocks of one Mosaic GPU launch.

  gmm: block_m rows x block_n columns of output per block, block_k deep pipeline steps.
  tgmm: block_m grouped rows per pipeline step (the contraction), block_k x block_n of each group's output.
  max_concurrent_steps: pipeline steps in flight (SMEM copies of both operand tiles).
  """
  block_m: int
  block_k: int
  block_n: int
  max_concurrent_steps: int = 4

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % BLOCK_MULTIPLE:
        raise ValueError(f"MosaicTiling.{name}={value!r}: must be a positive multiple of {BLOCK_MULTIPLE} "
                         "(wgmma rows and 128-byte swizzled rows of 16-bit tiles)")
    if self.block_n > MAX_BLOCK_N:
      raise ValueError(f"MosaicTiling.block_n={self.block_n}: wgmma is at most {MAX_BLOCK_N} wide")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"MosaicTiling.max_concurrent_steps={self.max_concurrent_steps}: must be >= 1")

  def shared_bytes(self, kernel: str, operand_bytes: int = 2, out_bytes: int = 4) -> int:
    """SMEM of one block: the pipeline's operand tiles (max_concurrent_steps copies) and the output staging tile.
    The two are scoped one after the other, so a block needs the larger."""
    if kernel == "gmm":
      operands = self.block_m * self.block_k + self.block_k * self.block_n
      out = self.block_m * self.block_n
    else:
      operands = self.block_m * self.block_k + self.block_m * self.block_n
      out = self.block_k * self.block_n
    return max(self.max_concurrent_steps * operands * operand_bytes, out * out_bytes)


# Large-problem choices in the range jax's Hopper ragged-dot kernels tune over (64..192 tiles, 64-deep steps).
_TABLE = {
    "gmm": MosaicTiling(block_m=128, block_k=64, block_n=128, max_concurrent_steps=4),
    "tgmm": MosaicTiling(block_m=64, block_k=128, block_n=128, max_concurrent_steps=4),
}


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _fit(block: int, dim: int) -> int:
  """The block for one dimension: where dim is a multiple of 64, the largest multiple of 64 up to `block` that
  divides it (a 704-wide k takes 64, not 128: no padded copy of the operand); else up to `block`, no larger than
  the dimension rounded up to 64 (the wrapper pads)."""
  if dim % BLOCK_MULTIPLE == 0:
    for candidate in range(block - block % BLOCK_MULTIPLE, 0, -BLOCK_MULTIPLE):
      if dim % candidate == 0:
        return candidate
  return max(BLOCK_MULTIPLE, min(block, _round_up(dim, BLOCK_MULTIPLE)))


def choose_mosaic_tiling(kernel: str, m: int, k: int, n: int, override=None, out_bytes: int = 4,
                         shared_memory_bytes=None) -> MosaicTiling:
  """The table's tiling shrunk to the problem (no block past the padded dimension) and fitted to SMEM (fewer
  steps in flight first). `override`: a MosaicTiling, or (block_m, block_k, block_n), used as given."""
  if isinstance(override, MosaicTiling):
    return override
  if override is not None:
    return MosaicTiling(*override)
  if kernel not in _TABLE:
    raise ValueError(f"kernel={kernel!r}: expected 'gmm' or 'tgmm'")
  base = _TABLE[kernel]
  tiling = dataclasses.replace(base, block_m=_fit(base.block_m, m), block_k=_fit(base.block_k, k),
                               block_n=_fit(base.block_n, n))
  budget = shared_memory_bytes or device_shared_memory_bytes()
  while tiling.shared_bytes(kernel, 2, out_bytes) > budget and tiling.max_concurrent_steps > 2:
    tiling = dataclasses.replace(tiling, max_concurrent_steps=tiling.max_concurrent_steps - 1)
  return tiling


def _swizzle_transforms(minor: int, dtype):
  """Tiling + swizzle of an SMEM tile whose minor dimension has `minor` elements of `dtype`."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plmgpu.find_swizzle(minor * itemsize * 8)
  return (plmgpu.TilingTransform((8, swizzle // itemsize)), plmgpu.SwizzleTransform(swizzle))


def _pipeline_depth(tiling: MosaicTiling, num_steps):
  """(steps in flight, delay_release). A wgmma is asynchronous and issuing the next one does not wait for it: the
  body ends with `plgpu.wgmma_wait(delay_release)`. With delay_release=1 the pipeline refills a slot one step after
  its wgmma was issued, once that step's wait(1) has retired it, so one wgmma stays in flight while the next tiles
  load. With one buffer there is nothing to overlap: delay_release=0, and the body waits for its wgmma (wait(0))."""
  steps = tiling.max_concurrent_steps
  if isinstance(num_steps, int):
    steps = min(steps, num_steps)
  return (steps, 1) if steps > 1 else (1, 0)


def _iota_plus(shape, dim: int, first, compiled: bool):
  """int32 `shape`: first + (index along `dim`) of each entry, in the wgmma register layout when compiled.

  The layout cast is an identity on values that tells Mosaic's layout inference where the iota lives; jax 0.10.2's
  Mosaic GPU interpret mode has no rule for `layout_cast` ("MLIR translation rule for primitive 'layout_cast' not
  found for platform cpu"), so interpreted kernels leave it out.
  """
  iota = lax.broadcasted_iota(jnp.int32, shape, dim)
  if compiled:
    iota = plmgpu.layout_cast(iota, plmgpu.Layout.WGMMA)
  return iota + first


def _transpose_in_kernel(interpret) -> bool:
  """Whether wgmma reads a transposed operand tile as it is (`ref.transpose`), free on Hopper.

  Compiled kernels always do. jax 0.10.2's (and 0.11's) Mosaic GPU interpreter cannot
  (`_mosaic_compat.interpreter_reads_transposed`), so there interpreted kernels get the operand transposed in HBM
  instead and run the untransposed form; jax 0.12's interpreter runs the compiled form.
  """
  return interpret is None or _mosaic_compat.interpreter_reads_transposed()


def _check_operands(name: str, *arrays):
  for array in arrays:
    if jnp.dtype(array.dtype) not in OPERAND_DTYPES:
      raise ValueError(f"{name} (Mosaic GPU): operands must be bfloat16 or float16 (wgmma's 16-bit forms), got "
                       f"{array.dtype}; cast them, or use the Triton kernels for float32")
  if len({jnp.dtype(a.dtype) for a in arrays}) > 1:
    raise ValueError(f"{name} (Mosaic GPU): both operands must have one dtype, got "
                     f"{' and '.join(str(a.dtype) for a in arrays)}")


def device_problem(device=None):
  """Why the compiled kernels cannot run on `device` (default: the default device), or None where they can.

  They use wgmma and TMA as Hopper has them (sm_90a): other NVIDIA generations (Ampere has neither; Blackwell
  multiplies with tcgen05) cannot run them. Off a GPU there is nothing to refuse: lowering for CUDA from a host
  is how the tests check the kernels, and running there is interpret mode's job. A device that reports no compute
  capability is given the benefit of the doubt, as Mosaic GPU itself does (it then assumes 9.0).
  """
  if device is None:
    device = jax.devices()[0]
  if device.platform != "gpu":
    return None
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return None
  if not capability.split(".")[0] == "9":
    return (f"needs a Hopper GPU (compute capability 9.x: wgmma and TMA); this one is {device.device_kind} "
            f"(compute capability {capability})")
  return None


def _check_device(name: str, interpret):
  if interpret is None:  # compiling
    problem = device_problem()
    if problem:
      raise ValueError(f"{name} (Mosaic GPU) {problem}")


def _store_tile(acc, out_view, dtype):
  """An accumulator tile (registers) to `out_view` in HBM: staged in swizzled SMEM, fenced (`commit_smem`) before
  the TMA store reads it, and the store waited for before the SMEM is released."""

  @functools.partial(pl.run_scoped, out_smem=plmgpu.SMEM(acc.shape, dtype,
                                                         transforms=_swizzle_transforms(acc.shape[1], dtype)))
  def _store(out_smem):
    out_smem[...] = acc.astype(out_smem.dtype)
    plmgpu.commit_smem()
    plmgpu.copy_smem_to_gmem(out_smem, out_view)
    plmgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pad_to(array, multiples):
  pads = [(0, _round_up(size, mult) - size) for size, mult in zip(array.shape, multiples)]
  if not any(hi for _, hi in pads):
    return array
  return jnp.pad(array, pads)


_COMPILER_PARAMS = dict(lowering_semantics=plmgpu.LoweringSemantics.Warpgroup)


# ---------------------------------------------------------------------------------------------------------------
# gmm


def _gmm_body(first_ref, end_ref, group_ref, row_start_ref, row_end_ref, lhs_gmem, rhs_gmem, out_gmem, *,
              tiling: MosaicTiling, num_k_steps: int, transpose_rhs: bool, compiled: bool):
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
  mi = lax.axis_index("m")
  ni = lax.axis_index("n")
  row0 = mi * bm
  steps, delay = _pipeline_depth(tiling, num_k_steps)
  lhs_spec = plmgpu.BlockSpec((bm, bk), lambda kk: (mi, kk), transforms=_swizzle_transforms(bk, lhs_gmem.dtype),
                              delay_release=delay)
  if transpose_rhs:
    rhs_spec = plmgpu.BlockSpec((bn, bk), lambda kk: (ni, kk), transforms=_swizzle_transforms(bk, rhs_gmem.dtype),
                                delay_release=delay)
  else:
    rhs_spec = plmgpu.BlockSpec((bk, bn), lambda kk: (kk, ni), transforms=_swizzle_transforms(bn, rhs_gmem.dtype),
                                delay_release=delay)

  def acc_scope(acc_ref):
    def one_group(entry, carry):
      row_start = row_start_ref[entry]
      row_end = row_end_ref[entry]
      straddles = (row_start > row0) | (row_end < row0 + bm)

      def step(_, lhs_smem, rhs_smem):
        # A tile shared with other groups multiplies only this group's rows: zero the rest of the lhs tile (a
        # select, so rows of NaN elsewhere stay out), and the one accumulator sums every group's share.
        @pl.when(straddles)
        def _keep_this_groups_rows():
          rows = _iota_plus((bm, bk), 0, row0, compiled)
          lhs_smem[...] = jnp.where((rows >= row_start) & (rows < row_end), lhs_smem[...],
                                    jnp.zeros((), lhs_smem.dtype))
          plmgpu.commit_smem()

        rhs = rhs_smem.transpose((1, 0)) if transpose_rhs else rhs_smem
        plmgpu.wgmma(acc_ref, lhs_smem, rhs)
        # At most `delay` wgmmas in flight when the step ends: after it the pipeline refills the slot of the step
        # `delay` back, which the wgmma issued there must have finished reading.
        plmgpu.wgmma_wait(delay)

      plmgpu.emit_pipeline(step, grid=(num_k_steps,), in_specs=[lhs_spec, rhs_spec],
                           max_concurrent_steps=steps)(lhs_gmem, rhs_gmem.at[group_ref[entry]])
      # The next group's pipeline reuses these SMEM buffers: let the last wgmma finish reading them first.
      plmgpu.wgmma_wait(0)
      return carry

    # Rows of no local group are never multiplied: the zero-initialised accumulator keeps them zero.
    lax.fori_loop(first_ref[mi], end_ref[mi], one_group, 0)
    return acc_ref[...]

  acc = pl.run_scoped(acc_scope, plmgpu.ACC((bm, bn), jnp.float32))
  _store_tile(acc, out_gmem.at[pl.ds(row0, bm), pl.ds(ni * bn, bn)], out_gmem.dtype)


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "tiling", "transpose_rhs", "interpret"))
def gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=None, group_offset=None,
        transpose_rhs=False, interpret=None):
  """Grouped matmul on Mosaic GPU: out[r] = lhs[r] @ rhs[g - group_offset] for each row r of group g.

  Args:
    lhs: [m, k] bf16 or f16, rows sorted by group.
    rhs: [G_local, k, n], or [G_local, n, k] with transpose_rhs; lhs's dtype.
    group_sizes: int[G], rows per group over all shards; sum(group_sizes) <= m.
    preferred_element_type: output dtype (accumulation is float32).
    tiling: None (the table), a MosaicTiling, or (block_m, block_k, block_n).
    group_offset: first global group this shard owns (rhs[0] is that group). Rows of other groups, and rows
      past sum(group_sizes), come out zero.
    transpose_rhs: rhs is [G_local, n, k] (used for dlhs).
    interpret: None (interpret unless the default backend is a GPU), a bool, or Mosaic GPU interpret-mode
      parameters (_mosaic_compat.interpret_params_class()).

  Returns:
    [m, n] in preferred_element_type.
  """
  m, k, n, num_local_groups = metadata.gmm_shapes(lhs, rhs, group_sizes, transpose_rhs)
  _check_operands("gmm", lhs, rhs)
  out_dtype = jnp.dtype(preferred_element_type or jnp.float32)
  tiling = choose_mosaic_tiling("gmm", m, k, n, tiling, out_bytes=out_dtype.itemsize)
  interpret = _mosaic_compat.interpret_params(interpret)
  _check_device("gmm", interpret)
  group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n

  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  # wgmma reads a transposed rhs tile from SMEM as it is (ref.transpose); the interpreter of jax before 0.12
  # cannot (see _transpose_in_kernel), so there the weights are transposed in HBM and the plain kernel runs.
  in_kernel = transpose_rhs and _transpose_in_kernel(interpret)
  if transpose_rhs and not in_kernel:
    rhs = jnp.swapaxes(rhs, 1, 2)
  lhs_p = _pad_to(lhs, (bm, bk))
  rhs_p = _pad_to(rhs, (1, bn, bk) if in_kernel else (1, bk, bn))
  m_p, k_p = lhs_p.shape
  n_p = _round_up(n, bn)
  pairs = metadata.tile_groups(group_sizes, m, bm, num_local_groups, group_offset)
  body = functools.partial(_gmm_body, tiling=tiling, num_k_steps=k_p // bk, transpose_rhs=in_kernel,
                           compiled=interpret is None)
  out = plmgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m_p, n_p), out_dtype),
      grid=(m_p // bm, n_p // bn),
      grid_names=("m", "n"),
      compiler_params=plmgpu.CompilerParams(**_COMPILER_PARAMS),
      interpret=interpret,
  )(*pairs, lhs_p, rhs_p)
  return out if (m_p, n_p) == (m, n) else out[:m, :n]


# ---------------------------------------------------------------------------------------------------------------
# tgmm


def _tgmm_body(row_start_ref, row_end_ref, lhs_gmem, rhs_gmem, out_gmem, *, tiling: MosaicTiling,
               lhs_rows_major: bool, compiled: bool):
  """lhs_gmem is [m, k] (lhs_rows_major: its tiles go to wgmma transposed) or [k, m]; rhs_gmem is [m, n]."""
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
  gi = lax.axis_index("g")
  ki = lax.axis_index("k")
  ni = lax.axis_index("n")
  row_start = row_start_ref[gi]
  row_end = row_end_ref[gi]
  first_tile = row_start // bm
  num_tiles = (row_end + bm - 1) // bm - first_tile
  steps, delay = _pipeline_depth(tiling, None)
  if lhs_rows_major:
    lhs_spec = plmgpu.BlockSpec((bm, bk), lambda t: (first_tile + t, ki), delay_release=delay,
                                transforms=_swizzle_transforms(bk, lhs_gmem.dtype))
  else:
    lhs_spec = plmgpu.BlockSpec((bk, bm), lambda t: (ki, first_tile + t), delay_release=delay,
                                transforms=_swizzle_transforms(bm, lhs_gmem.dtype))
  rhs_spec = plmgpu.BlockSpec((bm, bn), lambda t: (first_tile + t, ni), delay_release=delay,
                              transforms=_swizzle_transforms(bn, rhs_gmem.dtype))

  def acc_scope(acc_ref):
    def step(indices, lhs_smem, rhs_smem):
      (tile,) = indices
      r0 = (first_tile + tile) * bm

      # The first and last row tiles of a group may hold its neighbours' rows: zero them in the lhs tile.
      @pl.when((r0 < row_start) | (r0 + bm > row_end))
      def _mask_other_groups_rows():
        rows = _iota_plus((bm, bk), 0, r0, compiled) if lhs_rows_major else _iota_plus((bk, bm), 1, r0, compiled)
        lhs_smem[...] = jnp.where((rows >= row_start) & (rows < row_end), lhs_smem[...],
                                  jnp.zeros((), lhs_smem.dtype))
        plmgpu.commit_smem()

      lhs = lhs_smem.transpose((1, 0)) if lhs_rows_major else lhs_smem
      plmgpu.wgmma(acc_ref, lhs, rhs_smem)
      plmgpu.wgmma_wait(delay)  # As in gmm: the slot refilled after this step must be free of wgmma reads.

    @pl.when(row_end > row_start)
    def _():
      plmgpu.emit_pipeline(step, grid=(num_tiles,), in_specs=[lhs_spec, rhs_spec],
                           max_concurrent_steps=steps)(lhs_gmem, rhs_gmem)

    return acc_ref[...]

  acc = pl.run_scoped(acc_scope, plmgpu.ACC((bk, bn), jnp.float32))
  _store_tile(acc, out_gmem.at[gi, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)], out_gmem.dtype)


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "tiling", "num_actual_groups",
                                             "interpret", "transpose_lhs"))
def tgmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=None, group_offset=None,
         num_actual_groups=None, interpret=None, transpose_lhs=False):
  """Transposed grouped matmul (the weight gradient) on Mosaic GPU: out[g] = lhs[:, rows of g] @ rhs[rows of g].

  Args:
    lhs: [k, m]; or [m, k] with transpose_lhs (what the backward pass holds; wgmma reads its tiles transposed).
    rhs: [m, n], rows sorted by group; lhs's dtype (bf16 or f16).
    group_sizes: int[G] over all shards.
    preferred_element_type: output dtype (accumulation is float32).
    tiling: None, a MosaicTiling or (block_m, block_k, block_n); block_m tiles the grouped rows.
    group_offset: first global group to compute.
    num_actual_groups: how many groups from group_offset (default G); empty groups give zeros.
    interpret: as for gmm.

  Returns:
    [num_actual_groups, k, n] in preferred_element_type.
  """
  m, k, n = metadata.tgmm_shapes(lhs, rhs, group_sizes, transpose_lhs)
  _check_operands("tgmm", lhs, rhs)
  num_groups = num_actual_groups if num_actual_groups is not None else group_sizes.shape[0]
  out_dtype = jnp.dtype(preferred_element_type or jnp.float32)
  tiling = choose_mosaic_tiling("tgmm", m, k, n, tiling, out_bytes=out_dtype.itemsize)
  interpret = _mosaic_compat.interpret_params(interpret)
  _check_device("tgmm", interpret)
  group_offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32).reshape(())
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
  if num_groups == 0 or k == 0 or n == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)

  rows_major = transpose_lhs and _transpose_in_kernel(interpret)
  if transpose_lhs and not rows_major:
    lhs = lhs.T
  lhs_p = _pad_to(lhs, (bm, bk) if rows_major else (bk, bm))
  rhs_p = _pad_to(rhs, (bm, bn))
  k_p, n_p = _round_up(k, bk), rhs_p.shape[1]
  bounds = metadata.group_bounds(group_sizes, m, num_groups, group_offset)
  out = plmgpu.kernel(
      functools.partial(_tgmm_body, tiling=tiling, lhs_rows_major=rows_major, compiled=interpret is None),
      out_type=jax.ShapeDtypeStruct((num_groups, k_p, n_p), out_dtype),
      grid=(num_groups, k_p // bk, n_p // bn),
      grid_names=("g", "k", "n"),
      compiler_params=plmgpu.CompilerParams(**_COMPILER_PARAMS),
      interpret=interpret,
  )(*bounds, lhs_p, rhs_p)
  return out if (k_p, n_p) == (k, n) else out[:, :k, :n]

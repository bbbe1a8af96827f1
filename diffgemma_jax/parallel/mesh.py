"""The device mesh of a run, from `config.mesh.shape` and `config.mesh.axes`.

One device is a 1x1x1x1 mesh built by the same code as many, so the single-device path is the sharded path.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.parallel import expert
from diffgemma_jax.parallel.rules import BATCH_AXES, CONTEXT_AXIS

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # the default axes
# `context` (context parallelism: the sequence split over it, keys and values gathered for attention) is optional:
# add it to mesh.axes with its size in mesh.shape (docs/attention.md).
VALID_AXES = MESH_AXES + (CONTEXT_AXIS,)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 by the devices left over; the product must equal the device count."""
  shape = tuple(int(s) for s in shape)
  wildcards = [i for i, s in enumerate(shape) if s == -1]
  if len(wildcards) > 1:
    raise ConfigError(f"mesh.shape={shape}: at most one -1 (the remaining devices) is allowed")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"mesh.shape={shape}: sizes must be positive or -1")
  known = math.prod(s for s in shape if s != -1)
  if wildcards:
    if num_devices % known:
      raise ConfigError(f"mesh.shape={shape}: the fixed sizes multiply to {known}, which does not divide the "
                        f"{num_devices} available devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(f"mesh.shape={shape} holds {math.prod(shape)} devices but {num_devices} are available; "
                      f"make the product equal the device count or put -1 in one place")
  return shape


def make_mesh(shape: Sequence[int] = (1, 1, 1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None, dcn_shape: Sequence[int] = ()) -> Mesh:
  """The mesh `shape` over `axes`. With `dcn_shape` (one size per axis) the mesh is hybrid: `shape` is the part
  inside each host (TPU: each slice), joined by the fast network, and `dcn_shape` how many hosts (slices) each axis
  spans over the slow data-centre network; the mesh is their elementwise product (jax's create_hybrid_device_mesh),
  so only the axes with a dcn size above 1 cross hosts."""
  axes = tuple(axes)
  if len(shape) != len(axes):
    raise ConfigError(f"mesh.shape={tuple(shape)} and mesh.axes={axes} must have the same length")
  unknown = set(axes) - set(VALID_AXES)
  if unknown:
    raise ConfigError(f"mesh.axes: unknown axis name(s) {sorted(unknown)}; valid names are {VALID_AXES}")
  if len(set(axes)) != len(axes):
    raise ConfigError(f"mesh.axes={axes}: each axis name once")
  devices = list(devices if devices is not None else jax.devices())
  if dcn_shape:
    return Mesh(_hybrid_device_array(shape, tuple(int(d) for d in dcn_shape), axes, devices), axes)
  shape = resolve_mesh_shape(shape, len(devices))
  try:  # topology-aware placement where the platform offers it (TPU/GPU slices)
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, axes)


def _hybrid_device_array(shape, dcn_shape: tuple[int, ...], axes, devices) -> np.ndarray:
  if len(dcn_shape) != len(axes) or any(d < 1 for d in dcn_shape):
    raise ConfigError(f"mesh.dcn_shape={dcn_shape}: one positive size per mesh axis {axes} (or () for no split)")
  platform = devices[0].platform
  granules = {getattr(d, "slice_index", 0) if platform == "tpu" else d.process_index for d in devices}
  what = "slices" if platform == "tpu" else "processes (hosts)"
  if len(granules) != math.prod(dcn_shape):
    raise ConfigError(f"mesh.dcn_shape={dcn_shape} spans {math.prod(dcn_shape)} {what}, but the run has "
                      f"{len(granules)}; make its product the number of {what}")
  ici = resolve_mesh_shape(shape, len(devices) // len(granules))
  from jax.experimental import mesh_utils
  try:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices, process_is_granule=platform != "tpu")
  except (ValueError, AssertionError) as e:
    raise ConfigError(f"mesh.shape={tuple(shape)} with mesh.dcn_shape={dcn_shape}: {e}") from None


def mesh_from_config(config, *, training: bool = True, objective_rows: bool = True,
                     eval_batch: tuple[int, str] | None = None, check_eval_batch: bool = True) -> Mesh:
  """The run's mesh over every device of every process, checked against the model and the batch sizes
  (`check_mesh_fits`)."""
  mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes), dcn_shape=tuple(config.mesh.get("dcn_shape", ())))
  check_mesh_fits(config, mesh, training=training, objective_rows=objective_rows, eval_batch=eval_batch,
                  check_eval_batch=check_eval_batch)
  return mesh


def check_mesh_fits(config, mesh: Mesh, *, training: bool = True, objective_rows: bool = True,
                    eval_batch: tuple[int, str] | None = None, check_eval_batch: bool = True) -> None:
  """Errors a user can fix, before anything compiles: experts and batch rows must split evenly over the mesh.
  `objective_rows`: also whether the rows the objective's loss and bound hand the model balance over a context
  axis (`_check_rows_balance`, which traces the objective: about a second); off for a reader that never runs the
  objective (generation), which such rows must not refuse. `eval_batch`: (rows per evaluation batch, the flag
  that set them) of a reader with a batch size of its own (the scorer's `--batch_size`), in place of
  eval.batch_size; `check_eval_batch=False` for a reader with no evaluation batch (generation places a model whose
  batches split where they fit: `Generator.rows_sharding`)."""
  shape = dict(mesh.shape)
  experts = shape.get("expert", 1)
  if int(config.model.num_experts) % experts:
    raise ConfigError(f"model.num_experts={config.model.num_experts} is not divisible by the expert mesh axis "
                      f"({experts}, mesh.shape={tuple(config.mesh.shape)}); choose an expert size that divides it")
  if experts > 1:
    expert.check_collective_backend(mesh, config.model.get("expert_collective", "all_to_all"))
  context = shape.get(CONTEXT_AXIS, 1)
  if int(config.train.seq_len) % context:
    raise ConfigError(f"train.seq_len={config.train.seq_len} is not divisible by the context mesh axis ({context}, "
                      f"mesh.shape={tuple(config.mesh.shape)}); use a multiple of {context}")
  if context > 1 and context_load_balance(config) and objective_rows:
    _check_rows_balance(config, mesh)
  rows = math.prod(shape.get(a, 1) for a in BATCH_AXES)
  eval_rows, eval_key = eval_batch or (int(config.eval.batch_size), "eval.batch_size")
  if check_eval_batch and int(eval_rows) % rows:
    raise ConfigError(f"{eval_key}={eval_rows} is not divisible by the data-parallel size {rows} "
                      f"(data x fsdp x expert of mesh.shape={tuple(config.mesh.shape)}); use a multiple of {rows}")
  if not training:
    return
  batch, accum = int(config.train.batch_size), int(config.train.grad_accum_steps)
  if (batch // accum) % rows:
    raise ConfigError(f"train.batch_size={batch} (per micro-batch: {batch // accum}, train.grad_accum_steps="
                      f"{accum}) is not divisible by the data-parallel size {rows} (data x fsdp x expert of "
                      f"mesh.shape={tuple(config.mesh.shape)}); use a multiple of {rows * accum}")
  _, slices = batch_slice(mesh)
  if batch % slices:
    raise ConfigError(f"train.batch_size={batch} does not split over the {slices} processes (hosts) that hold "
                      f"different rows")


def _check_rows_balance(config, mesh: Mesh) -> None:
  """Refuses a run whose objective hands the layers rows that the context axis splits unevenly but that do not cut
  into 2C equal chunks, so would silently run in row order: `balance.unbalanced` of the masks the objective's loss
  and bound attend under (`objectives.attended`), the decision the model itself takes on them."""
  from diffgemma_jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.objectives import make_objective  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.objectives.attended import attended_masks  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.parallel.balance import unbalanced  # pylint: disable=import-outside-toplevel
  seq_len = int(config.train.seq_len)
  objective = make_objective(config.objective, mask_id=0)  # the mask id changes no mask
  masks = attended_masks(objective, ModelConfig.from_config_dict(config.model), seq_len)
  lengths = sorted({mask.q.length for mask in unbalanced(mesh, masks)})
  if not lengths:
    return
  context = dict(mesh.shape)[CONTEXT_AXIS]
  block = f" and objective.block_size={config.objective.block_size}" if getattr(objective, "block_size", 0) else ""
  raise ConfigError(f"the {objective.name} objective at train.seq_len={seq_len}{block} attends over rows of "
                    f"{' and '.join(map(str, lengths))} tokens, which do not cut into the 2 x {context} equal chunks "
                    f"that mesh.context_load_balance=True deals to the {context} context shards; choose sizes whose "
                    f"rows are multiples of {2 * context} or set mesh.context_load_balance=False")


def context_load_balance(config) -> bool:
  """The run's `mesh.context_load_balance` (on for a config from before the key: a run's saved config)."""
  return bool(config.mesh.get("context_load_balance", True))


def batch_slices(devices: Any, axis_names: Sequence[str]) -> tuple[dict[int, int], int]:
  """({process index: the slice of each global batch it loads}, number of slices) for a mesh's device array.

  A process's devices hold some of the batch's row shards (their coordinates on the batch axes; every other axis,
  tensor or context, holds the same rows). Processes holding
  different rows load different slices, slice p for process p where every process holds its own rows; processes
  holding the same rows (a `tensor` or `context` axis across hosts makes them replicas) must load the same rows
  (`jax.make_array_from_process_local_data`: replicas' data must be identical), so they share one slice, numbered
  by the group's lowest process index. Processes whose rows partly overlap cannot be fed: a ConfigError."""
  devices = np.asarray(devices)
  row_dims = [i for i, name in enumerate(axis_names) if name in BATCH_AXES]
  owned: dict[int, set] = {}
  for index, device in np.ndenumerate(devices):
    owned.setdefault(device.process_index, set()).add(tuple(index[i] for i in row_dims))
  groups: dict[frozenset, list[int]] = {}
  for process, rows in sorted(owned.items()):
    groups.setdefault(frozenset(rows), []).append(process)
  sets = list(groups)
  for i, a in enumerate(sets):
    for b in sets[i + 1:]:
      if a & b:
        raise ConfigError(f"mesh.shape/mesh.axes {tuple(axis_names)}: processes {groups[a]} and {groups[b]} hold "
                          f"overlapping but different batch rows; lay the mesh out so that each host holds whole "
                          f"row shards (put data, fsdp or expert across hosts with mesh.dcn_shape)")
  if len({len(rows) for rows in sets}) > 1:
    raise ConfigError(f"mesh.shape/mesh.axes {tuple(axis_names)}: hosts hold different numbers of batch row shards")
  # `groups` is ordered by each group's lowest process index (processes were added in order)
  return {process: slice_index for slice_index, members in enumerate(groups.values()) for process in members}, len(sets)


def batch_slice(mesh: Mesh) -> tuple[int, int]:
  """(the slice of each global batch this process loads, number of slices): `batch_slices` for this process."""
  slices, count = batch_slices(mesh.devices, mesh.axis_names)
  return slices[jax.process_index()], count


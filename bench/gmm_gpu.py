"""Grouped-matmul benchmark: forward, dlhs and drhs TFLOP/s of our Pallas kernels against the alternatives.

  python bench/gmm_gpu.py [--json OUT.json]               # GPU, the issue-4 shapes, bf16
  python bench/gmm_gpu.py --interpret --small --runs 3    # CPU smoke run (the tests do this)
  python bench/gmm_gpu.py --sweep [--shapes mixtral_up]   # ours only, over candidate tilings (tuning the table)

For each shape and routing (balanced, skewed), every implementation's forward, dlhs and drhs are checked
against the float32 jnp reference on a random sample of output entries, then timed: the median of --runs
timed calls after warm-up, each call on the next of a few input copies so caches do not flatter.
TFLOP/s counts 2*m*k*n per direction whatever the routing. Implementations:
  ours             pallas_kernels.gmm (custom_vjp over the gmm / tgmm kernels), the Pallas Triton backend
  ours_mosaic      pallas_kernels.ops_mosaic.gmm, the same on the Pallas Mosaic GPU backend (TMA + wgmma, Hopper;
                   bf16 only; with --interpret it runs in Mosaic GPU interpret mode, only when --impls names it)
  xla_ragged_dot   jax.lax.ragged_dot, XLA's default lowering
  jax_pallas_triton_ragged_dot   jax.lax.ragged_dot with jax_ragged_dot_use_gpu_pallas_triton_lowering (GPU only)
  tokamax          tokamax.ragged_dot, when importable
  dense_ceiling    one dense [m,k] x [k,n] matmul of the same FLOPs
Each row also reports ours_mosaic's speed as a ratio (its TFLOP/s over ours' and over xla_ragged_dot's) per
direction, measured in the same run.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchlib  # pylint: disable=wrong-import-position
import pallas_kernels as pk  # pylint: disable=wrong-import-position
from pallas_kernels import gmm_mosaic  # pylint: disable=wrong-import-position
from pallas_kernels import ops_mosaic  # pylint: disable=wrong-import-position
from pallas_kernels import reference  # pylint: disable=wrong-import-position

TRITON_FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
DIRECTIONS = ("forward", "dlhs", "drhs")
ROUTINGS = ("balanced", "skewed")
# Sampled check: relative to the largest reference magnitude; bf16 outputs round at about 4e-3.
CHECK_TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  m: int  # routed rows
  num_groups: int
  k: int
  n: int


SHAPES = (
    Shape("mixtral_up", m=8192, num_groups=8, k=4096, n=14336),
    Shape("diffgemma_up", m=65536, num_groups=128, k=2816, n=1408),
    Shape("diffgemma_down", m=65536, num_groups=128, k=704, n=2816),
)
SMALL_SHAPES = (
    Shape("mixtral_up_small", m=96, num_groups=4, k=48, n=40),
    Shape("diffgemma_up_small", m=128, num_groups=8, k=40, n=24),
    Shape("diffgemma_down_small", m=128, num_groups=8, k=24, n=40),
)


def routing_group_sizes(routing: str, m: int, num_groups: int, seed: int) -> np.ndarray:
  """Random rows per group summing to m: near-uniform ('balanced') or Zipf-like ('skewed', some empty)."""
  rng = np.random.default_rng(seed)
  if routing == "balanced":
    probabilities = np.full(num_groups, 1.0 / num_groups)
  elif routing == "skewed":
    probabilities = 1.0 / np.arange(1, num_groups + 1) ** 1.5
    rng.shuffle(probabilities)
    probabilities /= probabilities.sum()
  else:
    raise ValueError(f"routing={routing!r}: expected one of {ROUTINGS}")
  return rng.multinomial(m, probabilities).astype(np.int32)


# --- implementations: each maps (lhs, rhs, group_sizes) -> [m, n] and is differentiated with jax.vjp. ---

def parse_tiling(text: str):
  """'BM,BK,BN[,WARPS,STAGES]' -> Tiling, '' -> None (the table in pallas_kernels/tiling.py)."""
  if not text:
    return None
  values = [int(v) for v in text.split(",")]
  names = ("block_m", "block_k", "block_n", "num_warps", "num_stages")
  return pk.Tiling(**dict(zip(names, values)))


def _ours(interpret, gmm_tiling=None, tgmm_tiling=None):
  tilings = (gmm_tiling, gmm_tiling, tgmm_tiling)
  return lambda lhs, rhs, sizes: pk.gmm(lhs, rhs, sizes, preferred_element_type=lhs.dtype, tiling=tilings,
                                        interpret=interpret)


def parse_mosaic_tiling(text: str):
  """'BM,BK,BN[,STEPS]' -> MosaicTiling, '' -> None (the table in pallas_kernels/gmm_mosaic.py)."""
  if not text:
    return None
  return gmm_mosaic.MosaicTiling(*[int(v) for v in text.split(",")])


def _ours_mosaic(interpret, gmm_tiling=None, tgmm_tiling=None):
  tilings = (gmm_tiling, gmm_tiling, tgmm_tiling)
  return lambda lhs, rhs, sizes: ops_mosaic.gmm(lhs, rhs, sizes, preferred_element_type=lhs.dtype, tiling=tilings,
                                                interpret=interpret)


def _ragged_dot(lhs, rhs, sizes):
  return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=lhs.dtype)


def _tokamax():
  tokamax = benchlib.import_tokamax()
  return lambda lhs, rhs, sizes: tokamax.ragged_dot(lhs, rhs, group_sizes=sizes,
                                                    preferred_element_type=lhs.dtype)


def _dense(lhs, rhs, sizes):
  del sizes  # The ceiling: all rows through one weight matrix, the same 2*m*k*n FLOPs.
  return jnp.dot(lhs, rhs[0], preferred_element_type=lhs.dtype)


class Unavailable(Exception):
  """An implementation that cannot run here; the reason goes into the report."""


@dataclasses.dataclass
class Impl:
  name: str
  fns: object  # {direction: jitted fn} or Unavailable
  flags: dict  # jax config values set while it is traced and run


def implementations(interpret: bool, gmm_tiling=None, tgmm_tiling=None, mosaic_tilings=(None, None),
                    dtype="bfloat16", named=()):
  """Impl records in report order; jitted once so balanced and skewed routings share compilations."""
  on_gpu = jax.default_backend() == "gpu"
  impls = [("ours", _ours(interpret, gmm_tiling, tgmm_tiling), {})]
  if dtype != "bfloat16":
    impls.append(("ours_mosaic", Unavailable("wgmma's 16-bit operands only (--dtype bfloat16)"), {}))
  elif interpret and "ours_mosaic" not in named:
    impls.append(("ours_mosaic", Unavailable("interpret mode is slow: name it in --impls"), {}))
  else:
    impls.append(("ours_mosaic", _ours_mosaic(interpret, *mosaic_tilings), {}))
  impls.append(("xla_ragged_dot", _ragged_dot, {TRITON_FLAG: False}))
  if not on_gpu:
    impls.append(("jax_pallas_triton_ragged_dot", Unavailable("GPU only"), {}))
  elif not hasattr(jax.config, TRITON_FLAG):
    impls.append(("jax_pallas_triton_ragged_dot", Unavailable(f"{TRITON_FLAG} not in jax {jax.__version__}"), {}))
  else:
    impls.append(("jax_pallas_triton_ragged_dot", _ragged_dot, {TRITON_FLAG: True}))
  try:
    impls.append(("tokamax", _tokamax(), {}))
  except Exception as e:  # pylint: disable=broad-except  (ImportError, or a dependency of another version)
    impls.append(("tokamax", Unavailable(f"not importable: {type(e).__name__}: {str(e)[:200]}"), {}))
  impls.append(("dense_ceiling", _dense, {}))
  return [Impl(name, fn if isinstance(fn, Unavailable) else direction_fns(fn),
               {k: v for k, v in flags.items() if hasattr(jax.config, k)}) for name, fn, flags in impls]


def direction_fns(fn):
  """Jitted forward / dlhs / drhs of fn; each bwd jit keeps only the gradient it returns (the rest is DCE'd)."""
  forward = jax.jit(fn)
  dlhs = jax.jit(lambda lhs, rhs, sizes, ct: jax.vjp(lambda x: fn(x, rhs, sizes), lhs)[1](ct)[0])
  drhs = jax.jit(lambda lhs, rhs, sizes, ct: jax.vjp(lambda w: fn(lhs, w, sizes), rhs)[1](ct)[0])
  return {"forward": forward, "dlhs": dlhs, "drhs": drhs}


class _ConfigOverride:
  def __init__(self, flags):
    self.flags = flags
    self.saved = {}

  def __enter__(self):
    for name, value in self.flags.items():
      self.saved[name] = getattr(jax.config, name)
      jax.config.update(name, value)

  def __exit__(self, *exc):
    for name, value in self.saved.items():
      jax.config.update(name, value)


# --- checks against the reference on a sample of the outputs ---

@dataclasses.dataclass
class Problem:
  shape: Shape
  routing: str
  group_sizes: np.ndarray
  copies: list  # [(lhs, rhs, sizes, ct)] rotated between timed calls
  sample_rows: np.ndarray
  sample_cols_n: np.ndarray
  sample_cols_k: np.ndarray
  sample_groups: np.ndarray


def make_problem(shape: Shape, routing: str, dtype, num_copies: int, seed: int, sample: int) -> Problem:
  sizes = routing_group_sizes(routing, shape.m, shape.num_groups, seed)
  copies = []
  for copy in range(num_copies):
    keys = jax.random.split(jax.random.key(seed * 101 + copy), 3)
    lhs = jax.random.normal(keys[0], (shape.m, shape.k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(keys[1], (shape.num_groups, shape.k, shape.n), jnp.float32)
           / np.sqrt(shape.k)).astype(dtype)
    ct = jax.random.normal(keys[2], (shape.m, shape.n), jnp.float32).astype(dtype)
    copies.append((lhs, rhs, jnp.asarray(sizes), ct))
  rng = np.random.default_rng(seed)
  pick = lambda size: np.sort(rng.choice(size, min(size, sample), replace=False))
  nonempty = np.flatnonzero(sizes)
  groups = {int(np.argmax(sizes)), int(np.argmin(sizes)), int(rng.choice(nonempty))}
  return Problem(shape, routing, sizes, copies, pick(shape.m), pick(shape.n), pick(shape.k),
                 np.array(sorted(groups)))


def _sampled_reference(problem: Problem, direction: str):
  lhs, rhs, sizes, ct = problem.copies[0]
  rows = problem.sample_rows
  row_groups = reference.local_group_of_rows(sizes, problem.shape.m)[rows]
  if direction == "forward":
    return reference.gmm_rows_reference(lhs[rows], row_groups, rhs[:, :, problem.sample_cols_n])
  if direction == "dlhs":  # dlhs[r] = ct[r] @ rhs[g]^T
    return reference.gmm_rows_reference(ct[rows], row_groups, rhs[:, problem.sample_cols_k, :],
                                        transpose_rhs=True)
  per_group = [reference.tgmm_reference(lhs[:, problem.sample_cols_k].T, ct[:, problem.sample_cols_n], sizes,
                                        group_offset=int(g), num_actual_groups=1)[0]
               for g in problem.sample_groups]
  return jnp.stack(per_group)


def _sampled_output(problem: Problem, direction: str, out):
  if direction == "forward":
    return out[problem.sample_rows][:, problem.sample_cols_n]
  if direction == "dlhs":
    return out[problem.sample_rows][:, problem.sample_cols_k]
  return out[problem.sample_groups][:, problem.sample_cols_k][:, :, problem.sample_cols_n]


def check(problem: Problem, direction: str, out) -> float:
  """Largest error on the sample, relative to the largest reference magnitude."""
  expected = np.asarray(_sampled_reference(problem, direction), np.float32)
  actual = np.asarray(jnp.asarray(_sampled_output(problem, direction, out), jnp.float32))
  if not np.isfinite(actual).all():
    return float("inf")
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


# --- timing ---

def _call(fn, direction, args):
  lhs, rhs, sizes, ct = args
  return fn(lhs, rhs, sizes) if direction == "forward" else fn(lhs, rhs, sizes, ct)


def median_seconds(fn, direction, copies, warmup: int, runs: int, max_seconds: float):
  """(median seconds, timed calls). Slow baselines get fewer calls (at least 5) to stay within max_seconds."""
  for i in range(warmup):
    start = time.perf_counter()
    jax.block_until_ready(_call(fn, direction, copies[i % len(copies)]))
    if max_seconds and (time.perf_counter() - start) * (runs + warmup) > max_seconds:
      runs = max(5, int(max_seconds / max(time.perf_counter() - start, 1e-9)) - warmup)
  times = []
  for i in range(runs):
    args = copies[(i + 1) % len(copies)]
    start = time.perf_counter()
    jax.block_until_ready(_call(fn, direction, args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), runs


def measure(problem: Problem, name, impl, args):
  """{direction: result} for one implementation on one problem; failures are recorded, never raised."""
  shape = problem.shape
  flops = 2.0 * shape.m * shape.k * shape.n
  if isinstance(impl.fns, Unavailable):
    return {d: {"ok": False, "skipped": str(impl.fns)} for d in DIRECTIONS}
  results = {}
  with _ConfigOverride(impl.flags):
    for direction in DIRECTIONS:
      fn = impl.fns[direction]
      result = {}
      try:
        out = jax.block_until_ready(_call(fn, direction, problem.copies[0]))
        if name == "dense_ceiling":
          result.update(ok=True, note="not a grouped result: timed only")
        else:
          result["max_rel_error"] = check(problem, direction, out)
          result["ok"] = result["max_rel_error"] <= CHECK_TOLERANCE[args.dtype]
        del out
        seconds, runs = median_seconds(fn, direction, problem.copies, args.warmup, args.runs,
                                       args.max_seconds_per_measurement)
        result.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, runs=runs)
      except Exception as e:  # pylint: disable=broad-except
        result.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
      if impl.flags.get(TRITON_FLAG):
        result["lowering"] = _lowering_of(fn, direction, problem.copies[0])
      results[direction] = result
  return results


def _lowering_of(fn, direction, args) -> str:
  """Whether jax's Pallas-Triton ragged_dot lowering was used, or it fell back to XLA's."""
  try:
    text = _call(fn.lower, direction, args).as_text()
  except Exception as e:  # pylint: disable=broad-except
    return f"unknown ({type(e).__name__})"
  return "pallas_triton" if "triton" in text.lower() else "fell back to XLA default"


def _dtype_and_shapes(args):
  """The input dtype and the shapes selected by --dtype, --small and --shapes."""
  shapes = SMALL_SHAPES if args.small else SHAPES
  if args.shapes:
    shapes = [s for s in shapes if s.name in args.shapes.split(",")]
  return (jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32), shapes


def _report_header(args) -> dict:
  """What every report records about the run: when, which commit and jax, the device, the timing settings."""
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": benchlib.commit(), "jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "dtype": args.dtype, "interpret": args.interpret,
          "runs": args.runs, "warmup": args.warmup, "copies": args.copies}


# --- tiling sweep: ours under each candidate tiling, to tune pallas_kernels/tiling.py's table on a card ---

# (gmm tiling for forward and dlhs, tgmm tiling for drhs) as (block_m, block_k, block_n, num_warps, num_stages);
# the first pair is close to the table's bf16 choice. Pairs that do not fit the card's shared memory are skipped.
SWEEP_CANDIDATES = (
    ((128, 64, 256, 8, 3), (64, 128, 128, 4, 4)),
    ((128, 64, 128, 4, 4), (128, 128, 128, 8, 3)),
    ((128, 32, 128, 4, 4), (64, 64, 128, 4, 4)),
    ((64, 64, 128, 4, 4), (32, 128, 128, 4, 4)),
    ((128, 128, 128, 8, 3), (64, 128, 64, 4, 4)),
    ((256, 64, 128, 8, 3), (128, 64, 128, 8, 3)),
    ((64, 64, 64, 4, 3), (64, 64, 64, 4, 3)),
)


def sweep(args) -> dict:
  """{shape: [{gmm_tiling, tgmm_tiling, forward/dlhs/drhs results}], best: {shape: {direction: tiling}}}, the
  balanced routing only; every result checked against the reference as in the main table."""
  dtype, shapes = _dtype_and_shapes(args)
  candidates = SWEEP_CANDIDATES[:args.candidates] if args.candidates else SWEEP_CANDIDATES
  budget = pk.tiling.device_shared_memory_bytes()
  itemsize = jnp.dtype(dtype).itemsize
  report = {**_report_header(args), "sweep": {}, "best": {}}
  started = time.perf_counter()
  for shape_index, shape in enumerate(shapes):
    problem = make_problem(shape, "balanced", dtype, args.copies, seed=10 * shape_index, sample=args.sample)
    rows = []
    for gmm_t, tgmm_t in candidates:
      gmm_tiling, tgmm_tiling = pk.Tiling(*gmm_t), pk.Tiling(*tgmm_t)
      row = {"gmm_tiling": list(gmm_t), "tgmm_tiling": list(tgmm_t)}
      if (pk.pipeline_shared_bytes("gmm", gmm_tiling, (itemsize, itemsize)) > budget
          or pk.pipeline_shared_bytes("tgmm", tgmm_tiling, (itemsize, itemsize)) > budget):
        row["skipped"] = f"over the card's {budget} bytes of shared memory per block"
      elif args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
        row["skipped"] = f"time budget of {args.time_budget_s}s spent"
      else:
        impl = Impl("ours", direction_fns(_ours(args.interpret, gmm_tiling, tgmm_tiling)), {})
        row.update(measure(problem, "ours", impl, args))
        print(f"{shape.name} gmm {gmm_t} tgmm {tgmm_t}: " + "  ".join(
            f"{d} {row[d].get('tflops', float('nan')):.4g}{'' if row[d].get('ok') else ' FAILED'}"
            for d in DIRECTIONS), flush=True)
      rows.append(row)
    report["sweep"][shape.name] = rows
    best = {}
    for direction in DIRECTIONS:
      good = [r for r in rows if r.get(direction, {}).get("ok")]
      if good:
        top = max(good, key=lambda r: r[direction]["tflops"])
        best[direction] = {"tiling": top["tgmm_tiling" if direction == "drhs" else "gmm_tiling"],
                           "tflops": top[direction]["tflops"]}
    report["best"][shape.name] = best
    del problem
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  return report


# --- driver ---

def run(args) -> dict:
  dtype, shapes = _dtype_and_shapes(args)
  impls = implementations(args.interpret, parse_tiling(args.gmm_tiling), parse_tiling(args.tgmm_tiling),
                          (parse_mosaic_tiling(args.mosaic_gmm_tiling), parse_mosaic_tiling(args.mosaic_tgmm_tiling)),
                          args.dtype, tuple(args.impls.split(",")) if args.impls else ())
  if args.impls:
    impls = [impl for impl in impls if impl.name in args.impls.split(",")]
  report = {
      **_report_header(args),
      "ours_tiling": {"gmm": args.gmm_tiling or "table", "tgmm": args.tgmm_tiling or "table"},
      "tflops_definition": "2*m*k*n / median seconds, per direction", "results": [],
  }
  started = time.perf_counter()
  for shape_index, shape in enumerate(shapes):
    for routing_index, routing in enumerate(ROUTINGS):
      row = {"shape": shape.name, "routing": routing, **dataclasses.asdict(shape)}
      if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
        row["skipped"] = f"time budget of {args.time_budget_s}s spent"
        report["results"].append(row)
        continue
      problem = make_problem(shape, routing, dtype, args.copies, seed=10 * shape_index + routing_index,
                             sample=args.sample)
      row["group_sizes"] = {"min": int(problem.group_sizes.min()), "max": int(problem.group_sizes.max()),
                            "empty": int((problem.group_sizes == 0).sum())}
      per_impl = {impl.name: measure(problem, impl.name, impl, args) for impl in impls}
      for direction in DIRECTIONS:
        row[direction] = {name: per_impl[name][direction] for name in per_impl}
      row["mosaic_ratios"] = mosaic_ratios(row)
      report["results"].append(row)
      del problem
      print_row(row, impls)
      if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))  # Partial results survive a kill.
  report["wall_s"] = time.perf_counter() - started
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  return report


def mosaic_ratios(row) -> dict:
  """{direction: {over: ours_mosaic TFLOP/s / over's TFLOP/s}} for the Triton kernels and XLA's ragged_dot, where
  both ran here and passed the reference check (a ratio above 1: the Mosaic kernel is faster)."""
  ratios = {}
  for direction in DIRECTIONS:
    results = row.get(direction, {})
    mosaic = results.get("ours_mosaic", {})
    if not (mosaic.get("ok") and "tflops" in mosaic):
      continue
    for over in ("ours", "xla_ragged_dot"):
      other = results.get(over, {})
      if other.get("ok") and other.get("tflops"):
        ratios.setdefault(direction, {})[over] = mosaic["tflops"] / other["tflops"]
  return ratios


def print_row(row, impls):
  names = [impl.name for impl in impls]
  print(f"\n{row['shape']} ({row['routing']}): m={row['m']} G={row['num_groups']} k={row['k']} n={row['n']} "
        f"group sizes {row.get('group_sizes')}")
  print("  " + f"{'TFLOP/s':8s}" + "".join(f"{name[:22]:>24s}" for name in names))
  for direction in DIRECTIONS:
    cells = []
    for name in names:
      result = row[direction][name]
      if "tflops" in result:
        cells.append(f"{result['tflops']:.4g}" + ("" if result["ok"] else " WRONG"))
      else:
        cells.append((result.get("skipped") or result.get("error", "?"))[:22])
    print("  " + f"{direction:8s}" + "".join(f"{cell:>24s}" for cell in cells))
  for direction, ratios in row.get("mosaic_ratios", {}).items():
    print(f"  mosaic {direction}: " + ", ".join(f"{ratio:.3g}x {over}" for over, ratio in ratios.items()))
  sys.stdout.flush()


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", nargs="?", const="gmm_gpu.json", default=None,
                      help="write the report as JSON to this path (default gmm_gpu.json)")
  parser.add_argument("--interpret", action="store_true", help="run our kernels in Pallas interpret mode")
  parser.add_argument("--small", action="store_true", help="tiny shapes (with --interpret on CPU)")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  parser.add_argument("--runs", type=int, default=20, help="timed calls per measurement (median taken)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--copies", type=int, default=3, help="input copies rotated between calls")
  parser.add_argument("--sample", type=int, default=128, help="rows/cols of each output checked")
  parser.add_argument("--shapes", default="", help="comma-separated shape names (default all)")
  parser.add_argument("--impls", default="", help="comma-separated implementation names (default all)")
  parser.add_argument("--gmm-tiling", default="", help="ours' forward/dlhs tiling BM,BK,BN[,WARPS,STAGES]")
  parser.add_argument("--tgmm-tiling", default="", help="ours' drhs tiling BM,BK,BN[,WARPS,STAGES]")
  parser.add_argument("--mosaic-gmm-tiling", default="", help="ours_mosaic's forward/dlhs tiling BM,BK,BN[,STEPS]")
  parser.add_argument("--mosaic-tgmm-tiling", default="", help="ours_mosaic's drhs tiling BM,BK,BN[,STEPS]")
  parser.add_argument("--max-seconds-per-measurement", type=float, default=10.0,
                      help="fewer timed calls (at least 5) for implementations slower than this allows")
  parser.add_argument("--sweep", action="store_true",
                      help="time ours under each of SWEEP_CANDIDATES' tilings instead of the comparison table")
  parser.add_argument("--candidates", type=int, default=0, help="with --sweep: only the first N candidates")
  parser.add_argument("--time-budget-s", type=float, default=0.0,
                      help="skip remaining shapes once this many seconds have passed (0: no limit)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.sweep:
    report = sweep(args)
    failed = [(name, r["gmm_tiling"], d) for name, rows in report["sweep"].items() for r in rows
              for d in DIRECTIONS if d in r and not r[d].get("ok")]
    if failed:
      print(f"\ncandidates that failed (error or reference check): {failed}")
    print(json.dumps(report["best"], indent=1))
    return 1 if failed else 0
  report = run(args)
  wrong = [(r["shape"], r["routing"], d, name) for r in report["results"] for d in DIRECTIONS if d in r
           for name, res in r[d].items() if "max_rel_error" in res and not res["ok"]]
  if wrong:
    print(f"\nresults that failed the reference check: {wrong}")
  ours_failed = [w for w in wrong if w[3] in ("ours", "ours_mosaic")]
  return 1 if ours_failed else 0


if __name__ == "__main__":
  sys.exit(main())

"""What the benchmark scripts share: the commit measured, the machine's load around a run, timing, tokamax, a local S3
server and the bytes s3fs fetches from it.

A CPU timing is only comparable to another taken on an idle machine: every CPU benchmark records the load average
(`os.getloadavg`, 1/5/15 minutes) before and after its run with `MachineLoad` and flags a run whose 1-minute
load exceeded LOAD_LIMIT at either end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types

LOAD_LIMIT = 1.5
H100_BF16_PEAK = 989e12  # dense bfloat16 FLOP/s of one H100 SXM


def gpu_1b_consumption() -> float:
  """Training tokens per second pretrain_gpu_1b's step consumes on one H100 until a GPU measurement exists: its
  train FLOPs per token (`diffgemma-inspect`) at 40% of the bf16 peak. Needs the repository root on sys.path."""
  from configs.pretrain_gpu_1b import get_config  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from diffgemma_jax.model.inspect import flops_per_token  # pylint: disable=import-outside-toplevel
  c = get_config()
  flops = flops_per_token(ModelConfig.from_config_dict(c.model), int(c.train.seq_len))["train_flops_per_token"]
  return 0.4 * H100_BF16_PEAK / flops


def commit() -> str:
  """The checkout's commit; DIFFGEMMA_COMMIT names it where the tree was copied without .git (a device machine)."""
  if os.environ.get("DIFFGEMMA_COMMIT"):
    return os.environ["DIFFGEMMA_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


class MachineLoad:
  """`load = MachineLoad()` before the timed work (or `with MachineLoad() as load:` around it), then
  `load.report()` / `load.line()`: the load averages before and after and whether the machine was loaded (1-minute
  load above LOAD_LIMIT at either end). "After" is read when the `with` block ends, else at the first report."""

  def __init__(self):
    self.before = os.getloadavg()
    self.after = None

  def __enter__(self) -> "MachineLoad":
    return self

  def __exit__(self, *exc) -> None:
    self.after = os.getloadavg()

  def report(self) -> dict:
    if self.after is None:
      self.after = os.getloadavg()
    after = self.after
    loaded = max(self.before[0], after[0]) > LOAD_LIMIT
    return {"load_average_before": [round(x, 2) for x in self.before],
            "load_average_after": [round(x, 2) for x in after], "cpus": os.cpu_count(),
            "machine_loaded": loaded}

  def line(self) -> str:
    report = self.report()
    text = (f"load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in report['load_average_before'])}, "
            f"after {' '.join(f'{x:.2f}' for x in report['load_average_after'])}")
    if report["machine_loaded"]:
      text += (f"  MACHINE LOADED (1-minute load > {LOAD_LIMIT}): other processes shared the CPUs; these timings "
               f"are not those of an idle machine")
    return text


def before_now_report(rows: dict, load: MachineLoad, **settings) -> dict:
  """A memory benchmark's JSON report: the commit, the date, its `settings`, the "before" and "now" rows (each with
  "peak_mb" and "seconds"), their ratios (now / before) and the machine's load."""
  before, now = rows["before"], rows["now"]
  return {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **settings, **rows,
          "peak_ratio": round(now["peak_mb"] / before["peak_mb"], 3),
          "time_ratio": round(now["seconds"] / max(before["seconds"], 1e-3), 3), **load.report()}


def median_seconds(call, *, warmup: int, runs: int, max_seconds: float = 0.0) -> tuple[float, int]:
  """(median seconds of `call()`, which must block until its work is done, and how many timed calls): after
  `warmup` calls; a slow `call` gets fewer timed calls (at least 3) to stay within `max_seconds`."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  for _ in range(warmup):
    start = time.perf_counter()
    call()
    took = time.perf_counter() - start
    if max_seconds and took * runs > max_seconds:
      runs = max(3, int(max_seconds / max(took, 1e-9)))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), runs


def _stub_xprof_if_absent():
  """tokamax's package __init__ imports xprof (a 32 MB profiler) for tokamax's own benchmarking helpers, which
  the kernels never call; where xprof is not installed, that one import is satisfied by an empty module."""
  try:
    import xprof.cli.tools  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    names = ("xprof", "xprof.cli", "xprof.cli.tools", "xprof.cli.tools.get_kernel_stats_tool")
    modules = [types.ModuleType(name) for name in names]
    for parent, child in zip(modules, modules[1:]):
      setattr(parent, child.__name__.rsplit(".", 1)[1], child)
    sys.modules.update({module.__name__: module for module in modules})


def import_tokamax():
  """The tokamax module, or ImportError where it is not installed."""
  if importlib.util.find_spec("tokamax") is None:  # no stub modules left behind where tokamax is absent
    raise ImportError("No module named 'tokamax'")
  _stub_xprof_if_absent()
  import tokamax  # pylint: disable=import-outside-toplevel
  return tokamax


def start_local_s3(bucket: str = "bench") -> subprocess.Popen:
  """moto's S3 server on a free port, in a process of its own, holding `bucket`; points the AWS variables at it."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                    AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
  import boto3  # pylint: disable=import-outside-toplevel
  deadline = time.time() + 60
  while True:
    try:
      boto3.client("s3").create_bucket(Bucket=bucket)
      return server
    except Exception:  # noqa: BLE001 -- not listening yet
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        raise
      time.sleep(0.2)


@contextlib.contextmanager
def counted_s3_fetches():
  """Within the block, the size of every fetch s3fs makes (a buffered file's range, a ranged cat_file) is appended
  to the list it yields. A client binds its sync calls to its async ones as it is made, so the block's clients are
  new ones, and none made in it is kept after."""
  import s3fs  # pylint: disable=import-outside-toplevel
  import s3fs.core  # pylint: disable=import-outside-toplevel
  fetched: list[int] = []
  fetch_range, cat_file = s3fs.core.S3File._fetch_range, s3fs.core.S3FileSystem._cat_file

  def counted_range(self, start, end):
    data = fetch_range(self, start, end)
    fetched.append(len(data))
    return data

  async def counted_cat(self, path, version_id=None, start=None, end=None):
    data = await cat_file(self, path, version_id=version_id, start=start, end=end)
    fetched.append(len(data))
    return data

  s3fs.core.S3File._fetch_range, s3fs.core.S3FileSystem._cat_file = counted_range, counted_cat
  s3fs.S3FileSystem.clear_instance_cache()
  try:
    yield fetched
  finally:
    s3fs.core.S3File._fetch_range, s3fs.core.S3FileSystem._cat_file = fetch_range, cat_file
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def bucket_and_scratch(url: str, default: str, prefix: str):
  """(the bucket folder a benchmark uses, a scratch folder): `url`, or without it `default` in a local S3 server
  (`start_local_s3`) stopped at the end; the scratch folder is deleted at the end."""
  server = None if url else start_local_s3(default.split("/")[2])
  scratch = tempfile.mkdtemp(prefix=prefix)
  try:
    yield (url or default).rstrip("/"), scratch
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
    if server is not None:
      server.kill()

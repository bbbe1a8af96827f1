"""Multi-host start-up: JAX's distributed runtime from the config or the environment.

Every process of a run calls `initialize_distributed(config)` before touching a device. Where the settings come from,
first match wins:
  1. `distributed.coordinator_address` / `num_processes` / `process_id` in the config;
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what launch/multihost/local.sh
     sets);
  3. a cluster JAX detects by itself with more than one process: SLURM (launch/multihost/slurm.sbatch), Open MPI
     (`mpirun`), Kubernetes (indexed Jobs / JobSet; JAX needs the `kubernetes` package: `pip install jax[k8s]`),
     Cloud TPU pod slices (GCE and GKE); the run logs which one it found;
  4. none of these: one process, nothing to start.
After it, `jax.devices()` lists every process's devices and the mesh spans them all; each process feeds its own
rows of every batch and all processes write each checkpoint together (Orbax coordinates them).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Mapping

import jax

from diffgemma_jax.errors import ConfigError, CoordinatorUnreachableError

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


# XLA:CPU's concurrency-optimised scheduler lets independent collectives run at once; across processes (gloo)
# concurrent collectives corrupt each other's buffers (seen: expert weights of a (2, 2, 2, 1) mesh differing from run
# to run by ~1e-3 after 3 steps, never on one process). Multi-process runs turn it off; it only changes XLA:CPU's
# schedule, so GPU runs are unaffected.
CPU_SERIAL_COLLECTIVES_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def serialise_cpu_collectives(environ=os.environ) -> None:
  """Adds CPU_SERIAL_COLLECTIVES_FLAG to XLA_FLAGS unless the scheduler is set there already (call before the
  first computation: XLA reads the flags when it creates its first client)."""
  flags = environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
    environ["XLA_FLAGS"] = f"{flags} {CPU_SERIAL_COLLECTIVES_FLAG}".strip()


def distributed_settings(config=None, env: Mapping[str, str] | None = None) -> dict | None:
  """(address, num_processes, process_id, timeout) of an explicitly configured multi-process run, {} for a cluster
  JAX should detect, or None for a single process."""
  env = os.environ if env is None else env
  section = config.get("distributed") if config is not None and hasattr(config, "get") else None
  address = (section.coordinator_address if section is not None else "") or env.get(ENV_ADDRESS, "")
  timeout = int(section.initialization_timeout_s) if section is not None else 300
  if address:
    def number(key, env_key):
      value = section[key] if section is not None and int(section[key]) >= 0 else env.get(env_key)
      if value is None or str(value).strip() == "":
        raise ConfigError(f"distributed.coordinator_address={address!r} is set but distributed.{key} is not "
                          f"(set it in the config or as ${env_key})")
      return int(value)

    num_processes = number("num_processes", ENV_NUM_PROCESSES)
    process_id = number("process_id", ENV_PROCESS_ID)
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"distributed.process_id={process_id} must lie in [0, distributed.num_processes="
                        f"{num_processes})")
    return dict(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                initialization_timeout=timeout)
  cluster = detect_cluster(env)
  if cluster is not None and cluster[1] > 1:
    return dict(initialization_timeout=timeout, cluster=cluster[0], cluster_processes=cluster[1])
  return None


# JAX's cluster environments (jax._src.clusters) by class name, as the run names them in its log.
CLUSTER_NAMES = {"SlurmCluster": "SLURM", "OmpiCluster": "Open MPI", "Mpi4pyCluster": "MPI (mpi4py)",
                 "GceTpuCluster": "Cloud TPU (GCE)", "GkeTpuCluster": "Cloud TPU (GKE)", "K8sCluster": "Kubernetes"}


def detect_cluster(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
  """(name, process count) of the first cluster environment JAX's own auto-detection finds (the one
  `jax.distributed.initialize()` without arguments would use), or None. `env` replaces the process environment
  while JAX's detectors look (tests)."""
  from jax._src import clusters  # pylint: disable=import-outside-toplevel (no public API names the detected one)
  saved = None
  if env is not None and env is not os.environ:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
  try:
    for cluster in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if cluster.__name__ not in CLUSTER_NAMES:
        continue
      try:
        if cluster.is_env_present():
          return CLUSTER_NAMES[cluster.__name__], int(cluster.get_process_count())
      except Exception:  # pylint: disable=broad-except (a detector that cannot run is not this cluster)
        continue
    return None
  finally:
    if saved is not None:
      os.environ.clear()
      os.environ.update(saved)


def initialize_distributed(config=None, env: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process run described by the config or environment; False (nothing done) for one process."""
  settings = distributed_settings(config, env)
  if settings is None or (settings.get("num_processes") == 1):
    return False
  if _is_initialized():
    return True
  cluster = settings.pop("cluster", None)
  processes = settings.pop("cluster_processes", None)
  address = settings.get("coordinator_address", f"(detected from the {cluster} environment, {processes} processes)")
  who = f"process {settings['process_id']} of {settings['num_processes']}" if "process_id" in settings else \
      "this process"
  timeout = settings["initialization_timeout"]
  # The runtime aborts the whole process (no Python exception) when the coordinator does not answer, so the
  # other processes first check that its port accepts connections and fail here, naming the address.
  if settings.get("process_id", 0) != 0:
    started = time.monotonic()
    wait_for_port(address, timeout, who)
    settings["initialization_timeout"] = max(1, int(timeout - (time.monotonic() - started)))
  print(f"{who}: joining the run through the coordinator at {address} (timeout {timeout} s)", file=sys.stderr,
        flush=True)
  serialise_cpu_collectives()
  try:
    jax.distributed.initialize(**settings)
  except Exception as e:  # pylint: disable=broad-except (the runtime raises plain RuntimeErrors)
    raise CoordinatorUnreachableError(
        f"{who} could not join the run through the coordinator at {address} within {timeout} s "
        f"(distributed.initialization_timeout_s): {type(e).__name__}: {e}") from e
  return True


def wait_for_port(address: str, timeout_s: float, who: str = "this process") -> None:
  """Returns once `host:port` accepts a TCP connection; CoordinatorUnreachableError after `timeout_s`."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"distributed.coordinator_address={address!r}: expected host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise CoordinatorUnreachableError(
            f"{who} could not reach the coordinator at {address} within {timeout_s:g} s "
            f"(distributed.initialization_timeout_s; last error: {e}). Start process 0 first and check that "
            f"the address is process 0's host and the port is open from here") from None
      time.sleep(0.2)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Every process waits here until all have arrived (a no-op for one process).

  The runtime's key-value barrier takes a timeout, unlike `multihost_utils.sync_global_devices`, whose collective
  gives up after ~30 s on CPU: too short while process 0 builds a dataset the others are waiting for.
  """
  if jax.process_count() == 1:
    return
  client = runtime_client()
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def runtime_client():
  """The JAX distributed runtime's client of this process (its barriers and the job's key-value store), or None
  (one process, or a JAX that keeps it elsewhere)."""
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel (no public API exposes it)
    return distributed.global_state.client
  except (ImportError, AttributeError):
    return None


def _is_initialized() -> bool:
  check = getattr(jax.distributed, "is_initialized", None)
  return bool(check()) if check is not None else False


def shutdown_distributed() -> None:
  if _is_initialized():
    jax.distributed.shutdown()

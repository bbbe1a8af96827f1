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

import inspect
import os
import socket
import sys
import time
import uuid
from typing import Mapping

import jax

from diffgemma_jax.errors import ConfigError, CoordinatorUnreachableError
from diffgemma_jax.parallel.failures import stop_watching, watch_peers

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
  common = dict(initialization_timeout=timeout, **_heartbeat(section))
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
    return dict(coordinator_address=address, num_processes=num_processes, process_id=process_id, **common)
  cluster = detect_cluster(env)
  if cluster is not None and cluster[1] > 1:
    return dict(common, cluster=cluster[0], cluster_processes=cluster[1])
  return None


HEARTBEAT_KEY = "distributed.heartbeat_timeout_s"
JAX_HEARTBEAT_DEFAULT = 100


def _heartbeat(section) -> dict:
  """`jax.distributed.initialize`'s heartbeat_timeout_seconds from `distributed.heartbeat_timeout_s` (a config from
  before the key: JAX's default); {} where JAX's default is asked for of a jax without the argument."""
  value = section.get("heartbeat_timeout_s", JAX_HEARTBEAT_DEFAULT) if section is not None else JAX_HEARTBEAT_DEFAULT
  try:
    seconds = int(value)
  except (TypeError, ValueError):
    seconds = 0
  if seconds < 1 or seconds != value:
    raise ConfigError(f"{HEARTBEAT_KEY}={value!r}: give a whole number of seconds >= 1 (JAX's default is "
                      f"{JAX_HEARTBEAT_DEFAULT})")
  if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
    return dict(heartbeat_timeout_seconds=seconds)
  if seconds != JAX_HEARTBEAT_DEFAULT:
    raise ConfigError(f"{HEARTBEAT_KEY}={seconds}: this jax ({jax.__version__}) sets no heartbeat timeout; leave "
                      f"it at {JAX_HEARTBEAT_DEFAULT}")
  return {}


# JAX's cluster environments (jax._src.clusters) by class name, as the run names them in its log.
CLUSTER_NAMES = {"SlurmCluster": "SLURM", "OmpiCluster": "Open MPI", "Mpi4pyCluster": "MPI (mpi4py)",
                 "GceTpuCluster": "Cloud TPU (GCE)", "GkeTpuCluster": "Cloud TPU (GKE)", "K8sCluster": "Kubernetes"}


def detect_cluster(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
  """(name, process count) of the first cluster environment JAX's own auto-detection finds (the one
  `jax.distributed.initialize()` without arguments would use), or None. `env` replaces the process environment
  while JAX's detectors look (tests)."""
  return _detect(env, lambda cluster: (CLUSTER_NAMES[cluster.__name__], int(cluster.get_process_count())))


def _detect(env: Mapping[str, str] | None, read):
  """`read(cluster)` of the first cluster environment JAX's auto-detection finds, or None."""
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
          return read(cluster)
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
  if is_joined():
    watch_peers()
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
  watch_peers()  # from here a process failing alone ends every process at once (parallel/failures.py)
  from diffgemma_jax.compile_cache import leave_cache_if_joined_cpu  # pylint: disable=import-outside-toplevel
  leave_cache_if_joined_cpu()
  return True


def launch_process(config=None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
  """(index, count) of this process among the processes its launch started: JAX's process index and count once
  it has joined the distributed runtime; else what the launch says (`distributed.process_id` / `num_processes` of
  the config or $JAX_PROCESS_ID / $JAX_NUM_PROCESSES with a coordinator, or the task of a cluster JAX detects:
  SLURM's `srun`, `mpirun`, ...), so each of N copies of a command that never joins the runtime (a reader that
  `srun` started on every node) knows whether it is the first; (0, 1) for a single process."""
  if is_joined():
    return jax.process_index(), jax.process_count()
  env = os.environ if env is None else env
  section = config.get("distributed") if config is not None and hasattr(config, "get") else None
  key = (tuple(sorted(env.items())), None if section is None else tuple(sorted(section.items())))
  if key not in _LAUNCHES:  # a cluster's detector may ask a metadata server: once per environment
    settings = distributed_settings(config, env)
    if settings is None:
      _LAUNCHES[key] = None
    elif "process_id" in settings:
      _LAUNCHES[key] = int(settings["process_id"]), int(settings["num_processes"])
    else:
      _LAUNCHES[key] = _detect(env, lambda cluster: (int(cluster.get_process_id()), int(cluster.get_process_count())))
  found = _LAUNCHES[key]
  if found is None:  # a runtime that joined by itself (a TPU pod's) is known once the backends are up
    return (jax.process_index(), jax.process_count()) if backends_started() else (0, 1)
  return found


_LAUNCHES: dict = {}  # launch_process's answers by environment and distributed section

ENV_SIDE_ADDRESS, ENV_SIDE_PORT = "MASTER_ADDR", "MASTER_PORT"


def side_channel_address(config=None, env: Mapping[str, str] | None = None) -> str:
  """`host:port` for a service of our own between the processes of a launch that do not join JAX's runtime (the
  data-parallel harness's torch.distributed group): $MASTER_ADDR:$MASTER_PORT where both are set (torch's
  convention); else the coordinator's host (`distributed.coordinator_address`, $JAX_COORDINATOR_ADDRESS, or what
  JAX derives for a cluster it detects) with the coordinator's port + 1. ConfigError when none says."""
  env = os.environ if env is None else env
  if env.get(ENV_SIDE_ADDRESS) and env.get(ENV_SIDE_PORT):
    return f"{env[ENV_SIDE_ADDRESS]}:{env[ENV_SIDE_PORT]}"
  settings = distributed_settings(config, env)
  address = (settings or {}).get("coordinator_address")
  if settings and not address:
    def coordinator(cluster):
      try:
        return cluster.get_coordinator_address(timeout_secs=None, override_coordinator_port=None)
      except TypeError:  # a JAX whose detectors take no port override
        return cluster.get_coordinator_address(timeout_secs=None)
    address = _detect(env, coordinator)
  host, _, port = (address or "").rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"no address for the processes of this launch to meet at: set ${ENV_SIDE_ADDRESS} and "
                      f"${ENV_SIDE_PORT}, or distributed.coordinator_address / ${ENV_ADDRESS} (port + 1 is used)")
  return f"{host}:{int(port) + 1}"


def is_first_process(config=None, env: Mapping[str, str] | None = None) -> bool:
  """Whether this process writes what a run writes once (a reader's --output and what it prints, a partial-results
  file, a workdir's one-of files): process 0 of its launch (`launch_process`). Every other process of a
  multi-process run computes its share of every collective as process 0 does and writes nothing of these, so a
  shared filesystem or a bucket never sees N writers of one file, and a folder on each host's own disk only
  process 0's."""
  return launch_process(config, env)[0] == 0


def check_shared_folder(path: str, key: str) -> None:
  """In a multi-process run: fails on every process, naming `key` and the processes, when a process does not see
  a file process 0 has just written in the local folder `path` (a folder on each host's own disk, or a mount
  that differs between hosts); a run's workdir must be one folder for all of them (every process writes each
  checkpoint's shards there, and reads the run's config and tokenizer from it). A collective: every process calls
  it. Bucket URLs and single processes pass at once."""
  from diffgemma_jax import storage  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1 or storage.is_url(path):
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  token = int(multihost_utils.broadcast_one_to_all(np.asarray(int.from_bytes(os.urandom(3), "little"), np.int32)))
  probe = os.path.join(os.path.abspath(path), f".diffgemma-shared-{token:06x}")
  unwritable = None
  if jax.process_index() == 0:  # a failure here must not leave the others waiting at the barrier
    try:
      os.makedirs(os.path.dirname(probe), exist_ok=True)
      with open(probe, "w") as f:
        f.write(str(token))
    except OSError as e:
      unwritable = e.strerror or type(e).__name__
  barrier(f"diffgemma_shared_folder_written_{token}")
  try:
    with open(probe) as f:
      sees = f.read() == str(token)
  except OSError:
    sees = False
  seen = np.asarray(multihost_utils.process_allgather(np.asarray(sees, np.int32))).reshape(-1)
  if jax.process_index() == 0 and os.path.exists(probe):
    os.remove(probe)
  blind = [p for p, ok in enumerate(seen) if not ok]
  if not seen[0]:
    raise ConfigError(f"{key} {path}: process 0 cannot write there" + (f" ({unwritable})" if unwritable else ""))
  if blind:
    raise ConfigError(f"{key} {path}: process{'es' if len(blind) > 1 else ''} {', '.join(map(str, blind))} of "
                      f"{len(seen)} cannot see the files process 0 writes there (a folder on each host's own "
                      f"disk?); a multi-process run needs its {key} on a filesystem every host shares, or in a "
                      f"bucket (gs://, s3://)")


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


_TOKENS_DRAWN: dict[str, int] = {}  # shared_token's calls per name in this process: every process counts the same


def shared_token(name: str, timeout_s: float = 3600.0) -> str:
  """16 random hex digits drawn by process 0, the same on every process of the job (one process: its own), which
  every process asks for at the same point: the job's key-value store under `name` and the call's number (a second
  call, a dataset prepared again in the same job, gets a key of its own), else a one-to-all broadcast."""
  token = uuid.uuid4().hex[:16]
  if jax.process_count() == 1:
    return token
  _TOKENS_DRAWN[name] = count = _TOKENS_DRAWN.get(name, 0) + 1
  name = f"{name}:{count}"
  client = runtime_client()
  if client is None:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    sent = multihost_utils.broadcast_one_to_all(np.frombuffer(bytes.fromhex(token), np.uint8))
    return bytes(np.asarray(sent, np.uint8)).hex()
  if jax.process_index() == 0:
    client.key_value_set(name, token)
    return token
  return client.blocking_key_value_get(name, int(timeout_s * 1000))


def runtime_client():
  """The JAX distributed runtime's client of this process (its barriers and the job's key-value store), or None
  (one process, or a JAX that keeps it elsewhere)."""
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel (no public API exposes it)
    return distributed.global_state.client
  except (ImportError, AttributeError):
    return None


def backends_started() -> bool:
  """Whether JAX has started its backends in this process (asking for devices starts them, which a process must
  not do before it joins a multi-process runtime)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def is_joined() -> bool:
  """Whether this process has joined JAX's distributed runtime (`initialize_distributed`)."""
  check = getattr(jax.distributed, "is_initialized", None)
  return bool(check()) if check is not None else False


def shutdown_distributed() -> None:
  if is_joined():
    stop_watching()
    jax.distributed.shutdown()

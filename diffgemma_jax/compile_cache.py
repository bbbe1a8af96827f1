"""The persistent XLA compilation cache (config section `compilation`): compiled programs kept in a folder or a
bucket and read back by the next process that compiles the same program, so a run restarted after a preemption
(or a reader of the same model) skips compiling.

JAX keys each entry by the program, its shardings and devices, the jax/XLA version and the compile options, so one
folder may serve every run and model; a changed program is a miss, never a wrong program. Every process reads it;
process 0 writes it. JAX reads and writes bucket URLs through etils.epath (gcsfs, s3fs): `gs://` and `s3://` work
in this jax; other schemes are refused by name.

Entry points call `use_compilation_cache(config)` after loading the config and before anything compiles (the cache
is opened at the first compile of the process).
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.parallel.distributed import backends_started, is_first_process, is_joined

KEY = "compilation.cache_dir"
SIZE_KEY = "compilation.max_size_gb"
BUCKET_SCHEMES = ("gs", "s3")
# jax's default: XLA's own GPU caches (per-fusion autotuning results) in a subfolder of the cache folder
XLA_CACHES_DEFAULT = "xla_gpu_per_fusion_autotune_cache_dir"
# the names of a program's files in a local cache folder (jax._src.lru_cache)
CACHE_SUFFIX, ATIME_SUFFIX = "-cache", "-atime"
# From jax 0.12 (not 0.10.2, not 0.11.2), a CPU program with cross-process collectives read back from the cache
# never returns: process 0 runs the cached program, the others compile theirs (JAX writes and reads on process 0),
# and the two wait on each other in the first collective (tests/test_multihost.py's resume; reproduced with a bare
# jitted all-reduce under jax.distributed on two CPU processes). Joined CPU processes (tests, launch/multihost/
# local.sh) therefore leave the cache there (leave_cache_if_joined_cpu).
JOINED_CPU_CACHE_HANGS = tuple(int(x) for x in jax.__version_info__[:2]) >= (0, 12)


def check_compilation_config(section) -> None:
  """The `compilation` keys' values (no file or bucket is touched)."""
  path = str(section.cache_dir)
  if storage.is_url(path) and path.split("://")[0] not in BUCKET_SCHEMES:
    raise ConfigError(f"{KEY}={path!r}: JAX's compilation cache here takes a local folder or a bucket URL "
                      f"({', '.join(s + '://' for s in BUCKET_SCHEMES)})")
  if not float(section.min_compile_time_s) >= 0:
    raise ConfigError(f"compilation.min_compile_time_s: must be >= 0 seconds (0: cache every program), got "
                      f"{section.min_compile_time_s!r}")
  size = float(section.max_size_gb)
  if not size >= 0:
    raise ConfigError(f"{SIZE_KEY}: must be >= 0 (0: no limit), got {section.max_size_gb!r}")
  if size and storage.is_url(path):
    raise ConfigError(f"{SIZE_KEY}={size:g} with {KEY}={path!r}: JAX deletes old programs from a local folder only; "
                      "set it to 0 and give the bucket an object lifecycle rule")
  if size and importlib.util.find_spec("filelock") is None:
    # JAX needs it for a size limit and, without it, fails every read of the cache with a warning only
    raise ConfigError(f"{SIZE_KEY}={size:g}: JAX's size-limited cache needs the filelock package (pip install "
                      "filelock), or set it to 0")


def _stamp_unstamped_entries(folder: str) -> None:
  """With a size limit JAX keeps each program's last use in a `<key>-atime` file beside its `<key>-cache` file and
  reads it for every entry when it evicts; entries written without a limit have none (JAX would fail to write any
  new program), so they get the oldest time and are the first to go."""
  for name in os.listdir(folder):
    if name.endswith(CACHE_SUFFIX):
      stamp = os.path.join(folder, name[:-len(CACHE_SUFFIX)] + ATIME_SUFFIX)
      if not os.path.exists(stamp):
        with open(stamp, "wb") as f:
          f.write((0).to_bytes(8, "little"))


def _cpu_only() -> bool:
  """Whether this process runs on CPU devices (asked of the settings, not of the backends, which a process joining a
  multi-process runtime must not start before it joins)."""
  if backends_started():
    return jax.default_backend() == "cpu"
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms.strip():
    return platforms.strip().lower() == "cpu"
  # No platform named: CPU only where JAX finds no accelerator plugin (a `jax_plugins` module or entry point, as
  # jax.xla_bridge discovers them: CUDA, ROCm) and no libtpu.
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
    modules = list(pkgutil.iter_modules(jax_plugins.__path__))
  except ImportError:
    modules = []
  return not modules and not metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("libtpu") is None


def use_compilation_cache(config) -> str | None:
  """Points JAX's persistent compilation cache at the config's `compilation.cache_dir` (made absolute when local,
  created when missing); the folder or URL used, or None when the key is empty (JAX's settings left as they are)
  or the process has joined a multi-process CPU run under jax 0.12 (`leave_cache_if_joined_cpu`).
  A bucket that cannot be reached or a folder that cannot be made fails here, naming the key."""
  section = config.compilation
  check_compilation_config(section)
  path = str(section.cache_dir)
  if not path:
    return None
  if storage.is_url(path):
    storage.check_reachable(path, KEY)
  path = storage.resolve(path)
  if not storage.is_url(path):
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise ConfigError(f"{KEY}={path!r}: cannot make the folder: {e.strerror}") from None
    if not os.access(path, os.W_OK):
      raise ConfigError(f"{KEY}={path!r}: the folder is not writable")
    if section.max_size_gb:
      _stamp_unstamped_entries(path)
  size_gb = float(section.max_size_gb)
  max_size = max(int(size_gb * 1e9), 1) if size_gb else -1  # bytes; -1: no limit
  if (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size) != (path, max_size):
    jax_cache.reset_cache()  # JAX opens its cache once per process; another folder or limit needs it opened again
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", max_size)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(section.min_compile_time_s))
  if not is_first_process(config):
    # It reads the cache and writes nothing. JAX itself writes from its process 0 only, but copies of a command
    # that never join the runtime (a reader started on every node) are each JAX's process 0, and JAX writes an
    # entry in place (not renamed into place): N copies would write one file together while others read it.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, whatever the filesystem
  # XLA writes its own caches from C++ to local paths only, and JAX builds their path with pathlib, which turns
  # `gs://b/c` into the local folder `gs:/b/c`: with a bucket they stay off.
  jax.config.update("jax_persistent_cache_enable_xla_caches", None if storage.is_url(path) else XLA_CACHES_DEFAULT)
  return None if leave_cache_if_joined_cpu() else path


def leave_cache_if_joined_cpu() -> bool:
  """Turns the persistent cache off in a process that has joined a multi-process CPU runtime under jax 0.12
  (JOINED_CPU_CACHE_HANGS), saying so; whether it did. Called where the cache is set up and where a process joins
  (`initialize_distributed`: after the cache is set up, before anything compiles). Copies of a command that never
  join (each its own process 0) run single-process programs and keep the cache."""
  if not (JOINED_CPU_CACHE_HANGS and jax.config.jax_compilation_cache_dir and is_joined() and _cpu_only()):
    return False
  print(f"{KEY}: not used: jax {jax.__version__}'s CPU programs read back from the cache hang in a multi-process "
        "run's collectives (jax 0.10 and 0.11 read them)", file=sys.stderr, flush=True)
  jax.config.update("jax_compilation_cache_dir", None)
  jax_cache.reset_cache()
  return True

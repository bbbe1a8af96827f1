"""The `compilation` config section: JAX's persistent compilation cache in a local folder or a bucket, read back by
a later process (a restart) instead of compiling again; bad values fail in one line naming the key.

A restart of a real training run reading the train step back: test_checkpoint.py (the SIGTERM test); each reader
entry point writing the cache: test_object_storage.py (eval, generate, score) and test_harness.py (lm-eval)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compilation_cache_entries
from diffgemma_jax.compile_cache import XLA_CACHES_DEFAULT, use_compilation_cache
from diffgemma_jax.config import base_config
from launch.train import main as train_main


def _config(cache_dir: str, max_size_gb: float = 0.0):
  config = base_config()
  config.compilation.update(cache_dir=cache_dir, min_compile_time_s=0.0, max_size_gb=max_size_gb)
  return config


def _compile_counts(program) -> dict[str, int]:
  """How many of `program`'s compiles JAX's persistent cache answered (hits) and how many it did not (misses)."""
  counts = {"hits": 0, "misses": 0}
  names = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}

  def listen(event, **_):
    if event in names:
      counts[names[event]] += 1

  jax.monitoring.register_event_listener(listen)
  try:
    program()
  finally:
    jax.monitoring.unregister_event_listener(listen)
  return counts


def _program(scale: float = 7.0):
  x = np.arange(12.0, dtype=np.float32).reshape(3, 4)  # numpy: the jitted function is the one program compiled
  jax.block_until_ready(jax.jit(lambda a: jnp.tanh(a @ a.T) * scale + a.sum())(x))


@pytest.mark.parametrize("where", ["local", "s3", "gs"])
def test_a_new_process_reads_what_an_earlier_one_compiled(where, request, tmp_path, no_compilation_cache):
  """Compiled once, written; after the process's state is gone (a restart), compiled again: read back, not
  compiled. Without the key the second compile is a compile (the check can fail)."""
  if where == "local":
    cache_dir = str(tmp_path / "cache")
  else:
    request.getfixturevalue({"s3": "s3_endpoint", "gs": "gcs_endpoint"}[where])
    cache_dir = f"{where}://runs/jax-cache-{tmp_path.name}"
  assert use_compilation_cache(_config(cache_dir)) == cache_dir
  assert jax.config.jax_persistent_cache_enable_xla_caches == (XLA_CACHES_DEFAULT if where == "local" else None)
  assert _compile_counts(_program) == {"hits": 0, "misses": 1}
  written = compilation_cache_entries(cache_dir)
  assert len(written) == 1 and next(iter(written)).startswith("jit__lambda-"), written
  no_compilation_cache()  # a new process
  assert use_compilation_cache(_config(cache_dir)) == cache_dir
  assert _compile_counts(_program) == {"hits": 1, "misses": 0}
  no_compilation_cache()
  assert use_compilation_cache(_config("")) is None  # the key empty: JAX's settings untouched, nothing read
  assert _compile_counts(_program) == {"hits": 0, "misses": 0}
  assert compilation_cache_entries(cache_dir) == written


def test_a_size_limit_deletes_the_least_recently_used_programs(tmp_path, no_compilation_cache):
  """A folder filled without a limit, then given one of 1.5 programs: the next program written deletes the oldest
  (the one written before the limit, which JAX keeps no use time for: it would fail on it unstamped)."""
  folder = tmp_path / "cache"
  use_compilation_cache(_config(str(folder)))
  _program(7.0)
  (first,) = compilation_cache_entries(str(folder))
  size = (folder / first).stat().st_size
  no_compilation_cache()
  use_compilation_cache(_config(str(folder), max_size_gb=1.5 * size / 1e9))
  assert jax.config.jax_compilation_cache_max_size == int(1.5 * size)
  assert _compile_counts(lambda: _program(5.0)) == {"hits": 0, "misses": 1}
  (second,) = compilation_cache_entries(str(folder))
  assert second != first
  no_compilation_cache()
  use_compilation_cache(_config(str(folder), max_size_gb=1.5 * size / 1e9))
  assert _compile_counts(lambda: _program(5.0)) == {"hits": 1, "misses": 0}
  assert _compile_counts(lambda: _program(7.0)) == {"hits": 0, "misses": 1}
  assert compilation_cache_entries(str(folder)) == {first}


def test_joined_cpu_processes_leave_the_cache_where_jax_hangs_on_it(tmp_path, monkeypatch, capsys,
                                                                   no_compilation_cache):
  """Under jax 0.12 a joined multi-process CPU run's collectives hang in programs read back from the cache
  (compile_cache.JOINED_CPU_CACHE_HANGS): a joined process turns the cache off and says so, whether it joined
  before the cache was set up or after (initialize_distributed); a process that never joined, or jax before 0.12,
  keeps the folder."""
  from diffgemma_jax import compile_cache
  from diffgemma_jax.compile_cache import leave_cache_if_joined_cpu
  monkeypatch.setattr(compile_cache, "_cpu_only", lambda: True)
  monkeypatch.setattr(compile_cache, "JOINED_CPU_CACHE_HANGS", True)
  monkeypatch.setattr(compile_cache, "is_joined", lambda: True)
  assert use_compilation_cache(_config(str(tmp_path / "cache"))) is None
  assert jax.config.jax_compilation_cache_dir is None
  assert (f"compilation.cache_dir: not used: jax {jax.__version__}'s CPU programs read back from the cache hang in "
          "a multi-process run's collectives" in capsys.readouterr().err)
  monkeypatch.setattr(compile_cache, "is_joined", lambda: False)
  assert use_compilation_cache(_config(str(tmp_path / "cache"))) == str(tmp_path / "cache")
  monkeypatch.setattr(compile_cache, "is_joined", lambda: True)  # then it joins
  assert leave_cache_if_joined_cpu() and jax.config.jax_compilation_cache_dir is None
  monkeypatch.setattr(compile_cache, "JOINED_CPU_CACHE_HANGS", False)
  assert use_compilation_cache(_config(str(tmp_path / "cache2"))) == str(tmp_path / "cache2")
  assert not leave_cache_if_joined_cpu() and jax.config.jax_compilation_cache_dir == str(tmp_path / "cache2")
  monkeypatch.undo()


def test_cpu_only_is_read_from_the_settings_or_the_installed_plugins(monkeypatch):
  """Before the backends start (a process about to join a runtime must not start them): JAX_PLATFORMS when set,
  else whether JAX would find an accelerator plugin."""
  from importlib import metadata

  from diffgemma_jax import compile_cache
  from jax._src import xla_bridge
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  platforms = jax.config.jax_platforms
  jax.config.update("jax_platforms", None)  # the setting read from the environment below
  try:
    for value, expected in (("cpu", True), ("cuda,cpu", False), ("tpu", False)):
      monkeypatch.setenv("JAX_PLATFORMS", value)
      assert compile_cache._cpu_only() is expected, value
    monkeypatch.delenv("JAX_PLATFORMS")
    assert compile_cache._cpu_only()  # this machine: no GPU plugin
    entry = metadata.EntryPoint("xla_cuda12", "jax_cuda12_plugin", "jax_plugins")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [entry] if group == "jax_plugins" else [])
    assert not compile_cache._cpu_only()
  finally:
    jax.config.update("jax_platforms", platforms)


def test_a_relative_folder_is_made_absolute(tmp_path, monkeypatch, no_compilation_cache):
  monkeypatch.chdir(tmp_path)
  assert use_compilation_cache(_config("cache/jax")) == str(tmp_path / "cache" / "jax")
  assert (tmp_path / "cache" / "jax").is_dir()


def test_bad_cache_settings_fail_in_one_line_naming_the_key(s3_endpoint, tiny_config_file, tmp_path, capsys,
                                                            no_compilation_cache):
  afile = tmp_path / "afile"
  afile.write_text("")
  run = ["--config", tiny_config_file, "--workdir", str(tmp_path / "run")]
  cases = (("hdfs://cluster/cache", "compilation.cache_dir='hdfs://cluster/cache': JAX's compilation cache here "
            "takes a local folder or a bucket URL (gs://, s3://)"),
           ("s3://no-such-bucket/cache", "compilation.cache_dir s3://no-such-bucket/cache: the bucket "
            "s3://no-such-bucket cannot be reached"),
           (f"{afile}/cache", f"compilation.cache_dir='{afile}/cache': cannot make the folder: Not a directory"))
  for value, expected in cases:
    assert train_main(run + [f"--config.compilation.cache_dir={value}"]) == 2, value
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
  assert train_main(run + ["--config.compilation.min_compile_time_s=-1"]) == 2
  assert "compilation.min_compile_time_s: must be >= 0 seconds" in capsys.readouterr().err
  assert train_main(run + ["--config.compilation.max_size_gb=-1"]) == 2
  assert "compilation.max_size_gb: must be >= 0 (0: no limit), got -1" in capsys.readouterr().err
  assert train_main(run + ["--config.compilation.cache_dir=s3://runs/cache", "--config.compilation.max_size_gb=2"]) == 2
  assert ("compilation.max_size_gb=2 with compilation.cache_dir='s3://runs/cache': JAX deletes old programs from a "
          "local folder only" in capsys.readouterr().err)
  real_find_spec = importlib.util.find_spec
  with pytest.MonkeyPatch.context() as patch:  # a machine without filelock (jax does not require it)
    patch.setattr(importlib.util, "find_spec",
                  lambda name, *a: None if name == "filelock" else real_find_spec(name, *a))
    assert train_main(run + [f"--config.compilation.cache_dir={tmp_path}/cache",
                             "--config.compilation.max_size_gb=2"]) == 2
  assert ("compilation.max_size_gb=2: JAX's size-limited cache needs the filelock package (pip install filelock), "
          "or set it to 0" in capsys.readouterr().err)
  assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "run").exists()

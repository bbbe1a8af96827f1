"""Flag helpers shared by the entry points: `--config.a.b=value` overrides, one-line failures, and `Outputs`: what
an entry point writes and prints, from process 0 of a multi-process launch only."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Iterable, Iterator

import jax

from diffgemma_jax import storage
from diffgemma_jax.compile_cache import use_compilation_cache
from diffgemma_jax.config import load_config
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.parallel.distributed import launch_process
from diffgemma_jax.parallel.failures import claim_error_line, fail_together


def config_overrides(rest: list[str]) -> dict[str, str]:
  """Turns leftover `--config.a.b=value` (or `--config.a.b value`) flags into an overrides dict."""
  overrides: dict[str, str] = {}
  i = 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --config.train.num_steps=10")
    key, eq, value = arg[len("--config."):].partition("=")
    if not eq:
      if i + 1 >= len(rest):
        raise ConfigError(f"override --config.{key} has no value")
      value = rest[i + 1]
      i += 1
    overrides[key] = value
    i += 1
  return overrides


def load_run_config(spec: str, overrides: dict[str, str]):
  """The locked config of `--config` with its overrides, and JAX's compilation cache pointed where it says (before
  anything compiles: JAX opens the cache at the first compile)."""
  config = load_config(spec, overrides)
  use_compilation_cache(config)
  return config


def fake_cpu_devices(count: int) -> None:
  """`count` CPU devices for this process (a `--devices` flag: a cluster's mesh planned on one machine); before
  JAX starts its backends, which read the device count once."""
  if count < 1:
    raise ConfigError(f"--devices {count}: give a device count >= 1")
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  jax.config.update("jax_platforms", "cpu")
  if jax.device_count() != count:
    raise ConfigError(f"--devices {count}: JAX had already started with {jax.device_count()} device(s) in this "
                      "process; run the command in a process of its own")


def fail(message: str, code: int = 2) -> int:
  """Prints `message` as the one-line error and returns the exit status `code`; in a joined multi-process run it
  ends every process instead, each printing this process's line, with the same status (`failures.fail_together`:
  the others would otherwise wait for this one at their next collective). A process that has already printed
  another process's failure (which reached it first) prints nothing more and ends with that one's status."""
  if claim_error_line():
    print(f"error: {message}", file=sys.stderr, flush=True)
  fail_together(message, code)
  return code


def json_safe(value):
  """`value` with every non-finite float as None, so the JSON printed is standard (no NaN or Infinity)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def json_array(items: Iterable) -> Iterator[str]:
  """The lines of `json.dumps(list(items), indent=2)`, an item at a time (a document of a million results is
  never one string): printed one per line, the same text."""
  held = None
  for item in items:
    yield "[" if held is None else held + ","
    held = "  " + json.dumps(item, indent=2, allow_nan=False).replace("\n", "\n  ")
  if held is None:
    yield "[]"
    return
  yield held
  yield "]"


def json_document(document: dict, streamed: str) -> Iterator[str]:
  """The lines of `json.dumps(document, indent=2)` with `document[streamed]` (an iterable) written an item at a
  time (`json_array`; a piece may hold several lines): printed one per line, the same text."""
  marker = "\x00streamed\x00"
  text, quoted = json.dumps({**document, streamed: marker}, indent=2, allow_nan=False), json.dumps(marker)
  at = text.index(quoted)
  prefix, suffix = text[:at], text[at + len(quoted):]
  held = None  # the last piece, which the text after the items ends
  for piece in json_array(document[streamed]):
    if held is not None:
      yield held
    held = prefix + piece if held is None else "  " + piece.replace("\n", "\n  ")
  yield held + suffix


class Outputs:
  """What an entry point writes (`--output` and the like, a local path or a bucket URL) and prints on stdout, from
  exactly one process of a multi-process launch: process 0 (`distributed.launch_process`: from the runtime once
  joined, else from the launch's environment, e.g. `srun` starting a reader on every node). The others compute as
  before and write and print nothing (one line on stderr says so), so a shared filesystem or a bucket never gets
  N concurrent writers of one object and a job's log holds one document. Errors go to stderr from every process."""

  def __init__(self, config=None):
    self.index, self.count = launch_process(config)
    self.first = self.index == 0
    if not self.first:
      print(f"process {self.index} of {self.count}: process 0 writes this command's output files and prints its "
            f"results", file=sys.stderr, flush=True)

  def check(self, path: str | None, flag: str) -> None:
    """`storage.check_writable` where the file will be written: on process 0 (another host's disk may lack the
    folder, and need not have it). In a joined run (eval, score) a failure there ends every process at once with
    process 0's line: its error goes through `fail`, which tells the others (`failures.fail_together`)."""
    if path and self.first:
      storage.check_writable(path, flag)

  def write(self, path: str | None, text: str) -> None:
    if path and self.first:
      storage.write_text(path, text)

  def print(self, text: str = "") -> None:
    if self.first:
      print(text)

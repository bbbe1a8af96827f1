"""Shared fixtures: a tiny run config written as a config file, a small text corpus, one trained workdir that
several test files read (trained once per session, ~10 s on 2 cores), and an S3 and a GCS server on localhost."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
import types
from xml.etree import ElementTree

# XLA's LLVM code generation for the CPU at its lowest optimization, in this process and every subprocess a test
# starts (they inherit XLA_FLAGS, and the helpers below add these flags where a test sets its own): a tiny model's
# time is mostly compiling, and this halves the CPU time of a compile. Only the machine code's speed changes: XLA's
# HLO passes (fusion, layout, the collectives, the order of every reduction) run as they do for a user, and LLVM
# does not reassociate floating point at any level, so every value a test compares is the one a default compile
# gives. DIFFGEMMA_TEST_FULL_OPT=1 runs the suite with XLA's defaults.
FAST_COMPILE_FLAGS = ("" if os.environ.get("DIFFGEMMA_TEST_FULL_OPT") == "1" else
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick): for a coordinator or a server a test
  starts."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a subprocess a test starts: `devices` fake CPU devices (None: the default) and the suite's
  compile flags."""
  count = f"--xla_force_host_platform_device_count={devices}" if devices else ""
  return f"{count} {FAST_COMPILE_FLAGS}".strip()


if FAST_COMPILE_FLAGS and FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

import jax.numpy as jnp  # noqa: E402  (after XLA_FLAGS: they are read when JAX starts its CPU backend)
import pytest  # noqa: E402

TINY_MODEL = dict(vocab_size=512, embed_dim=64, num_layers=2, layer_pattern=("sliding", "global"), num_heads=2,
                  head_dim=32, num_kv_heads=1, sliding_window=16, global_head_dim=32, global_num_kv_heads=1,
                  mlp_dim=128, num_experts=4, top_k=2, expert_dim=64, dispatch="dense")

# The trained_run schedule: checkpoints at 8, 16, 24; held-out bound at 8, 16, 24.
TRAINED_STEPS = 24
TRAINED_OVERRIDES = {"train.num_steps": str(TRAINED_STEPS), "checkpoint.every_steps": "8", "eval.every_steps": "8"}

CONFIG_TEMPLATE = """
from diffgemma_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update({model!r})
  c.data.recipe = "text_files"
  c.data.source = {source!r}
  c.data.dir = {data_dir!r}
  c.train.update(num_steps=12, batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=2, log_every_steps=1)
  c.checkpoint.update(every_steps=4, keep=3)
  c.eval.update(every_steps=0, batch_size=4, max_sequences=8, num_t_samples=4)
  return c
"""


def write_corpus(directory: str) -> None:
  """A few hundred KB of real text: modules of the running interpreter's standard library."""
  os.makedirs(directory, exist_ok=True)
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("argparse.py", "collections/__init__.py", "dataclasses.py", "json/encoder.py", "textwrap.py",
               "functools.py", "random.py", "string.py", "heapq.py", "bisect.py"):
    src = os.path.join(stdlib, name)
    if os.path.isfile(src):
      shutil.copy(src, os.path.join(directory, name.replace("/", "_") + ".txt"))


def stop_tokenising_after(monkeypatch, tasks: int):
  """Makes data/build.py's tokenise phase raise KeyboardInterrupt (a preemption) once `tasks` tasks have run:
  (the indices of the tasks that ran, the real task function, to put back for the resumed build)."""
  from diffgemma_jax.data import build
  calls, tokenize = [], build._tokenize_task

  def stopping(*args):
    if len(calls) == tasks:
      raise KeyboardInterrupt
    calls.append(args[1])
    return tokenize(*args)

  monkeypatch.setattr(build, "_tokenize_task", stopping)
  return calls, tokenize


@pytest.fixture(scope="session")
def tiny_config_file(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("tiny")
  source = str(root / "corpus")
  write_corpus(source)
  path = root / "tiny_config.py"
  path.write_text(textwrap.dedent(CONFIG_TEMPLATE.format(model=TINY_MODEL, source=source,
                                                         data_dir=str(root / "data"))))
  return str(path)


@pytest.fixture(scope="session")
def load_tiny(tiny_config_file):
  from diffgemma_jax.config import load_config

  def load(overrides: dict[str, str] | None = None):
    return load_config(tiny_config_file, overrides or {})

  return load


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
  """A tokenizer as the recipes train one (`train_tokenizer`: reserved ids, `<mask>` and the turn markers as
  user-defined symbols, byte fallback), on the tiny corpus, with the tiny model's vocabulary: `DIR/tokenizer.model`
  in a folder of its own. Trained directly (about a second), so tokenizer tests need no dataset or run."""
  from diffgemma_jax.data.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp("tokenizer")
  write_corpus(str(root / "corpus"))
  texts = [(root / "corpus" / name).read_text(encoding="utf-8") for name in sorted(os.listdir(root / "corpus"))]
  texts.append("caf\xe9 cr\xe8me " * 10)  # non-ASCII text, as a latin-1 corpus file decodes
  return train_tokenizer(texts, str(root / "tokenizer"), TINY_MODEL["vocab_size"])


@pytest.fixture(scope="session")
def trained_run(load_tiny, tmp_path_factory, compilation_cache_folder):
  """(config, workdir, summary) of one uninterrupted run; treat the workdir as read-only (copy it to change it).
  Its programs go to the process's compilation cache, for the modules that rerun its config (`compilation_cache`)."""
  from diffgemma_jax.train import train
  config = load_tiny(TRAINED_OVERRIDES)
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  with persistent_compilation_cache(compilation_cache_folder):
    summary = train(config, workdir, show_progress=False)
  return config, workdir, summary


@pytest.fixture(scope="session")
def s3_endpoint():
  """An S3 server (moto's server mode) on localhost with the bucket `runs`; the AWS_* variables point every client
  at it. One per test process, shared by the files that use it (test_object_storage.py, test_hf_bucket.py): fsspec
  and epath cache their S3 clients with the endpoint they were made with, so a second server on another port would
  leave them talking to a stopped one."""
  moto_server = pytest.importorskip("moto.server")
  pytest.importorskip("s3fs")
  port = free_port()
  server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
  server.start()
  endpoint = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_REGION", "AWS_DEFAULT_REGION")}
  os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                    AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
  import boto3
  boto3.client("s3").create_bucket(Bucket="runs")
  yield endpoint
  server.stop()
  _restore_environment(saved)


@pytest.fixture(scope="session")
def gcs_endpoint():
  """A Google Cloud Storage server (gcs_server.py: gcp-storage-emulator's JSON API, in memory) on localhost with the
  bucket `runs`, up until the process exits. Each client is pointed at it the way a user points it at an emulator:
  gcsfs (what epath and fsspec read `gs://` through) by `$STORAGE_EMULATOR_HOST`, and tensorstore (Orbax's arrays)
  by the same variable, which storage.py passes on to it as `$TENSORSTORE_GCS_HTTP_URL`. Neither looks for
  credentials: gcsfs is anonymous (`$FSSPEC_GCS_TOKEN`, for subprocesses too) and tensorstore
  sends the fixed token of `$GOOGLE_AUTH_TOKEN_FOR_TESTING`, so nothing asks a metadata server off this machine.
  gcsfs's `ExtendedGcsFileSystem` (its default) first asks the Storage Control API over gRPC whether a bucket is
  zonal, which an HTTP emulator cannot answer (60 s of retries per bucket), so the core `GCSFileSystem` is used:
  what the extended one falls back to for every standard bucket. One per test process, as `s3_endpoint`."""
  pytest.importorskip("gcp_storage_emulator.server")
  gcsfs = pytest.importorskip("gcsfs")
  import fsspec
  from gcsfs.core import GCSFileSystem

  import gcs_server
  endpoint = gcs_server.start("runs")
  variables = dict(STORAGE_EMULATOR_HOST=endpoint, GOOGLE_AUTH_TOKEN_FOR_TESTING="test", FSSPEC_GCS_TOKEN="anon",
                   GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  saved = {k: os.environ.get(k) for k in (*variables, "TENSORSTORE_GCS_HTTP_URL")}  # storage.py sets the last
  os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
  gcs_conf = fsspec.config.conf.setdefault("gcs", {})
  saved_token = gcs_conf.get("token")
  os.environ.update(variables)
  gcs_conf["token"] = "anon"
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
  yield endpoint
  _restore_environment(saved)
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.GCSFileSystem, clobber=True)
  if saved_token is None:
    gcs_conf.pop("token", None)
  else:
    gcs_conf["token"] = saved_token


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> str:
  """`s3://runs` or `gs://runs` on its local server: a test that takes it runs once per object store."""
  request.getfixturevalue({"s3": "s3_endpoint", "gs": "gcs_endpoint"}[request.param])
  return f"{request.param}://runs"


def bucket_endpoint(bucket: str) -> str:
  """The local server of `bucket` (`s3://runs`, `gs://runs`), as the errors about its store name it."""
  return os.environ[{"s3": "AWS_ENDPOINT_URL", "gs": "STORAGE_EMULATOR_HOST"}[bucket.split("://")[0]]]


def upload_files(folder: str, url: str) -> list[str]:
  """Copies the files of the local `folder` into the bucket folder `url` as another process would: with a client
  of the store's own (fsspec's, a new instance), not through diffgemma_jax.storage (the code under test); returns
  their URLs."""
  import fsspec
  fs, prefix = fsspec.core.url_to_fs(url, skip_instance_cache=True)
  names = sorted(os.listdir(folder))
  for name in names:
    fs.put_file(os.path.join(folder, name), f"{prefix}/{name}")
  return [f"{url}/{name}" for name in names]


def _restore_environment(saved: dict) -> None:
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def write_stand_in_dataset(folder: str, tokens: bytes, recipe: str) -> None:
  """What a build leaves for the bucket-build tests to publish and fetch: one token shard and a manifest (not a
  readable dataset: those tests move files, they never read rows)."""
  os.makedirs(os.path.join(folder, "train"), exist_ok=True)
  with open(os.path.join(folder, "train", "00000.tokens"), "wb") as f:
    f.write(tokens)
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    f.write(f'{{"recipe": "{recipe}"}}')


def read_metrics(workdir: str) -> list[dict]:
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir: str) -> dict[int, list[float]]:
  """Every logged training loss per step (a resumed run logs some steps twice)."""
  out: dict[int, list[float]] = {}
  for record in read_metrics(workdir):
    if "train/loss" in record:
      out.setdefault(record["step"], []).append(record["train/loss"])
  return out


def reader_clis(scratch) -> tuple:
  """(main, extra arguments) of each entry point that reads a trained run given --config and --workdir; `scratch`
  is a folder for outputs (export writes there)."""
  from launch.evaluate import main as eval_main
  from launch.export_hf import main as export_main
  from launch.generate import main as generate_main
  return ((eval_main, []), (generate_main, ["--prompt", "def f(", "--gen_length", "8", "--block_length", "8"]),
          (export_main, ["--output", os.path.join(str(scratch), "hf")]))


_CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes", "jax_persistent_cache_enable_xla_caches",
                   "jax_compilation_cache_max_size")


@contextlib.contextmanager
def _cache_settings_restored():
  """JAX's persistent-cache settings (process-wide) as they were before the `with` block, and its cache object
  reset on both sides of it."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as jax_cache
  saved = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  jax_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    jax_cache.reset_cache()


@contextlib.contextmanager
def persistent_compilation_cache(folder: str):
  """JAX's persistent compilation cache on in this test process, in `folder`, for the `with` block; JAX's settings
  restored after it (they are process-wide)."""
  from diffgemma_jax.compile_cache import use_compilation_cache
  from diffgemma_jax.config import base_config
  with _cache_settings_restored():
    config = base_config()
    config.compilation.cache_dir = folder  # the default min_compile_time_s (1 s): the programs worth a file
    use_compilation_cache(config)
    yield


@pytest.fixture(scope="session")
def compilation_cache_folder(tmp_path_factory) -> str:
  """One test process's folder for JAX's persistent compilation cache: `trained_run` writes its programs there, and
  the modules that take `compilation_cache` read and write it."""
  return str(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="module")
def compilation_cache(compilation_cache_folder):
  """JAX's persistent compilation cache on for one module: a `train()` or CLI call that compiles a program an
  earlier one compiled (a rerun continuing a run, `trained_run`'s config again, a sampler on the same model) reads
  it back instead of compiling it again (a tiny run's compile is most of its time). The cache keys on the program,
  its shardings and XLA_FLAGS, so what runs is what a fresh compile gives, and a changed program compiles."""
  with persistent_compilation_cache(compilation_cache_folder):
    yield


@pytest.fixture
def no_compilation_cache():
  """A function that turns JAX's persistent compilation cache off and drops the programs compiled in memory, so the
  next compile is a fresh process's; called before the test, and JAX's settings restored after it (they are
  process-wide)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  def turn_off():
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    jax.clear_caches()

  with _cache_settings_restored():
    turn_off()
    yield turn_off


def compilation_cache_entries(folder: str) -> set[str]:
  """The programs JAX's persistent compilation cache holds in `folder` (a local folder or a bucket URL), read with
  a client of the store's own."""
  import fsspec
  fs, path = fsspec.core.url_to_fs(folder, skip_instance_cache=True)
  if not fs.exists(path):
    return set()
  return {name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False) if name.endswith("-cache")}


class ConstantLogits:
  """A stand-in denoiser whose logits are all zero, whatever it is given: every prediction is uniform over the
  states an objective allows. Objectives call it as they call the model."""

  self_conditioning = None

  def __init__(self, vocab_size: int, token_shift: bool = False):
    self.cfg = types.SimpleNamespace(vocab_size=vocab_size, token_shift=token_shift)

  def __call__(self, tokens, *args, **kwargs):
    aux = {"aux_loss": jnp.float32(0), "load_balance_loss": jnp.float32(0), "router_z_loss": jnp.float32(0),
           "expert_load": jnp.zeros((1, 2)), "dropped_tokens": jnp.float32(0)}
    return jnp.zeros(tokens.shape + (self.cfg.vocab_size,)) + 0.0 * tokens[..., None], aux


def transformers_reference():
  """(torch, transformers), which the test extra installs for the parity tests: without them, or with a
  transformers that has no DiffusionGemma, those tests fail rather than skip."""
  try:
    import torch  # pylint: disable=import-outside-toplevel  (heavy: only the parity tests load it)
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    pytest.fail(f"the parity tests need the test extra (pip install -e '.[test]'): {e}")
  if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.fail(f"transformers {transformers.__version__} has no DiffusionGemma (the test extra pins 5.24.0)")
  return torch, transformers


def rerun_on_eight_devices(test_file: str, report: str, may_skip: set[str], min_ran: int) -> None:
  """Runs `test_file` in a subprocess on 8 fake CPU devices (the device count is fixed when JAX starts) and reads
  its JUnit report: every test passed and none skipped but those named in `may_skip`, and at least `min_ran` of
  the others ran (so a device count that silently did not take fails)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                         f"--junitxml={report}", test_file], capture_output=True, text=True, timeout=900, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  cases = ElementTree.parse(report).getroot().iter("testcase")
  outcome = {case.get("name"): "skipped" if case.find("skipped") is not None else
             "failed" if case.find("failure") is not None or case.find("error") is not None else "passed"
             for case in cases}
  unexpected = {name: result for name, result in outcome.items()
                if result != "passed" and name.split("[")[0] not in may_skip}
  assert not unexpected, (unexpected, proc.stdout[-3000:])
  ran = [name for name in outcome if name.split("[")[0] not in may_skip]
  assert len(ran) >= min_ran, outcome

"""Multi-host: two local processes (4 fake CPU devices each) train, checkpoint together and resume, and match one
process on the same 8-device mesh; start-up settings from config and environment; an unreachable coordinator."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest

from conftest import free_port, read_metrics, train_losses, xla_flags
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.parallel.distributed import distributed_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(REPO, "launch", "multihost", "local.sh")
# (1,2,4,1): fsdp x expert over both processes' devices, so every collective crosses the process boundary;
# (2,2,2,1): data across the processes with fsdp and expert inside each, the mesh on which XLA:CPU's concurrent
# collectives corrupted expert weights until distributed.serialise_cpu_collectives.
MESHES = ("(1,2,4,1)", "(2,2,2,1)")
# AdamW moves every element by up to about the learning rate per step whatever its gradient's size, so float32
# noise in a near-zero gradient (the per-layer scalars: one number summed over every activation, in an order that
# depends on the collective) can move it by a fair part of the rate. Parameters are compared on that scale.
LEARNING_RATE = 1e-4


def _section(**values):
  c = ml_collections.ConfigDict()
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=-1, process_id=-1,
                                                 initialization_timeout_s=300))
  c.distributed.update(values)
  return c


def test_settings_from_config_environment_and_slurm():
  assert distributed_settings(_section(), env={}) is None
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed_settings(_section(), env=env) == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                                          process_id=3, initialization_timeout=300,
                                                          heartbeat_timeout_seconds=100)
  from_config = _section(coordinator_address="h:1", num_processes=2, process_id=0, initialization_timeout_s=7,
                         heartbeat_timeout_s=20)
  assert distributed_settings(from_config, env=env) == dict(coordinator_address="h:1", num_processes=2,
                                                            process_id=0, initialization_timeout=7,
                                                            heartbeat_timeout_seconds=20)
  srun = {"SLURM_JOB_ID": "9", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
          "SLURM_LOCALID": "0"}  # what srun sets in each task
  assert distributed_settings(_section(), env=srun) == dict(initialization_timeout=300, cluster="SLURM",
                                                           cluster_processes=2, heartbeat_timeout_seconds=100)
  assert distributed_settings(_section(), env=dict(srun, SLURM_NTASKS="1")) is None
  assert distributed_settings(_section(), env={"SLURM_JOB_ID": "9", "SLURM_NTASKS": "2"}) is None  # no srun step
  with pytest.raises(ConfigError, match="distributed.process_id is not"):
    distributed_settings(_section(coordinator_address="h:1", num_processes=2), env={})
  with pytest.raises(ConfigError, match=r"must lie in \[0, distributed.num_processes=2\)"):
    distributed_settings(_section(coordinator_address="h:1", num_processes=2, process_id=2), env={})
  for bad in (0, -5, 2.5):
    with pytest.raises(ConfigError, match=f"distributed.heartbeat_timeout_s={bad!r}: give a whole number of seconds"):
      distributed_settings(_section(heartbeat_timeout_s=bad), env=env)


def test_the_harness_processes_meet_at_master_addr_or_beside_the_coordinator():
  """`side_channel_address` (diffgemma-lm-eval's copies of a launch): $MASTER_ADDR:$MASTER_PORT first, else the
  coordinator's host with its port + 1, from the environment or from what JAX derives for srun's tasks; none of
  them: a one-line error naming the variables."""
  from diffgemma_jax.parallel.distributed import side_channel_address
  coordinator = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert side_channel_address(_section(), env=dict(coordinator, MASTER_ADDR="h", MASTER_PORT="29500")) == "h:29500"
  assert side_channel_address(_section(), env=coordinator) == "10.0.0.1:1235"
  srun = {"SLURM_JOB_ID": "9", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
          "SLURM_LOCALID": "0"}
  host, port = side_channel_address(_section(), env=srun).rsplit(":", 1)
  assert host == "node1" and 1024 < int(port) <= 65535
  with pytest.raises(ConfigError, match=r"set \$MASTER_ADDR and \$MASTER_PORT"):
    side_channel_address(_section(), env={})


DEAD_PEER = """
import os, sys, time
import ml_collections
from diffgemma_jax.parallel.distributed import barrier, initialize_distributed
address, rank = sys.argv[1], int(sys.argv[2])
config = ml_collections.ConfigDict(dict(distributed=dict(coordinator_address=address, num_processes=2,
                                                         process_id=rank, initialization_timeout_s=60,
                                                         heartbeat_timeout_s=5)))
assert initialize_distributed(config)
barrier("both_joined")
print("joined", rank, flush=True)
if rank == 1:
  os._exit(3)  # dies without a word to the coordinator, as a killed or crashed process does
barrier("never_reached", timeout_s=600)
print("passed a barrier with a dead peer", flush=True)
"""


def test_a_dead_process_ends_the_others_after_the_heartbeat_timeout():
  """distributed.heartbeat_timeout_s reaches JAX's runtime: process 1 dies without a word after joining, and
  process 0, waiting for it at a barrier, is ended by the coordination service once 5 s pass without its heartbeat
  (abort, non-zero status, the unhealthy task named), well inside the 60 s this test waits; JAX's default of 100 s
  would leave it waiting past them."""
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags(1))
  procs = [subprocess.Popen([sys.executable, "-c", DEAD_PEER, address, str(rank)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
  try:
    (out0, err0), (out1, _) = (p.communicate(timeout=60) for p in procs)
  finally:
    for p in procs:
      p.kill()
  assert out1.split() == ["joined", "1"] and procs[1].returncode == 3, out1
  assert out0.split() == ["joined", "0"] and procs[0].returncode != 0, (out0, err0[-2000:])
  assert "stopped sending heartbeats" in err0, err0[-2000:]


def _free_ompi_port() -> int:
  """A free port JAX's Open MPI detection will pick: it derives the coordinator port from the job id."""
  import socket
  for port in range(61440 + os.getpid() % 3000, 65536):
    with socket.socket() as probe:
      try:
        probe.bind(("127.0.0.1", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port in Open MPI's range")


def test_open_mpi_environment_is_detected_and_two_processes_join():
  """What `mpirun -np 2` sets (faked here): each process finds the run by JAX's own auto-detection, says it found
  Open MPI, and joins the other one; a hybrid mesh (mesh.dcn_shape) puts its slow axis across the two hosts."""
  port = _free_ompi_port()
  script = ("import jax\nfrom diffgemma_jax.parallel.distributed import initialize_distributed, shutdown_distributed\n"
            "assert initialize_distributed()\n"
            "print('joined', jax.process_index(), jax.process_count(), jax.device_count(), flush=True)\n"
            "from diffgemma_jax.parallel import make_mesh\n"
            "mesh = make_mesh((1, 2, 1, 1), dcn_shape=(2, 1, 1, 1))\n"
            "print('hybrid', dict(mesh.shape)['data'], dict(mesh.shape)['fsdp'], "
            "[sorted({d.process_index for d in row.flat}) for row in mesh.devices], flush=True)\n"
            "shutdown_distributed()\n")
  procs = []
  for rank in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags(2),
               OMPI_MCA_orte_hnp_uri=f"{(port - 61440) * 4096}.0;tcp://127.0.0.1:1", OMPI_COMM_WORLD_SIZE="2",
               OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_RANK=str(rank))
    procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=240) for p in procs]
  for rank, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, err[-3000:]
    joined, hybrid = out.splitlines()
    assert joined.split() == ["joined", str(rank), "2", "4"], out
    assert hybrid == "hybrid 2 2 [[0], [1]]", out  # the slow data axis crosses the hosts, fsdp stays inside one
    assert "detected from the Open MPI environment, 2 processes" in err and f"127.0.0.1:{port}" not in out


def test_unreachable_coordinator_fails_naming_the_address(tiny_config_file):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="1")
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", tiny_config_file, "--workdir",
                         os.devnull + "_unused", "--config.distributed.initialization_timeout_s=1"],
                        capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "could not reach the coordinator at 127.0.0.1:1 within 1 s" in proc.stderr


def _overrides(num_steps: int, mesh: str) -> list[str]:
  # One schedule horizon (4 steps) whatever the step cap: the 2-step run and its resumption compile one program.
  common = [f"--config.mesh.shape={mesh}", f"--config.train.num_steps={num_steps}", "--config.train.schedule_steps=4",
            "--config.checkpoint.every_steps=2",
            "--config.eval.every_steps=0", "--config.eval.batch_size=8", "--config.eval.max_sequences=8",
            "--config.eval.num_t_samples=2", f"--config.train.learning_rate={LEARNING_RATE}"]
  if mesh == MESHES[0]:  # with the held-out bound at steps 2 and 4 (keep_best evaluates every save), each process
    # scoring its half of every batch, and each checkpoint recording it; early stopping on (never reached): the
    # resumed processes take process 0's replay of metrics.jsonl (a broadcast)
    return common + ["--config.train.batch_size=8", "--config.model.dropless=True", "--config.eval.every_steps=4",
                     "--config.train.early_stop_patience=3", "--config.checkpoint.keep_best=1"]
  # pretrain_tiny's MoE sizes and batch with the CPU default dispatch (sorted): what showed the corruption
  return common + ["--config.train.batch_size=16", "--config.train.seq_len=128", "--config.model.embed_dim=128",
                   "--config.model.num_experts=8", "--config.model.expert_dim=128", "--config.model.dispatch=auto"]


def _run(cmd, env, log_dir=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, **env)
  if log_dir:
    env["WORKDIR_LOGS"] = log_dir
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
  logs = ""
  if log_dir and os.path.isdir(log_dir):
    for name in sorted(os.listdir(log_dir)):
      with open(os.path.join(log_dir, name)) as f:
        logs += f"--- {name}\n" + "".join(line for line in f if not line.startswith("W1"))[-3000:]
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs


def _final_params(config_file: str, workdir: str, step: int, overrides: list[str]):
  from diffgemma_jax.config import load_config
  from diffgemma_jax.model.config import ModelConfig
  from diffgemma_jax.parallel import make_mesh
  from diffgemma_jax.train import abstract_train_state, make_optimizer
  from diffgemma_jax.train.reading import open_run
  from launch.common import config_overrides
  config = load_config(config_file, config_overrides([o for o in overrides if "mesh.shape" not in o]))
  tx, _ = make_optimizer(config.train)
  _, abstract, shardings = abstract_train_state(ModelConfig.from_config_dict(config.model), tx, make_mesh())
  params = open_run(workdir, step, config=config).restore_params(abstract.params, shardings.params)
  import jax
  return [(jax.tree_util.keystr(path), np.asarray(x)) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]]


def _recorded_bounds(workdir: str) -> dict[int, tuple[float, bool]]:
  """{step: (the held-out bound readers rank it by, whether it came from metrics.jsonl rather than the step)}."""
  from diffgemma_jax.train import Checkpointer
  reader = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    return {step: (metrics["bits_per_token"], bool(metrics.get("logged")))
            for step, metrics in reader.recorded_bounds().items()}
  finally:
    reader.close()


def _grad_norms(workdir: str) -> dict[int, float]:
  return {r["step"]: r["train/grad_norm"] for r in read_metrics(workdir) if "train/grad_norm" in r}


@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_train_checkpoint_resume_and_match_one_process(mesh, tiny_config_file, tmp_path):
  """One process with 8 devices runs 4 steps; two processes with 4 devices each run 2 steps, stop, and resume from
  their shared checkpoint to step 4. Losses, gradient norms and the final checkpoint agree. The two-process runs
  share a compilation cache (as a restarted job would): the first compiles every program, the resumed one reads
  them back instead of compiling the same programs again (the cache keys on the program and XLA_FLAGS, so the
  resumed run executes what the first compiled)."""
  config = ["--config", tiny_config_file]
  single = str(tmp_path / "single")
  _run([sys.executable, "-m", "launch.train", "--no_progress", *config, "--workdir", single, *_overrides(4, mesh)],
       {"XLA_FLAGS": xla_flags(8)})
  multi = str(tmp_path / "multi")
  cache = [f"--config.compilation.cache_dir={tmp_path / 'jax-cache'}", "--config.compilation.min_compile_time_s=0"]
  _run([LOCAL_SH, "2", *config, "--workdir", multi, *_overrides(2, mesh), *cache], {}, str(tmp_path / "logs_a"))
  assert sorted(train_losses(multi)) == [1, 2]
  _run([LOCAL_SH, "2", *config, "--workdir", multi, *_overrides(4, mesh), *cache], {}, str(tmp_path / "logs_b"))

  single_losses, multi_losses = train_losses(single), train_losses(multi)
  assert sorted(multi_losses) == [1, 2, 3, 4] and all(len(v) == 1 for v in multi_losses.values())  # resumed at 2
  for step in range(1, 5):
    np.testing.assert_allclose(multi_losses[step][0], single_losses[step][0], rtol=1e-5)
  # AdamW hides a wrongly scaled gradient from the parameters (and the loss); its logged norm does not.
  single_norms, multi_norms = _grad_norms(single), _grad_norms(multi)
  assert sorted(multi_norms) == sorted(single_norms) == [1, 2, 3, 4]
  for step in range(1, 5):
    np.testing.assert_allclose(multi_norms[step], single_norms[step], rtol=1e-5)
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == sorted(
      os.listdir(os.path.join(single, "checkpoints")))
  if mesh == MESHES[0]:  # the trainer's held-out bound, each process loading its slice of the rows
    bounds = [{r["step"]: r for r in read_metrics(w) if "eval/bits_per_token" in r} for w in (single, multi)]
    assert sorted(bounds[0]) == [2, 4] and {2, 4} <= set(bounds[1]), bounds
    for step in (2, 4):
      for key in ("eval/bits_per_token", "eval/stderr_bits_per_token", "eval/num_tokens"):
        np.testing.assert_allclose(bounds[1][step][key], bounds[0][step][key], rtol=1e-5, err_msg=f"{step} {key}")
    recorded = [_recorded_bounds(w) for w in (single, multi)]  # process 0 of the launch wrote the multi run's
    assert sorted(recorded[1]) == sorted(recorded[0]) == [2, 4], recorded
    for step in (2, 4):
      assert not recorded[0][step][1] and not recorded[1][step][1]
      np.testing.assert_allclose(recorded[1][step][0], recorded[0][step][0], rtol=1e-5)
  else:  # without keep_best several processes save a step before evaluating it (a preemption never waits for an
    # evaluation): no bound recorded with the steps, where one process records the bound of its last step; readers
    # rank the multi-process run's steps by the evaluations its metrics.jsonl logged for them
    recorded = [_recorded_bounds(w) for w in (single, multi)]
    logged = {r["step"]: r["eval/bits_per_token"] for r in read_metrics(multi) if "eval/bits_per_token" in r}
    assert list(recorded[0]) == [4] and not recorded[0][4][1], recorded
    assert recorded[1] == {step: (logged[step], True) for step in (2, 4)}, (recorded, logged)
  model = _overrides(4, mesh)
  for (name, a), (_, b) in zip(_final_params(tiny_config_file, multi, 4, model),
                               _final_params(tiny_config_file, single, 4, model)):
    # Every parameter agrees to about 3e-8, except each layer's output scalar: its gradient sums every activation
    # of the layer and nearly cancels in this tiny model, so AdamW's update, normalised by that gradient's own
    # size, turns the two runs' different all-reduce order (1e-8 in the gradients) into up to 1.2e-5 after four
    # steps (measured at the fsdp x expert mesh; 4.8e-6 with the dispatch before pair routing). A resume that lost
    # or repeated an update would move every parameter by about the learning rate.
    scalar = "layer_scalar" in name
    np.testing.assert_allclose(a, b, rtol=0, atol=(0.5 if scalar else 0.1) * LEARNING_RATE, err_msg=name)


SBATCH = os.path.join(REPO, "launch", "multihost", "slurm.sbatch")


@pytest.mark.parametrize("train_status, script_status, requeued", [(4, 0, True), (0, 0, False), (3, 3, False)])
def test_slurm_script_requeues_a_run_stopped_by_sigterm(tmp_path, train_status, script_status, requeued):
  """slurm.sbatch run by bash with stand-ins for srun and scontrol: exit 4 (checkpoint saved on SIGTERM) requeues
  the job; success and failures end it with their status. The #SBATCH lines ask for the warning signal."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  for name, body in (("srun", f'echo "srun $*" >> {calls}\nexit {train_status}'),
                     ("scontrol", f'echo "scontrol $*" >> {calls}')):
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
  proc = subprocess.run(["bash", SBATCH, "--config", "c.py", "--workdir", "/shared/run"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == script_status, proc.stderr
  lines = calls.read_text().splitlines()
  assert lines[0] == "srun --kill-on-bad-exit=1 python -m launch.train --no_progress --config c.py --workdir /shared/run"
  assert (lines[1:] == ["scontrol requeue 4242"]) == requeued and len(lines) == 1 + requeued, lines
  header = open(SBATCH).read()
  assert "#SBATCH --signal=TERM@300" in header and "#SBATCH --requeue" in header


JOBSET = os.path.join(REPO, "launch", "multihost", "jobset.yaml")


def test_kubernetes_jobset_gives_each_pod_the_environment_our_start_up_reads():
  """launch/multihost/jobset.yaml (no cluster here): the coordinator is pod 0 by the JobSet's DNS rule
  (<jobset>-<replicated job>-0-0.<subdomain, default the jobset>) on a port the container opens, the process count
  is the pod count, each pod's id its completion index; that environment gives distributed_settings a valid run,
  and the container's command is the trainer's with a config that loads under its overrides."""
  import yaml

  from diffgemma_jax.config import load_config
  from diffgemma_jax.parallel.distributed import ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID
  with open(JOBSET) as f:
    doc = yaml.safe_load(f)
  (job,) = doc["spec"]["replicatedJobs"]
  spec = job["template"]["spec"]
  (container,) = spec["template"]["spec"]["containers"]
  env = {e["name"]: e for e in container["env"]}
  name = doc["metadata"]["name"]
  host, port = env[ENV_ADDRESS]["value"].rsplit(":", 1)
  assert host == f"{name}-{job['name']}-0-0.{doc['spec']['network'].get('subdomain', name)}"
  assert int(port) in [p["containerPort"] for p in container["ports"]]
  pods = spec["completions"] * job["replicas"]
  assert spec["completionMode"] == "Indexed" and spec["parallelism"] == pods == int(env[ENV_NUM_PROCESSES]["value"])
  assert env[ENV_PROCESS_ID]["valueFrom"]["fieldRef"]["fieldPath"] == \
      "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  for index in range(pods):
    pod_env = {ENV_ADDRESS: env[ENV_ADDRESS]["value"], ENV_NUM_PROCESSES: env[ENV_NUM_PROCESSES]["value"],
               ENV_PROCESS_ID: str(index)}
    assert distributed_settings(_section(), env=pod_env)["process_id"] == index
  command = container["command"]
  assert command[:3] == ["python", "-m", "launch.train"]
  config = command[command.index("--config") + 1]
  overrides = dict(flag[len("--config."):].split("=", 1) for flag in command if flag.startswith("--config."))
  assert load_config(os.path.join(REPO, config), overrides).mesh.shape == (-1, 1, 8, 1)


def _sbatch_examples(text: str) -> list[list[str]]:
  """The `sbatch --nodes=N launch/multihost/slurm.sbatch ...` commands in `text` (README, the script's comment),
  continuation lines joined, as argument lists."""
  import shlex
  joined = text.replace("\\\n", " ").replace("#       ", "")
  return [shlex.split(line[line.index("sbatch --nodes="):]) for line in joined.splitlines()
          if "sbatch --nodes=" in line]


def _check_fits(config_file: str, flags: list[str], hosts: int, gpus_per_host: int = 8) -> None:
  """The batch and expert checks a run makes at start, on the mesh `hosts` x `gpus_per_host` GPUs give it."""
  from diffgemma_jax.config import load_config
  from diffgemma_jax.parallel.mesh import check_mesh_fits, resolve_mesh_shape
  overrides = dict(flag[len("--config."):].split("=", 1) for flag in flags if flag.startswith("--config."))
  config = load_config(os.path.join(REPO, config_file), overrides)
  if config.mesh.dcn_shape:
    assert int(np.prod(config.mesh.dcn_shape)) == hosts
    shape = np.multiply(resolve_mesh_shape(config.mesh.shape, gpus_per_host), config.mesh.dcn_shape)
  else:
    shape = resolve_mesh_shape(config.mesh.shape, hosts * gpus_per_host)
  shape = tuple(int(n) for n in shape)
  devices = _devices(lambda index: int(np.ravel_multi_index(index, shape)) // (math.prod(shape) // hosts), shape)
  for device in devices.flat:
    device.platform = "gpu"
  check_mesh_fits(config, types.SimpleNamespace(shape=dict(zip(config.mesh.axes, shape)), devices=devices,
                                                axis_names=tuple(config.mesh.axes)))


def test_the_multi_host_examples_start_on_the_meshes_they_name():
  """README's and slurm.sbatch's sbatch commands and the JobSet's command pass the start-up checks (batch sizes
  divisible by the data-parallel size, experts by the expert axis) on their hosts' GPUs (8 per host)."""
  import yaml
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f, open(SBATCH, encoding="utf-8") as g:
    examples = _sbatch_examples(f.read()) + _sbatch_examples(g.read())
  assert len(examples) >= 3, examples
  for command in examples:
    hosts = int(command[1].split("=")[1])
    _check_fits(command[command.index("--config") + 1], command, hosts)
  with open(JOBSET) as f:
    (job,) = yaml.safe_load(f)["spec"]["replicatedJobs"]
  (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
  command = container["command"]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
  _check_fits(command[command.index("--config") + 1], command, job["template"]["spec"]["completions"])


def test_dcn_shape_errors_name_the_key():
  from diffgemma_jax.parallel import make_mesh
  with pytest.raises(ConfigError, match=r"mesh.dcn_shape=\(2, 1, 1, 1\) spans 2 processes \(hosts\), but the run "
                                        r"has 1"):
    make_mesh((1, 1, 1, 1), dcn_shape=(2, 1, 1, 1))
  with pytest.raises(ConfigError, match=r"mesh.dcn_shape=\(2, 1\): one positive size per mesh axis"):
    make_mesh((1, 1, 1, 1), dcn_shape=(2, 1))
  assert dict(make_mesh((1, 1, 1, -1), dcn_shape=(1, 1, 1, 1)).shape)["tensor"] >= 1


def _devices(process_of_index, shape):
  """A device array of stand-ins whose process is `process_of_index(index)`."""
  devices = np.empty(shape, object)
  for index in np.ndindex(*shape):
    devices[index] = types.SimpleNamespace(process_index=process_of_index(index))
  return devices


def test_processes_holding_the_same_rows_load_the_same_slice():
  """Each process loads one slice of every global batch: its own where it holds its own rows, a shared one where a
  tensor or context axis across hosts makes processes replicas (their data must be identical), an error where
  rows partly overlap."""
  from diffgemma_jax.parallel.mesh import batch_slices
  # data across two hosts, fsdp inside: each process its own rows
  assert batch_slices(_devices(lambda i: i[0], (2, 4)), ("data", "fsdp")) == ({0: 0, 1: 1}, 2)
  # tensor across two hosts: both hold every row
  assert batch_slices(_devices(lambda i: i[0] // 4, (8,)), ("tensor",)) == ({0: 0, 1: 0}, 1)
  # data x context with context across hosts: both hold rows 0 and 1
  assert batch_slices(_devices(lambda i: i[1] // 2, (2, 4)), ("data", "context")) == ({0: 0, 1: 0}, 1)
  # four hosts: tensor pairs them, data splits the pairs
  assert batch_slices(_devices(lambda i: 2 * (i[0] // 2) + i[1], (4, 2)), ("data", "tensor")) == (
      {0: 0, 1: 0, 2: 1, 3: 1}, 2)
  # process 1's rows overlap process 0's and process 2's
  overlapping = {(0, 0): 0, (1, 0): 0, (1, 1): 1, (2, 0): 1, (0, 1): 2, (2, 1): 2, (3, 0): 3, (3, 1): 3}
  with pytest.raises(ConfigError, match=r"processes \[0\] and \[1\] hold overlapping but different batch rows"):
    batch_slices(_devices(overlapping.get, (4, 2)), ("data", "tensor"))


def test_two_processes_with_tensor_across_them_match_one_process(tiny_config_file, tmp_path):
  """mesh (1,1,1,8) over two processes: every row on both hosts, so both load the same rows (before, each loaded
  half the batch into the same replicated array: a global batch of 4 rows, different on each host). Three steps'
  losses and gradient norms equal one process's.

  The run is timed (wsd_time, train.max_runtime_s), so the processes take the multi-process path of the clock's
  decisions: process 0 broadcasts whether the budget is spent and where the decay goes at every logged step. A
  budget of an hour leaves the step cap to place the decay (after step 1 of 3, to the horizon 3: the clock's own
  placement would differ between runs), so both runs follow one schedule; its record and each step's rate equal one process's. No warmup:
  the first update moves the parameters, so the second step's loss and gradient compare the updated ones (at
  LEARNING_RATE, the scale at which AdamW's sign-like first step keeps float32 noise below the tolerance)."""
  config = ["--config", tiny_config_file]
  overrides = ["--config.mesh.shape=(1,1,1,8)", "--config.train.num_steps=3", "--config.checkpoint.every_steps=3",
               "--config.eval.every_steps=0", "--config.eval.batch_size=8", "--config.eval.max_sequences=8",
               "--config.eval.num_t_samples=2", "--config.train.batch_size=8", "--config.train.seq_len=32",
               "--config.train.lr_schedule=wsd_time", "--config.train.max_runtime_s=3600",
               "--config.train.decay_fraction=0.7", "--config.train.warmup_steps=0",
               f"--config.train.learning_rate={LEARNING_RATE}"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  _run([sys.executable, "-m", "launch.train", "--no_progress", *config, "--workdir", single, *overrides],
       {"XLA_FLAGS": xla_flags(8)})
  _run([LOCAL_SH, "2", *config, "--workdir", multi, *overrides], {}, str(tmp_path / "logs"))
  single_losses, multi_losses = train_losses(single), train_losses(multi)
  assert sorted(multi_losses) == sorted(single_losses) == [1, 2, 3]
  for step in (1, 2, 3):
    np.testing.assert_allclose(multi_losses[step][0], single_losses[step][0], rtol=1e-5)
  np.testing.assert_allclose([_grad_norms(multi)[s] for s in (1, 2, 3)], [_grad_norms(single)[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  decays = [json.loads((tmp_path / run / "lr_decay.json").read_text()) for run in ("single", "multi")]
  assert [(d["decay_start"], d["horizon"]) for d in decays] == [(1, 3)] * 2, decays
  rates = [{r["step"]: r["train/lr"] for r in read_metrics(w) if "train/lr" in r} for w in (single, multi)]
  assert sorted(rates[1]) == [1, 2, 3] and rates[0] == rates[1] and rates[1][3] < 0.6 * rates[1][2], rates
  assert rates[1][2] == pytest.approx(rates[1][1], rel=1e-6)  # the decay's first update is at the peak



def test_local_sh_appends_process_0_to_a_redirected_output_and_stops_the_others(tmp_path):
  """Process 0 writes into local.sh's own output (the caller's file keeps what it wrote before and after), the
  other processes' output is dropped, and a failing process's status comes back. A stand-in python echoes; process
  1 fails once process 0 has written."""
  fake, mark = tmp_path / "python", tmp_path / "written"
  fake.write_text(f"""#!/bin/sh
if [ "$JAX_PROCESS_ID" = 0 ]; then echo "process 0 of $JAX_NUM_PROCESSES: $*"; touch {mark}; exit 0; fi
echo "process 1"; for i in $(seq 100); do [ -e {mark} ] && exit 5; sleep 0.1; done; exit 5
""")
  fake.chmod(0o755)
  out = tmp_path / "out.log"
  with open(out, "w") as f:
    subprocess.run(["bash", "-c", f"echo before; {LOCAL_SH} 2 --workdir w; echo status $?"], stdout=f,
                   stderr=subprocess.STDOUT, env=dict(os.environ, PYTHON=str(fake), COORDINATOR_PORT="1"), timeout=60,
                   check=True)
  lines = out.read_text().splitlines()
  assert lines[0] == "before" and lines[-1] == "status 5", lines
  assert "process 0 of 2: -m launch.train --no_progress --workdir w" in lines and "process 1" not in lines, lines


def _printed_document(log: str) -> dict:
  """The JSON document an entry point printed (indented, from a line `{` to a line `}`) in a log that also holds
  its stderr."""
  import json
  lines = log.splitlines()
  start = lines.index("{")
  return json.loads("\n".join(lines[start:lines.index("}", start) + 1]))


def test_two_processes_evaluate_one_bound_equal_to_one_process(trained_run, tiny_config_file, tmp_path):
  """`ENTRY=launch.evaluate local.sh 2`: two processes (4 fake CPU devices each) join the runtime and evaluate the
  session's trained run on a (2,4,1,1) mesh, data across the two, each loading its half of every batch of 8 rows;
  12 held-out rows make the second batch half padding (process 1's slice of it is all padding). The bound, its
  errors and its counts equal one process's on the same mesh of 8 devices; process 1 prints nothing and says that
  process 0 writes; `--output` holds process 0's document; the partial results are gone once done."""
  import json

  from conftest import TRAINED_OVERRIDES
  _, workdir, _ = trained_run
  flags = ["--config", tiny_config_file, "--workdir", workdir,
           *[f"--config.{key}={value}" for key, value in TRAINED_OVERRIDES.items()],
           "--config.mesh.shape=(2,4,1,1)", "--config.eval.batch_size=8", "--config.eval.max_sequences=12"]
  single, multi = tmp_path / "single.json", tmp_path / "multi.json"
  _run([sys.executable, "-m", "launch.evaluate", *flags, "--partial_dir", str(tmp_path / "partial_single"),
        "--output", str(single)], {"XLA_FLAGS": xla_flags(8)})
  logs = tmp_path / "logs"
  _run([LOCAL_SH, "2", *flags, "--partial_dir", str(tmp_path / "partial_multi"), "--output", str(multi)],
       {"ENTRY": "launch.evaluate", "XLA_FLAGS": xla_flags()}, str(logs))

  expected, result = json.loads(single.read_text()), json.loads(multi.read_text())
  assert expected["num_sequences"] == 12 and sorted(result) == sorted(expected), (expected, result)
  for key in ("num_tokens", "num_sequences", "num_examples", "step", "num_t_samples", "exact"):
    assert result[key] == expected[key], key
  for key in ("bits_per_token", "stderr_bits_per_token", "mc_stderr_bits_per_token", "nats_per_token", "ppl_bound",
              "unigram_ppl"):
    np.testing.assert_allclose(result[key], expected[key], rtol=1e-5, err_msg=key)
  process_0, process_1 = ((logs / f"process_{i}.log").read_text() for i in range(2))
  assert "process 1 of 2: joining the run" in process_1, process_1[-2000:]
  assert "process 1 of 2: process 0 writes this command's output files" in process_1
  assert '"bits_per_token"' not in process_1
  assert _printed_document(process_0) == result
  assert not os.listdir(tmp_path / "partial_multi")


def test_local_sh_refuses_an_entry_that_is_not_a_module():
  proc = subprocess.run(["bash", LOCAL_SH, "2", "--workdir", "w"], env=dict(os.environ, ENTRY="launch/evaluate.py"),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and proc.stderr.strip().endswith(
      "ENTRY=launch/evaluate.py is not a module name (e.g. launch.train, launch.evaluate)"), proc.stderr


def test_two_processes_score_the_records_as_one_process(trained_run, tiny_config_file, tmp_path):
  """`ENTRY=launch.score local.sh 2`: two joined processes (4 fake CPU devices each, data across them) score 9
  records in two row widths, each process loading its half of every batch's rows; every record's bound, standard
  error and token count equal one process's on the same mesh of 8 devices, and process 0 alone writes and prints.
  They finish a job another run began: the results file's records are not scored again."""
  import json

  from conftest import TRAINED_OVERRIDES
  _, workdir, _ = trained_run
  records = tmp_path / "records.jsonl"
  words = "def read the config path return value for line in open".split()
  records.write_text("".join(json.dumps({"prompt": " ".join(words[:1 + i % 5]) * (1 + 3 * (i % 3)),
                                         "continuation": " " + " ".join(words[i % 4:i % 4 + 2])}) + "\n"
                             for i in range(9)))
  flags = ["--config", tiny_config_file, "--workdir", workdir, "--records", str(records), "--batch_size", "8",
           "--num_t_samples", "4", *[f"--config.{key}={value}" for key, value in TRAINED_OVERRIDES.items()],
           "--config.mesh.shape=(2,4,1,1)"]
  # (into results files: the two processes resume a job whose file holds the single run's first 4 records,
  # process 0 alone reading it and handing the others the list of what is done)
  single, multi = tmp_path / "single.jsonl", tmp_path / "multi.jsonl"
  _run([sys.executable, "-m", "launch.score", *flags, "--output", str(single)], {"XLA_FLAGS": xla_flags(8)})
  expected = [json.loads(line) for line in single.read_text().splitlines()]
  multi.write_text("".join(line + "\n" for line in single.read_text().splitlines()[:4]))
  logs = tmp_path / "logs"
  _run([LOCAL_SH, "2", *flags, "--output", str(multi)], {"ENTRY": "launch.score", "XLA_FLAGS": xla_flags()},
       str(logs))
  result = [json.loads(line) for line in multi.read_text().splitlines()]
  assert len(expected) == 9 and len({r["num_tokens"] for r in expected}) > 1 and len(result) == 9
  for want, got in zip(expected, result):
    assert (got["index"], got["num_tokens"], got["source"]) == (want["index"], want["num_tokens"], want["source"])
    np.testing.assert_allclose([got["nll"], got["stderr"]], [want["nll"], want["stderr"]], rtol=1e-5)
  process_0, process_1 = ((logs / f"process_{i}.log").read_text() for i in range(2))
  assert "process 1 of 2: joining the run" in process_1 and "total:" not in process_1, process_1[-2000:]
  assert "total:" in process_0 and "4 record(s) already scored, 5 to score" in process_0


def test_a_readers_own_batch_size_is_checked_against_the_mesh_by_its_flag(tiny_config_file):
  """The scorer's `--batch_size` (the harness's batch_size model arg) is what it feeds the mesh, so a size the
  data-parallel rows do not divide is refused naming that flag, not the config's eval.batch_size it replaces."""
  from diffgemma_jax.config import load_config
  from diffgemma_jax.parallel.mesh import check_mesh_fits
  config = load_config(tiny_config_file, {"eval.batch_size": "8"})
  shape = (2, 4, 1, 1)
  mesh = types.SimpleNamespace(shape=dict(zip(config.mesh.axes, shape)), axis_names=tuple(config.mesh.axes),
                               devices=_devices(lambda index: 0, shape))
  check_mesh_fits(config, mesh, training=False)
  check_mesh_fits(config, mesh, training=False, eval_batch=(16, "--batch_size"))
  with pytest.raises(ConfigError, match=r"^--batch_size=4 is not divisible by the data-parallel size 8 "):
    check_mesh_fits(config, mesh, training=False, eval_batch=(4, "--batch_size"))
  # a reader with no evaluation batch (generation) is not held to eval.batch_size
  odd = load_config(tiny_config_file, {"eval.batch_size": "6"})
  with pytest.raises(ConfigError, match=r"^eval\.batch_size=6 is not divisible"):
    check_mesh_fits(odd, mesh, training=False)
  check_mesh_fits(odd, mesh, training=False, check_eval_batch=False)

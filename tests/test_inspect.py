import json
import os
import subprocess
import sys

from conftest import xla_flags


def test_inspect_cli_reports_the_reference_totals():
  out = subprocess.run([sys.executable, "-m", "launch.inspect", "--config", "configs/diffusiongemma_26b_a4b.py",
                        "--json"], capture_output=True, text=True, check=True).stdout
  report = json.loads(out)
  assert abs(report["total_params"] / 25.2e9 - 1) < 0.02
  assert abs(report["active_params_per_token"] / 3.8e9 - 1) < 0.05
  assert report["forward_flops_per_token"] > 2 * report["active_params_per_token"]


def test_inspect_cli_bad_override_exits_nonzero_naming_the_key():
  proc = subprocess.run([sys.executable, "-m", "launch.inspect", "--config", "configs/pretrain_tiny.py",
                         "--config.model.top_k=99"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert "model.top_k" in proc.stderr


# In a process of its own (--devices fakes 4 CPU devices before JAX starts): the CLI's --memory report on an
# fsdp 2 x expert 2 mesh with the router frozen and a moving average kept, then the same config's state
# initialised for real on those devices.
_MEMORY_PROBE = """
import contextlib, io, json, sys
from launch.inspect import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
  status = main(["--config", "configs/pretrain_tiny.py", "--memory", "--compile", "--devices", "4", "--json"] + OVERRIDES)
assert status == 0, status
import jax
from diffgemma_jax.config import load_config
from diffgemma_jax.train.compiled import compile_train_step
from diffgemma_jax.train.freeze import split_trainable
built = compile_train_step(load_config("configs/pretrain_tiny.py", dict(o[len("--config."):].split("=", 1)
                                                                       for o in OVERRIDES)), mask_id=4)
state = built.init_state()
trained, frozen = split_trainable(state.params, built.trainable)

def held(tree):  # bytes of the arrays' shards on each device
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return per_device

print(json.dumps({"report": json.loads(out.getvalue())["memory"], "trainable_params": held(trained),
                  "frozen_params": held(frozen), "optimizer": held(state.opt_state), "step": held(state.step),
                  "moving_average": held(state.ema)}))
"""


def test_memory_report_is_what_each_device_holds():
  """--memory's train-state bytes equal, part by part (the moving average too), the bytes of the shards each of
  the 4 devices holds once the state is initialised there; XLA's account of the compiled step takes exactly that
  state plus the device's batch rows and the step's key as arguments, and aliases the whole state (it is
  donated)."""
  overrides = ["--config.mesh.shape=(1,2,2,1)", "--config.train.freeze=('router',)", "--config.train.ema_decay=0.999"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", f"OVERRIDES = {overrides!r}\n" + _MEMORY_PROBE],
                        capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = json.loads(proc.stdout.splitlines()[-1])
  report, state = found["report"], found["report"]["state_bytes"]
  assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1} and report["devices"] == 4
  parts = ("trainable_params", "frozen_params", "optimizer", "step", "moving_average")
  for part in parts:
    assert sorted(found[part]) == ["0", "1", "2", "3"], (part, found[part])
    assert set(found[part].values()) == {state[part]}, (part, found[part], state[part])
  assert state["frozen_params"] > 0 and state["optimizer"] > state["trainable_params"]
  assert state["moving_average"] == state["trainable_params"]  # float32, sharded as the parameters it averages
  assert state["total"] == sum(state[p] for p in parts)
  step = report["step_bytes"]
  batch_size, seq_len = report["batch"]
  rows_bytes = 3 * (batch_size // 4) * seq_len * 4  # tokens, segment ids, positions (int32): 4 rows a device
  assert step["arguments"] == state["total"] + rows_bytes + 8  # + the step's threefry key, uint32[2]
  assert step["aliased"] == state["total"]
  assert step["peak"] == step["arguments"] + step["outputs"] - step["aliased"] + step["temporaries"]


def test_memory_flags_fail_in_one_line():
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  cases = (
      (["--compile"], "--compile, --devices and --device_memory_gib go with --memory"),
      (["--memory", "--devices", "3", "--config.mesh.shape=(1,2,2,1)"], "mesh.shape=(1, 2, 2, 1) holds 4 devices "
       "but 3 are available"),
      (["--memory", "--device_memory_gib", "0"], "--device_memory_gib 0: give one device's memory in GiB, > 0"),
  )
  for flags, message in cases:
    proc = subprocess.run([sys.executable, "-m", "launch.inspect", "--config", "configs/pretrain_tiny.py", *flags],
                          capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc
    assert message in lines[0], lines


def test_memory_lines_of_the_26b_config_on_eight_devices():
  """The human report, without compiling: DiffusionGemma's 25.3B parameters at expert 8 hold the experts' eighth
  and every other parameter whole (float32), and AdamW's two moments double them."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "launch.inspect", "--config", "configs/diffusiongemma_26b_a4b.py",
                        "--memory", "--devices", "8", "--config.mesh.shape=(1,1,8,1)", "--device_memory_gib", "79.6"],
                       capture_output=True, text=True, env=env, check=True).stdout
  from diffgemma_jax.config import load_config
  from diffgemma_jax.model.config import ModelConfig
  from diffgemma_jax.model.inspect import count_params
  counts = count_params(ModelConfig.from_config_dict(load_config("configs/diffusiongemma_26b_a4b.py").model))
  experts = counts["params_by_component"]["experts"]
  expected = 4 * (counts["total_params"] - experts + experts // 8)
  assert f"  parameters             {expected / 2 ** 30:.2f} GiB trained\n" in out, out
  assert f"  optimizer state        {2 * expected / 2 ** 30:.2f} GiB (adamw)\n" in out, out
  assert "mesh data 1 x fsdp 1 x expert 8 x tensor 1 (8 cpu device(s)), batch 8 x 4096" in out, out
  assert f"  of 79.6 GiB            the train state takes {3 * expected / 2 ** 30:.2f} GiB (" in out, out

"""Learning-rate schedules against their closed forms, their values around a resume that extends a run, the
Adafactor option, and the run history a resume appends to."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, read_metrics
from diffgemma_jax.train.optimizer import (
  describe_schedule_change,
  learning_rate_schedule,
  make_optimizer,
  schedule_change,
)

PEAK, FLOOR_RATIO, WARMUP = 1e-3, 0.1, 10


def _train(**changes) -> ml_collections.ConfigDict:
  from diffgemma_jax.config import base_config
  train = base_config().train
  train.update(learning_rate=PEAK, min_lr_ratio=FLOOR_RATIO, warmup_steps=WARMUP, num_steps=100)
  train.update(**changes)
  return train


def _lr(train, step: int) -> float:
  return float(learning_rate_schedule(train)(step))


def test_each_schedule_follows_its_closed_form():
  floor = PEAK * FLOOR_RATIO
  for name in ("cosine", "linear", "constant", "wsd"):
    train = _train(lr_schedule=name, decay_steps=20)
    assert _lr(train, 0) == 0.0 and _lr(train, 5) == pytest.approx(PEAK / 2), name  # linear warmup
    assert _lr(train, WARMUP) == pytest.approx(PEAK), name
  cosine, linear = _train(lr_schedule="cosine"), _train(lr_schedule="linear")
  for step in (10, 37, 55, 90, 100, 150):
    frac = min((step - WARMUP) / (100 - WARMUP), 1.0)
    assert _lr(cosine, step) == pytest.approx(floor + (PEAK - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
    assert _lr(linear, step) == pytest.approx(PEAK + (floor - PEAK) * frac)
  assert _lr(_train(lr_schedule="constant"), 10_000) == pytest.approx(PEAK)
  wsd = _train(lr_schedule="wsd", decay_steps=20)  # plateau to step 80, linear decay to the floor at 100
  assert [_lr(wsd, s) for s in (30, 80)] == pytest.approx([PEAK, PEAK])
  assert _lr(wsd, 90) == pytest.approx((PEAK + floor) / 2) and _lr(wsd, 100) == pytest.approx(floor)
  # the decay horizon is a key of its own: schedule_steps, not num_steps
  assert _lr(_train(lr_schedule="linear", schedule_steps=50), 30) == pytest.approx(PEAK + (floor - PEAK) * 0.5)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_extending_a_run_keeps_the_rate_continuous_except_under_decaying_schedules(name):
  """A run of 100 steps preempted at 60, resumed with num_steps 300: around the resume the extended schedule must
  give the rates the run had (wsd: still on its plateau; constant) or say how it jumps (cosine, linear)."""
  before, after = _train(lr_schedule=name, decay_steps=20), _train(lr_schedule=name, decay_steps=20, num_steps=300)
  change = schedule_change(before, after, 60)
  message = describe_schedule_change(before, after, 60)
  if name in ("wsd", "constant"):
    assert change is None and message is None
    assert [_lr(after, s) for s in (59, 60, 61)] == pytest.approx([_lr(before, s) for s in (59, 60, 61)])
  else:
    old, new = change
    assert old == pytest.approx(_lr(before, 60)) and new == pytest.approx(_lr(after, 60)) and new > 1.5 * old
    assert f"jumps from {old:.3g} to {new:.3g}" in message and "keep train.schedule_steps=100" in message
    assert schedule_change(before, _train(lr_schedule=name, num_steps=300, schedule_steps=100), 60) is None


def test_bad_schedule_settings_name_the_key(load_tiny):
  from diffgemma_jax.errors import ConfigError
  for overrides, message in (({"train.lr_schedule": "step"}, "train.lr_schedule: unknown schedule 'step'"),
                             ({"train.optimizer": "sgd"}, "train.optimizer: unknown optimizer 'sgd'"),
                             ({"train.lr_schedule": "wsd"}, r"train.decay_steps=0: the wsd schedule needs a decay"),
                             ({"train.decay_steps": "-1"}, "train.decay_steps: must be >= 0")):
    with pytest.raises(ConfigError, match=message):
      load_tiny(overrides)


def test_adafactor_keeps_a_small_fraction_of_adamws_state_on_the_released_architecture():
  """Factored second moments: on the 26B reference model Adafactor's state is a few percent of AdamW's two
  moments, and AdamW with its first moment in bfloat16 holds 6 bytes a parameter (counted on abstract shapes,
  nothing allocated)."""
  from flax import nnx

  from diffgemma_jax.config import load_config
  from diffgemma_jax.model import ModelConfig, build_model
  config = load_config("configs/diffusiongemma_26b_a4b.py")
  params = nnx.state(nnx.eval_shape(lambda: build_model(ModelConfig.from_config_dict(config.model), 0)), nnx.Param)
  sizes, states = {}, {}
  for name, mu_dtype in (("adamw", ""), ("adafactor", ""), ("adamw", "bfloat16")):
    train = config.train.copy_and_resolve_references()
    with train.unlocked():
      train.optimizer, train.adam_mu_dtype = name, mu_dtype
    tx, _ = make_optimizer(train)
    states[name, mu_dtype] = jax.eval_shape(tx.init, params)
    sizes[name, mu_dtype] = sum(x.size for x in jax.tree.leaves(states[name, mu_dtype]))
  total = sum(x.size for x in jax.tree.leaves(params))
  assert sizes["adamw", ""] == pytest.approx(2 * total, rel=1e-6)
  assert sizes["adafactor", ""] < 0.02 * sizes["adamw", ""], sizes
  # train.adam_mu_dtype=bfloat16: the first moment in bfloat16, the second in the parameters' float32; the state's
  # bytes 6 per parameter instead of 8
  nbytes = lambda state: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))  # noqa: E731
  adam = [part for part in jax.tree.leaves(states["adamw", "bfloat16"], is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(part, "mu")]
  assert len(adam) == 1
  assert {x.dtype for x in jax.tree.leaves(adam[0].mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam[0].nu)} == {jnp.dtype(jnp.float32)}
  assert nbytes(states["adamw", "bfloat16"]) == pytest.approx(6 * total, rel=1e-6)
  assert nbytes(states["adamw", ""]) == pytest.approx(8 * total, rel=1e-6)


def test_a_resume_that_extends_the_run_warns_and_is_recorded(trained_run, load_tiny, tmp_path, capsys):
  """The trained run (cosine over 24 steps) extended to 26: the rate jumps at step 24 and the run says by how much;
  the history gets a second record with the new overrides; the optimizer cannot change under a resume, the dtype of
  AdamW's first moment can (the saved float32 moment restored as bfloat16, and saved so)."""
  from diffgemma_jax.errors import IncompatibleCheckpointError
  from diffgemma_jax.train import train
  from diffgemma_jax.train.history import read_history
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_dir, workdir)
  overrides = dict(TRAINED_OVERRIDES, **{"train.num_steps": "26"})
  with pytest.raises(IncompatibleCheckpointError, match="train.optimizer='adamw', not 'adafactor'"):
    train(load_tiny(dict(overrides, **{"train.optimizer": "adafactor"})), workdir, show_progress=False)
  config = load_tiny(dict(overrides, **{"train.adam_mu_dtype": "bfloat16"}))
  train(config, workdir, show_progress=False, overrides={"train.num_steps": "26", "train.adam_mu_dtype": "bfloat16"},
        command=["diffgemma-train", "--config.train.num_steps=26", "--config.train.adam_mu_dtype=bfloat16"])
  import orbax.checkpoint as ocp
  saved = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", "26", "opt_state"))
  adam = [node for node in jax.tree.leaves(getattr(saved, "item_metadata", saved),
                                           is_leaf=lambda x: isinstance(x, dict) and "mu" in x)
          if isinstance(node, dict) and "mu" in node]
  dtypes = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "dtype"))}  # noqa: E731
  assert len(adam) == 1 and dtypes(adam[0]["mu"]) == {"bfloat16"} and dtypes(adam[0]["nu"]) == {"float32"}, adam
  err = capsys.readouterr().err
  old, new = _lr(load_tiny(TRAINED_OVERRIDES).train, TRAINED_STEPS), _lr(config.train, TRAINED_STEPS)
  assert f"resuming at step {TRAINED_STEPS}, the learning rate jumps from {old:.3g} to {new:.3g}" in err, err
  lrs = {r["step"]: r["train/lr"] for r in read_metrics(workdir) if "train/lr" in r}
  assert lrs[TRAINED_STEPS + 1] == pytest.approx(new, rel=1e-6)  # the update after the resume used the new rate
  history = read_history(workdir)
  assert [r["start_step"] for r in history] == [0, TRAINED_STEPS]
  last = history[-1]
  assert last["overrides"] == {"train.num_steps": "26", "train.adam_mu_dtype": "bfloat16"}
  assert last["command"][1:] == ["--config.train.num_steps=26", "--config.train.adam_mu_dtype=bfloat16"]
  assert last["config"]["train"]["adam_mu_dtype"] == "bfloat16"
  assert last["config"]["train"]["num_steps"] == 26 and history[0]["config"]["train"]["num_steps"] == TRAINED_STEPS
  assert last["jax"] == jax.__version__ and last["diffgemma_jax"]
  assert json.loads(json.dumps(last)) == last and os.path.isfile(os.path.join(workdir, "run_history.jsonl"))

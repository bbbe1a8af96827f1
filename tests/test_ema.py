"""The parameters' moving average (`train.ema_decay`, train/ema.py): its recurrence over the trainable parameters,
its place in checkpoints (an exact resume; switched on by a resume), the readers that take it
(`checkpoint.weights`), its bytes in the memory report, and the errors for bad settings."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, read_metrics
from diffgemma_jax.errors import ConfigError

# The runs here rerun the programs their first run compiled (a resume, the evaluations) from JAX's cache.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _flat(state) -> dict[str, np.ndarray]:
  """{path: float64 array} of an nnx.State's leaves."""
  return {"/".join(map(str, path)): np.asarray(v.get_value(), np.float64) for path, v in nnx.to_flat_state(state)}


def _flat_pure(tree) -> dict[str, np.ndarray]:
  """{path: float64 array} of a checkpoint item read by plain Orbax (nested dicts)."""
  from diffgemma_jax.train.reading import flat_paths
  return {path: np.asarray(x, np.float64) for path, x in flat_paths(tree).items()}


def _decay(decay: float, n: int) -> float:
  return min(decay, (1 + n) / (10 + n))


def test_average_follows_its_recurrence_over_the_trainable_parameters(load_tiny):
  """Four updates with decay 0.28, the router frozen: the average is the float32 trainable parameters at first,
  then ema_n = ema_{n-1} + (1 - min(0.28, (1 + n) / (10 + n))) (p_n - ema_{n-1}) (the warm-up factors 2/11 and
  3/12 at n = 1, 2, the configured 0.28 from n = 3), computed here in float64 from the parameters each update
  leaves; the frozen router has no average. Seen to fail with the warm-up left out (0.28 from the first update;
  the first update moves nothing at the warm-up's learning rate 0, the second shows it)."""
  from diffgemma_jax.train import compile_train_step, synthetic_batch
  from diffgemma_jax.train.state import trainable_part
  config = load_tiny({"train.ema_decay": "0.28", "train.freeze": "('router',)"})
  built = compile_train_step(config, mask_id=4)
  state = built.init_state()
  trained = lambda s: _flat(trainable_part(s.params, built.trainable))  # noqa: E731
  expected = trained(state)
  for path, value in _flat(state.ema).items():
    np.testing.assert_array_equal(value, expected[path])
  assert set(_flat(state.ema)) == set(expected)
  assert any("router" in path for path in _flat(state.params)) and not any("router" in path for path in expected)
  for n in (1, 2, 3, 4):
    batch = built.place(synthetic_batch(4, 32, config.model.vocab_size, seed=n))
    state, _ = built.step(state, batch, jax.random.key(0), *built.decay_args())
    params, rate = trained(state), 1.0 - _decay(0.28, n)
    expected = {path: e + rate * (params[path] - e) for path, e in expected.items()}
    average = _flat(state.ema)
    assert set(average) == set(expected)
    for path, value in average.items():
      np.testing.assert_allclose(value, expected[path], rtol=1e-6, atol=1e-8, err_msg=f"update {n}, {path}")
  moved = [path for path in average if not np.allclose(average[path], params[path], rtol=1e-3, atol=1e-6)]
  # the weight matrices (the norms' scales hardly move in four early updates): a wrong decay would show
  assert "embedder/embedding" in moved and len(moved) >= 10, moved


def test_run_saves_the_average_resumes_it_exactly_and_readers_take_it(load_tiny, tmp_path):
  """A 4-step run with train.ema_decay: each checkpoint holds the item `ema` (every trainable parameter); a rerun
  from step 2 ends with the same average and parameters, bit for bit; the trainer's final bound is the moving
  average's, and diffgemma-eval's default (checkpoint.weights=auto) gives the same value, where
  checkpoint.weights=params gives the parameters' own; a generation reader's model and the export's parameters
  are the average."""
  from diffgemma_jax.evaluate import evaluate
  from diffgemma_jax.hf.export_hf import saved_params
  from diffgemma_jax.model.config import ModelConfig
  from diffgemma_jax.sampling.requests import GenerationOptions, generate_completions
  from diffgemma_jax.train import train
  from diffgemma_jax.train.reading import open_run, restore_model
  overrides = {"train.ema_decay": "0.5", "train.num_steps": "4", "checkpoint.every_steps": "2",
               "eval.every_steps": "0"}
  config = load_tiny(overrides)
  workdir = str(tmp_path / "run")
  summary = train(config, workdir, show_progress=False)
  checkpoints = os.path.join(workdir, "checkpoints")
  read = lambda step, item: _flat_pure(ocp.StandardCheckpointer().restore(  # noqa: E731
      os.path.join(checkpoints, str(step), item)))
  average, params = read(4, "ema"), read(4, "params")
  assert set(average) == set(params) and os.path.isdir(os.path.join(checkpoints, "2", "ema"))
  assert any(not np.array_equal(average[p], params[p]) for p in params)

  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  train(config, resumed, show_progress=False)
  again = os.path.join(resumed, "checkpoints", "4")
  for item, reference in (("ema", average), ("params", params)):
    restored = _flat_pure(ocp.StandardCheckpointer().restore(os.path.join(again, item)))
    for path, value in restored.items():
      np.testing.assert_array_equal(value, reference[path], err_msg=f"{item} {path}")

  assert summary["eval"]["weights"] == "ema"
  assert [r["eval/weights"] for r in read_metrics(workdir) if "eval/bits_per_token" in r] == ["ema"]  # its log
  by_default = evaluate(config, workdir)
  assert by_default["weights"] == "ema" and by_default["step"] == 4
  assert by_default["bits_per_token"] == pytest.approx(summary["eval"]["bits_per_token"], rel=1e-6)
  own = evaluate(load_tiny(dict(overrides, **{"checkpoint.weights": "params"})), workdir)
  assert own["weights"] == "params" and own["bits_per_token"] != by_default["bits_per_token"]

  model, step = restore_model(config, workdir)
  loaded = _flat(nnx.state(model, nnx.Param))
  assert step == 4 and set(loaded) == set(average)
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, average[path], err_msg=path)
  (completion,) = generate_completions(config, workdir, ["def f(x):\n"], GenerationOptions(gen_length=8,
                                                                                           block_length=8))
  assert (completion["step"], completion["weights"]) == (4, "ema")  # diffgemma-generate's report
  run = open_run(workdir, weights=str(config.checkpoint.weights))  # what diffgemma-export reads
  assert run.describe() == "step 4 (its moving average)"
  exported = _flat_pure(saved_params(run, ModelConfig.from_config_dict(config.model)))
  assert set(exported) == set(average)
  for path, value in exported.items():
    np.testing.assert_array_equal(value, average[path], err_msg=path)


def test_a_resume_switches_the_average_on_from_the_saved_parameters(trained_run, load_tiny, tmp_path, capsys):
  """The uninterrupted run kept no average; resumed for one more update with train.ema_decay=0.5, its average
  starts from the step-24 parameters (said in the log) and after update 25 is (p_24 + p_25) / 2
  (min(0.5, 26/35) = 0.5)."""
  from diffgemma_jax.train import train
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "switched")
  shutil.copytree(reference_dir, workdir)
  steps = TRAINED_STEPS + 1
  train(load_tiny(dict(TRAINED_OVERRIDES, **{"train.ema_decay": "0.5", "train.num_steps": str(steps)})), workdir,
        show_progress=False)
  assert f"checkpoint {TRAINED_STEPS} holds no moving average" in capsys.readouterr().err
  checkpoints = os.path.join(workdir, "checkpoints")
  read = lambda step, item: _flat_pure(ocp.StandardCheckpointer().restore(  # noqa: E731
      os.path.join(checkpoints, str(step), item)))
  start, end, average = read(TRAINED_STEPS, "params"), read(steps, "params"), read(steps, "ema")
  assert not os.path.isdir(os.path.join(checkpoints, str(TRAINED_STEPS), "ema"))
  for path, value in average.items():
    np.testing.assert_allclose(value, (start[path] + end[path]) / 2, rtol=1e-6, atol=1e-8, err_msg=path)


def test_readers_refuse_an_average_the_run_did_not_keep(trained_run, load_tiny, tmp_path):
  from diffgemma_jax.train import train
  from diffgemma_jax.train.reading import open_run
  _, workdir, _ = trained_run
  with pytest.raises(ConfigError, match=rf"checkpoint.weights=ema: step {TRAINED_STEPS} in .* holds no moving "
                                        r"average .*train.ema_decay=0\); set checkpoint.weights=params or auto"):
    open_run(workdir, weights="ema")
  assert open_run(workdir, weights="auto").weights == "params"
  with pytest.raises(ConfigError, match=r"checkpoint.weights='ema' evaluates the parameters' moving average, but "
                                        r"train.ema_decay=0 keeps none"):
    train(load_tiny({"checkpoint.weights": "ema"}), str(tmp_path / "new"), show_progress=False)
  assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("key,value,message", [
    ("train.ema_decay", "1.0", r"train.ema_decay: must be in \[0, 1\)"),
    ("train.ema_decay", "-0.1", r"train.ema_decay: must be in \[0, 1\)"),
    ("checkpoint.weights", "best", r"checkpoint.weights: 'best' is no choice; valid are \('auto', 'ema', 'params'\)"),
    ("init.weights", "average", r"init.weights: 'average' is no choice"),
])
def test_bad_average_settings_are_refused_naming_the_key(load_tiny, key, value, message):
  with pytest.raises(ConfigError, match=message):
    load_tiny({key: value})


def test_memory_report_counts_the_average_in_float32(load_tiny):
  """The average costs 4 bytes per trainable parameter on each device, beside the parameters it averages."""
  from diffgemma_jax.model.config import ModelConfig
  from diffgemma_jax.parallel import make_mesh
  from diffgemma_jax.train import abstract_train_state, make_optimizer
  from diffgemma_jax.train.freeze import trainable_filter
  from diffgemma_jax.train.memory import describe_state, state_memory
  config = load_tiny({"train.ema_decay": "0.9999", "train.freeze": "('experts',)"})
  cfg = ModelConfig.from_config_dict(config.model)
  tx, _ = make_optimizer(config.train)
  trainable = trainable_filter(cfg, ("experts",))
  _, abstract, shardings = abstract_train_state(cfg, tx, make_mesh(), trainable=trainable, ema=True)
  memory = state_memory(abstract, shardings, trainable)
  assert memory.moving_average == memory.trainable_params > 0 and memory.frozen_params > 0
  assert memory.total == (memory.trainable_params + memory.frozen_params + memory.optimizer + memory.step
                          + memory.moving_average)
  assert " moving average = " in describe_state(memory, "adamw", 1)
  _, without, no_shardings = abstract_train_state(cfg, tx, make_mesh(), trainable=trainable)
  assert without.ema is None and state_memory(without, no_shardings, trainable).moving_average == 0

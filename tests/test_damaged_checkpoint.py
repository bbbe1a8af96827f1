"""A damaged checkpoint (a file cut short or deleted after the save, as a killed copy or a full disk leaves it): the
readers name the step, the file and the steps that work; training resumes from the newest step that restores and
keeps the damaged folder."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, reader_clis, train_losses
from diffgemma_jax.train import integrity

# The resumed runs compile trained_run's programs: read back from JAX's cache (conftest `compilation_cache`).
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _largest_params_file(step_dir: str) -> str:
  """The biggest tensor data file of a step's parameters, relative to the checkpoints folder."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "params")) for name in names]
  largest = max(files, key=os.path.getsize)
  return os.path.relpath(largest, os.path.dirname(step_dir))


@pytest.fixture(scope="module")
def damaged_run(trained_run, tmp_path_factory):
  """(workdir, damaged file relative to checkpoints/, its saved size): the trained run with its newest step's largest
  parameter file cut to half. Copy it to change it."""
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path_factory.mktemp("damaged") / "run")
  shutil.copytree(reference_dir, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  relative = _largest_params_file(os.path.join(checkpoints, str(TRAINED_STEPS)))
  path = os.path.join(checkpoints, relative)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  return workdir, relative, size


def test_readers_name_the_damaged_step_the_file_and_the_steps_that_work(damaged_run, tiny_config_file, tmp_path,
                                                                        capsys):
  workdir, relative, size = damaged_run
  for main, extra in reader_clis(tmp_path):
    assert main(["--config", tiny_config_file, "--workdir", workdir] + extra) == 2, main.__module__
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert (f"checkpoint {TRAINED_STEPS} in {os.path.join(workdir, 'checkpoints')} is damaged: {relative} has "
            f"{size // 2} bytes, {size} were written; use --step 16 or --step 8") in err, err
  assert not (tmp_path / "hf").exists()
  from diffgemma_jax.train.reading import open_run
  assert open_run(workdir, 16).step == 16


@pytest.mark.parametrize("damage", ["delete metadata", "truncate without a record"])
def test_damage_is_named_without_a_record_too(damaged_run, trained_run, tiny_config_file, tmp_path, capsys, damage):
  """A folder whose record is gone (or that predates records): a missing metadata file is found by listing, a cut
  tensor file when the read fails; either way one line naming the step's file or item."""
  from launch.evaluate import main as eval_main
  workdir = str(tmp_path / "run")
  shutil.copytree(damaged_run[0] if damage.startswith("truncate") else trained_run[1], workdir)
  step_dir = os.path.join(workdir, "checkpoints", str(TRAINED_STEPS))
  os.remove(os.path.join(step_dir, integrity.FILES_RECORD))
  if damage == "delete metadata":
    os.remove(os.path.join(step_dir, "params", "_METADATA"))
    expected = f"{TRAINED_STEPS}/params/_METADATA is missing; use --step 16 or --step 8"
  else:
    expected = f"{TRAINED_STEPS}/params cannot be read (OUT_OF_RANGE"
  assert eval_main(["--config", tiny_config_file, "--workdir", workdir]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_training_resumes_from_the_newest_step_that_restores_and_keeps_the_damaged_one(damaged_run, trained_run,
                                                                                     load_tiny, tmp_path, capsys):
  from diffgemma_jax.train import train
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "run")
  shutil.copytree(damaged_run[0], workdir)
  relative, size = damaged_run[1], damaged_run[2]
  summary = train(load_tiny(TRAINED_OVERRIDES), workdir, show_progress=False)
  err = capsys.readouterr().err
  assert summary["start_step"] == 16 and summary["final_step"] == TRAINED_STEPS
  assert f"skipping checkpoint {TRAINED_STEPS}" in err and f"({relative} has {size // 2} bytes" in err, err
  # the damaged folder is kept (renamed when the run saved that step again), its file as it was found
  kept = os.path.join(workdir, "checkpoints", f"{TRAINED_STEPS}.damaged", relative.split("/", 1)[1])
  assert os.path.getsize(kept) == size // 2
  assert f"renamed the damaged checkpoint {TRAINED_STEPS} to {TRAINED_STEPS}.damaged" in err
  losses, reference = train_losses(workdir), train_losses(reference_dir)
  assert all(len(losses[s]) == 1 for s in losses) and sorted(losses) == list(range(1, TRAINED_STEPS + 1))
  for step in range(17, TRAINED_STEPS + 1):
    assert losses[step][0] == pytest.approx(reference[step][0], rel=1e-6), step
  checkpoints = os.path.join(workdir, "checkpoints")
  assert integrity.damage(os.path.join(checkpoints, str(TRAINED_STEPS)), ("params", "opt_state")) is None


def test_no_restorable_step_fails_naming_each(trained_run, load_tiny, tmp_path):
  from diffgemma_jax.errors import DamagedCheckpointError
  from diffgemma_jax.train import train
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[1], workdir)
  for step in (8, 16, TRAINED_STEPS):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "data_iterator", "metadata"))
  with pytest.raises(DamagedCheckpointError, match=r"no checkpoint in .* restores \(step 24: 24/data_iterator/"
                                                   r"metadata is missing; step 16: .*; step 8: .*\)"):
    train(load_tiny(TRAINED_OVERRIDES), workdir, show_progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "24", "8", "run_config.json"]

"""Rolling a run back after a loss spike (`diffgemma-rollback`, train/rollback.py): the later steps set aside, the
next start resuming from the chosen step with its data stream further on by the batches skipped, once."""

from __future__ import annotations

import os
import shutil

import orbax.checkpoint as ocp
import pytest

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, read_metrics, train_losses

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _data_position(workdir: str, step: int) -> int:
  """The data stream position saved with checkpoint `step`, read by plain Orbax."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("data_iterator",))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(data_iterator=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return int(restored["data_iterator"]["next_index"])


def test_a_rolled_back_run_resumes_from_the_step_and_skips_the_batches_once(trained_run, load_tiny, tmp_path,
                                                                            capsys):
  """The trained run (checkpoints 8, 16, 24) rolled back to step 16 skipping 3 batches: step 24 is set aside (kept),
  the same training command resumes from 16 and saves step 24 again with the data stream at 27 batches (24 without
  the skip), each step logged once. A rerun from the new step 24 skips nothing more; a restart from 16 would skip
  the same 3. diffgemma-inspect lists the set-aside step and the roll-back. Seen to fail with the trainer ignoring
  the roll-back's skip (no skip said; the position 24)."""
  from diffgemma_jax.train import train
  from diffgemma_jax.train.listing import list_run
  from diffgemma_jax.train.rollback import pending_skip
  from launch.rollback import main
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[1], workdir)
  assert _data_position(workdir, TRAINED_STEPS) == TRAINED_STEPS
  before = {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}

  assert main(["--workdir", workdir, "--step", "16", "--skip_batches", "3"]) == 0
  assert capsys.readouterr().out == (f"rolled {workdir} back to step 16: set aside 24.rolled-back; the next "
                                     f"diffgemma-train resumes from step 16 and skips 3 batches (rollback.json)\n")
  checkpoints = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["16", "24.rolled-back", "8", "run_config.json"]
  assert (pending_skip(workdir, 16), pending_skip(workdir, 24)) == (3, 0)

  summary = train(load_tiny(TRAINED_OVERRIDES), workdir, show_progress=False)
  assert "step 16: the data stream skips 3 batches after this checkpoint's position" in capsys.readouterr().err
  assert summary["start_step"] == 16 and summary["final_step"] == TRAINED_STEPS
  assert _data_position(workdir, TRAINED_STEPS) == TRAINED_STEPS + 3
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, TRAINED_STEPS + 1)) and all(len(v) == 1 for v in losses.values())
  assert all(losses[s] == [before[s]] for s in range(1, 17))  # the log up to 16 is the original's
  assert losses[17] != [before[17]]  # step 17 trained on batch 19, not 16

  again = train(load_tiny(TRAINED_OVERRIDES), workdir, show_progress=False)
  assert again["start_step"] == TRAINED_STEPS and "skips" not in capsys.readouterr().err
  assert _data_position(workdir, TRAINED_STEPS) == TRAINED_STEPS + 3
  listing = list_run(workdir)
  assert [o["name"] for o in listing["other"]] == ["24.rolled-back"] and "diffgemma-rollback" in listing["other"][0][
      "what"]
  assert (listing["rollback"]["step"], listing["rollback"]["skip_batches"]) == (16, 3)


def test_rollback_errors_are_one_line(trained_run, tmp_path, capsys):
  """A step that is not a checkpoint, the newest step with nothing to skip, a negative skip and a damaged step are
  refused in one line (exit 2) before anything is renamed."""
  from launch.rollback import main
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[1], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  os.remove(os.path.join(checkpoints, "8", "params", "_METADATA"))
  for args, message in ((["--step", "5"], "--step 5: no such checkpoint in "),
                        (["--step", "24"], "--step 24 is the newest checkpoint in "),
                        (["--step", "16", "--skip_batches", "-1"], "--skip_batches -1: give a number of global "
                                                                   "batches >= 0"),
                        (["--step", "8"], "--step 8: that checkpoint is damaged (8/params/_METADATA is missing)")):
    assert main(["--workdir", workdir, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
  assert sorted(os.listdir(checkpoints)) == ["16", "24", "8", "run_config.json"]
  assert not os.path.exists(os.path.join(workdir, "rollback.json"))

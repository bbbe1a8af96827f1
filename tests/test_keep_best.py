"""The best checkpoints by held-out bound: each checkpoint the trainer evaluated records its bound (Orbax's `metrics`
item), `checkpoint.keep_best` keeps the lowest beyond the `checkpoint.keep` latest (across a resume), and readers'
`--step best` reads the lowest."""

from __future__ import annotations

import math
import os
import shutil

import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, read_metrics
from diffgemma_jax.errors import ConfigError

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _state(step: int):
  from diffgemma_jax.train.state import TrainState
  params = nnx.State({"w": nnx.Param(jnp.full((2,), step, jnp.float32))})
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state={"m": jnp.zeros((2,), jnp.float32)})


def _evaluation(bits: float) -> dict:
  return {"bits_per_token": bits, "stderr_bits_per_token": 0.01, "weights": "params", "ppl_bound": 2.0 ** bits}


def test_keep_best_keeps_the_latest_and_the_lowest_bounds_across_a_resume(load_tiny, tmp_path):
  """checkpoint.keep=1, keep_best=2; saves with bounds 5, 3, 4, 6, 2, 7 keep {1}, {1,2}, {2,3}, {2,3,4}, {2,5},
  {2,5,6} (the latest and the two lowest). A new Checkpointer on the folder (a resume) reads the bounds back: a
  save without an evaluation (SIGTERM) and one with a NaN bound are kept while latest only; a save at 2.5 then
  leaves {5, 9}. Seen to fail with a Checkpointer that keeps the latest only ({9})."""
  from diffgemma_jax.train import Checkpointer
  config = load_tiny({"checkpoint.keep": "1", "checkpoint.keep_best": "2", "checkpoint.async_save": "False"})
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, config)
  expected = [{1}, {1, 2}, {2, 3}, {2, 3, 4}, {2, 5}, {2, 5, 6}]
  for step, (bits, kept) in enumerate(zip((5.0, 3.0, 4.0, 6.0, 2.0, 7.0), expected), start=1):
    ckpt.save(_state(step), {"position": step}, _evaluation(bits))
    assert set(ckpt.all_steps()) == kept, f"after step {step}"
  ckpt.close()

  resumed = Checkpointer(directory, config)
  for step, evaluation, kept in ((7, None, {2, 5, 7}), (8, _evaluation(math.nan), {2, 5, 8}),
                                 (9, _evaluation(2.5), {5, 9})):
    resumed.save(_state(step), {"position": step}, evaluation)
    assert set(resumed.all_steps()) == kept, f"after step {step}"
  best_step, metrics = resumed.best()
  assert best_step == 5 and metrics == {"bits_per_token": 2.0, "stderr_bits_per_token": 0.01, "weights": "params",
                                        "set": ""}
  assert set(resumed.recorded_bounds()) == {5, 9}
  resumed.close()


def test_steps_rank_by_the_bound_of_the_set_eval_rank_by_names(load_tiny, tmp_path):
  """eval.rank_by=val: each checkpoint records its set; keep_best and best() rank only the steps recorded for val
  (a step of the run's own set, lower, is kept while latest only); a reader without a config ranks by the set of
  the latest evaluated step, and a step saved before checkpoints recorded a set counts as the run's own."""
  from diffgemma_jax.train import Checkpointer
  sets = {"eval.heldout_sets": f"val={tmp_path}", "checkpoint.async_save": "False", "checkpoint.keep": "1",
          "checkpoint.keep_best": "1"}
  directory = str(tmp_path / "checkpoints")
  own = Checkpointer(directory, load_tiny(sets))
  own.save(_state(1), {"position": 1}, _evaluation(1.0))  # the run's own set (as before eval.rank_by existed)
  own.close()
  val = Checkpointer(directory, load_tiny(dict(sets, **{"eval.rank_by": "val"})))
  for step, bits in ((2, 4.0), (3, 3.0), (4, 3.5)):
    val.save(_state(step), {"position": step}, dict(_evaluation(bits), set="val"))
  assert set(val.all_steps()) == {3, 4}  # the latest, and val's best (step 1's 1.0 is of another set)
  assert val.best() == (3, {"bits_per_token": 3.0, "stderr_bits_per_token": 0.01, "weights": "params", "set": "val"})
  val.close()
  reader = Checkpointer(directory, create=False)
  assert reader.best()[0] == 3 and set(reader.recorded_bounds()) == {3, 4}
  reader.close()
  with pytest.raises(ConfigError, match=r"^eval\.rank_by='test' is not a set of eval\.heldout_sets \(val\); '' ranks "
                                        r"steps by the run's own held-out split"):
    load_tiny(dict(sets, **{"eval.rank_by": "test"}))
  with pytest.raises(ConfigError, match=r"eval\.heldout_sets is empty"):
    load_tiny({"eval.rank_by": "val"})


def test_a_run_without_recorded_bounds_has_no_best_step(load_tiny, tmp_path):
  """Steps saved without an evaluation record nothing: --step best is a one-line error naming the option and the
  settings that record bounds; bad --step values name the option."""
  from diffgemma_jax.train import Checkpointer
  from diffgemma_jax.train.reading import open_run, parse_step
  workdir = tmp_path / "run"
  ckpt = Checkpointer(str(workdir / "checkpoints"), load_tiny({"checkpoint.async_save": "False"}))
  ckpt.save(_state(3), {"position": 3})
  ckpt.close()
  assert open_run(str(workdir)).step == 3
  with pytest.raises(ConfigError, match=r"^--step best: no checkpoint in .* records a held-out bound, and the run's "
                                        r"metrics\.jsonl logs no evaluation of one .*checkpoint\.keep_best"):
    open_run(str(workdir), parse_step("best", "--step"))
  assert parse_step(" best", "--step") == "best" and parse_step("12", "--step") == 12 and parse_step(None, "x") is None
  for bad in ("-3", "latest", "1.5"):
    with pytest.raises(ConfigError, match=rf"^--step {bad}: give a checkpoint step \(a number >= 0\) or 'best'"):
      parse_step(bad, "--step")


def test_steps_saved_before_their_evaluation_rank_by_the_bounds_metrics_jsonl_logged(load_tiny, tmp_path, capsys):
  """Several processes without checkpoint.keep_best save a step, then evaluate it: no step records its bound, and
  --step best and diffgemma-inspect rank the complete steps by the evaluations metrics.jsonl logged for them (the
  last line of a step; steps without a checkpoint, and a line cut by a kill, ignored), of the set the run ranks by
  (eval.rank_by; a reader without a config: the saved config's). A step that records its bound makes the file's
  bounds irrelevant."""
  import json

  from diffgemma_jax.train import Checkpointer
  from diffgemma_jax.train.listing import format_run, list_run
  from diffgemma_jax.train.reading import open_run
  workdir = tmp_path / "run"
  sets = {"checkpoint.async_save": "False", "eval.heldout_sets": f"val={tmp_path}", "eval.rank_by": "val"}
  ckpt = Checkpointer(str(workdir / "checkpoints"), load_tiny(sets))
  for step in (2, 4, 6):
    ckpt.save(_state(step), {"position": step})  # evaluated after the save: no bound recorded
  ckpt.close()
  logged = [(2, 5.0, 4.0), (3, 1.0, 1.0), (4, 3.0, 6.0), (4, 4.5, 3.5), (6, 3.2, 3.9)]  # step, own, val
  lines = [json.dumps({"step": step, "train/loss": 1.0}) for step in (2, 4, 6)] + [
      json.dumps({"step": step, "eval/bits_per_token": own, "eval/stderr_bits_per_token": 0.02, "eval/weights":
                  "params", "eval/val/bits_per_token": val, "eval/val/stderr_bits_per_token": 0.03})
      for step, own, val in logged]
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 2, "eval/val/bits_per_tok')
  assert open_run(str(workdir), "best").step == 4  # val: 4.0, 3.5 (its last line), 3.9; step 3 is no checkpoint
  reader = Checkpointer(str(workdir / "checkpoints"), load_tiny(dict(sets, **{"eval.rank_by": ""})))
  assert reader.best() == (6, {"bits_per_token": 3.2, "stderr_bits_per_token": 0.02, "weights": "params", "set": "",
                               "logged": True})
  reader.close()
  report = list_run(str(workdir))
  assert report["best_step"] == 4 and [e.get("bits_per_token") for e in report["steps"]] == [4.0, 3.5, 3.9]
  assert any(line.split()[:2] == ["4", "3.5000"] and "best, bound from metrics.jsonl" in line
             for line in format_run(report)), format_run(report)
  recording = Checkpointer(str(workdir / "checkpoints"), load_tiny(sets))
  recording.save(_state(8), {"position": 8}, dict(_evaluation(3.7), set="val"))  # recorded: the only bound
  recording.close()
  assert open_run(str(workdir), "best").step == 8


def test_evaluated_checkpoints_record_their_bound_and_best_reads_the_lowest(trained_run, load_tiny, tmp_path):
  """The uninterrupted run evaluates each checkpoint it saves (eval.every_steps = checkpoint.every_steps = 8): each
  step records the bound the trainer logged for it, and `--step best` opens the lowest (test_evaluate.py evaluates
  it). Continued for two steps with checkpoint.every_steps=1, keep=1, keep_best=1 and no periodic
  evaluation, both saves are evaluated and recorded, and the run keeps the latest and the lowest of all five (at
  the continuation's learning rate, 0.5, step 26 is worse than 25: the lowest is not the latest). Seen to fail with
  evaluations after the saves (no bound recorded) and with keep_best ignored ({26} kept)."""
  from diffgemma_jax.train import Checkpointer, train
  from diffgemma_jax.train.reading import open_init_checkpoint, open_run
  _, workdir, _ = trained_run
  evaluations = [r for r in read_metrics(workdir) if "eval/bits_per_token" in r]
  assert {r["eval/weights"] for r in evaluations} == {"params"}  # the log says which weights it evaluated
  logged = {r["step"]: r["eval/bits_per_token"] for r in evaluations}
  reader = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  recorded = reader.recorded_bounds()
  reader.close()
  assert sorted(recorded) == [8, 16, 24]
  for step, metrics in recorded.items():
    assert metrics["bits_per_token"] == pytest.approx(logged[step], rel=1e-6) and metrics["weights"] == "params"
  lowest = min(recorded, key=lambda s: recorded[s]["bits_per_token"])
  run = open_run(workdir, "best")
  assert run.step == lowest and run.describe() == f"step {lowest} (the lowest recorded held-out bound)"
  init = {"init.checkpoint": workdir}  # a fine-tune's init.step takes the same names
  assert open_init_checkpoint(load_tiny(dict(init, **{"init.step": "best"}))).step == lowest
  assert open_init_checkpoint(load_tiny(dict(init, **{"init.step": "latest"}))).step == TRAINED_STEPS

  continued = str(tmp_path / "continued")
  shutil.copytree(workdir, continued)
  steps = TRAINED_STEPS + 2
  summary = train(load_tiny(dict(TRAINED_OVERRIDES, **{
      "train.num_steps": str(steps), "checkpoint.every_steps": "1", "checkpoint.keep": "1",
      "checkpoint.keep_best": "1", "eval.every_steps": "0", "train.learning_rate": "0.5"})), continued,
      show_progress=False)
  logged = {r["step"]: r["eval/bits_per_token"] for r in read_metrics(continued) if "eval/bits_per_token" in r}
  assert {steps - 1, steps} <= set(logged)
  bounds = {s: m["bits_per_token"] for s, m in recorded.items()}
  bounds.update({s: logged[s] for s in (steps - 1, steps)})
  best = min(bounds, key=bounds.get)
  reader = Checkpointer(os.path.join(continued, "checkpoints"), create=False)
  assert best != steps and set(reader.all_steps()) == {best, steps}  # the lowest is not the latest
  assert reader.recorded_bounds()[steps]["bits_per_token"] == pytest.approx(logged[steps], rel=1e-6)
  reader.close()
  assert summary["best_checkpoint"]["step"] == best
  assert summary["best_checkpoint"]["bits_per_token"] == pytest.approx(bounds[best], rel=1e-6)


def test_inspect_lists_what_a_run_holds(trained_run, tmp_path, capsys):
  """diffgemma-inspect --workdir: the run's three steps with their sizes, recorded bounds (the trainer's), the
  latest and the best; a step whose file was cut short named DAMAGED with the file; a set-aside step and an
  unfinished save listed beside them as what they are; the run's one start. --json gives the same report. Readers
  (the listing, open_run) leave an unfinished save's folder alone: it may be a save a running trainer is writing
  (seen to fail while readers' Orbax managers cleaned temporary folders up, as the trainer's does at a start)."""
  import json
  from diffgemma_jax.train import Checkpointer
  from diffgemma_jax.train.reading import open_run
  from launch.inspect import main
  _, reference, _ = trained_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  reader = Checkpointer(checkpoints, create=False)
  recorded, (best, _) = reader.recorded_bounds(), reader.best()
  reader.close()
  shutil.copytree(os.path.join(checkpoints, "24"), os.path.join(checkpoints, "16.damaged"))
  os.makedirs(os.path.join(checkpoints, "32.orbax-checkpoint-tmp-1765000000"))
  cut = next(os.path.join(root, name) for root, _, names in os.walk(os.path.join(checkpoints, "8", "params"))
             for name in names if os.path.getsize(os.path.join(root, name)) > 100)
  with open(cut, "r+b") as f:
    f.truncate(50)

  assert main(["--workdir", workdir, "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert [s["step"] for s in report["steps"]] == [8, 16, 24]
  assert (report["latest_step"], report["best_step"], report["objective"]) == (24, best, "masked")
  for entry in report["steps"]:
    assert entry["bytes"] > 10_000 and entry["bits_per_token"] == recorded[entry["step"]]["bits_per_token"]
    assert (entry["damage"] is None) == (entry["step"] != 8), entry
  assert os.path.relpath(cut, checkpoints) in report["steps"][0]["damage"]
  assert [o["name"] for o in report["other"]] == ["16.damaged", "32.orbax-checkpoint-tmp-1765000000"]
  assert [s["start_step"] for s in report["starts"]] == [0] and report["tokenizer_pinned"]
  assert (report["logged_through_step"], report["num_steps"]) == (TRAINED_STEPS, TRAINED_STEPS)

  assert main(["--workdir", workdir]) == 0
  lines = capsys.readouterr().out.splitlines()
  rows = {int(line.split()[0]): line for line in lines if line.strip().split(" ")[0].isdigit()}
  assert sorted(rows) == [8, 16, 24] and "latest" in rows[24] and "best" in rows[best]
  assert f"{recorded[16]['bits_per_token']:.4f}" in rows[16] and "DAMAGED: 8/params/" in rows[8]
  assert any("16.damaged: a damaged step set aside" in line for line in lines)
  assert f"progress     trained and logged to step {TRAINED_STEPS} of {TRAINED_STEPS} (" in "\n".join(lines)
  assert any("32.orbax-checkpoint-tmp-1765000000: an unfinished save" in line for line in lines)
  assert main(["--workdir", str(tmp_path)]) == 2
  assert "holds no run" in capsys.readouterr().err
  assert main(["--workdir", workdir, "--compile"]) == 2
  assert capsys.readouterr().err.startswith("error: --workdir lists a run: it takes --json only")
  open_run(workdir, "best")  # a reader
  assert os.path.isdir(os.path.join(checkpoints, "32.orbax-checkpoint-tmp-1765000000"))


def test_a_sigterm_during_the_evaluation_before_a_save_saves_the_step_at_once(trained_run, load_tiny, tmp_path,
                                                                              monkeypatch, capsys):
  """The trainer evaluates a step before saving it; a preemption notice (SIGTERM) arriving as that evaluation
  starts ends it after its first batch (of two), and step 25 is saved at once, without a bound, and the run stops
  there (exit 4 from the CLI), where a finished evaluation would have kept the notice waiting. Seen to fail with the
  evaluation not watching the signal (both batches scored; the run went on to step 26)."""
  import signal
  from diffgemma_jax.train import Checkpointer, loop, train
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[1], workdir)
  real, asked = loop.held_out_bounds, []

  def preempted(*args, stop=None, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice, as the evaluation starts
    return real(*args, stop=lambda batch: asked.append(batch) or stop(batch), **kwargs)

  monkeypatch.setattr(loop, "held_out_bounds", preempted)
  summary = train(load_tiny(dict(TRAINED_OVERRIDES, **{
      "train.num_steps": str(TRAINED_STEPS + 2), "checkpoint.every_steps": "1", "eval.every_steps": "1"})), workdir,
      show_progress=False)
  assert asked == [0] and summary["stopped_by_signal"] and summary["final_step"] == TRAINED_STEPS + 1
  assert f"step {TRAINED_STEPS + 1}: stop requested (SIGTERM): saved checkpoint {TRAINED_STEPS + 1}" in (
      capsys.readouterr().err)
  reader = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  assert reader.latest_step() == TRAINED_STEPS + 1 and TRAINED_STEPS + 1 not in reader.recorded_bounds()
  reader.close()

"""Run logs: metrics.jsonl and TensorBoard hold every step once, whatever ran before in the workdir."""

from __future__ import annotations

import glob
import os
import time

from conftest import read_metrics
from diffgemma_jax.train.logging import MetricsLogger


def _logger(workdir: str, start_step: int) -> MetricsLogger:
  return MetricsLogger(workdir, total_steps=4, start_step=start_step, tokens_per_step=64, train_flops_per_token=1.0,
                       peak_flops=1e9, num_devices=1, show_progress=False)


def _value(event) -> float:
  value = event.summary.value[0]
  return round(value.simple_value or (value.tensor.float_val or [0.0])[0], 3)


def test_a_rerun_from_step_0_drops_what_a_run_killed_before_its_first_checkpoint_logged(tmp_path):
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  workdir = str(tmp_path)
  killed = _logger(workdir, 0)
  for step in (1, 2):
    killed.write(step, {"loss": 10.0 + step})
  killed.close()  # what a SIGKILL leaves: flushed records, no checkpoint
  time.sleep(1.1)  # event files are named by the second they start in
  rerun = _logger(workdir, 0)
  for step in (1, 2, 3, 4):
    rerun.write(step, {"loss": float(step)})
  rerun.close()
  assert [(r["step"], r["train/loss"]) for r in read_metrics(workdir)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
  # TensorBoard: each run's event file opens with a restart marker at the step after its checkpoint (1 here), so
  # readers drop what an earlier run logged from there on (tensorboard's purge of orphaned data)
  events = [e for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")))
            for e in EventFileLoader(path).Load()]
  marks = [("start", e.step) if e.HasField("session_log") and e.session_log.status == e.session_log.START
           else ("loss", e.step, _value(e)) for e in events if e.HasField("session_log")
           or e.HasField("summary")]
  assert marks == [("start", 1), ("loss", 1, 11.0), ("loss", 2, 12.0),
                   ("start", 1), ("loss", 1, 1.0), ("loss", 2, 2.0), ("loss", 3, 3.0), ("loss", 4, 4.0)], marks

"""Run logs: metrics.jsonl and TensorBoard hold every step once, whatever ran before in the workdir."""

from __future__ import annotations

import glob
import json
import os
import types

import pytest

from conftest import read_metrics
from diffgemma_jax.train.logging import MetricsLogger


def _logger(workdir: str, start_step: int) -> MetricsLogger:
  return MetricsLogger(workdir, total_steps=4, start_step=start_step, tokens_per_step=64, train_flops_per_token=1.0,
                       peak_flops=1e9, num_devices=1, show_progress=False)


def _value(event) -> float:
  value = event.summary.value[0]
  return round(value.simple_value or (value.tensor.float_val or [0.0])[0], 3)


@pytest.fixture
def one_second(monkeypatch):
  """tensorboardX's clock stopped: every event file is opened in the same second (it names files by it)."""
  import tensorboardX.event_file_writer
  monkeypatch.setattr(tensorboardX.event_file_writer, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.5))


def test_a_rerun_from_step_0_drops_what_a_run_killed_before_its_first_checkpoint_logged(tmp_path, one_second):
  """Also when the rerun starts in the second the killed run started in: both event files are kept, in order."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  workdir = str(tmp_path)
  killed = _logger(workdir, 0)
  for step in (1, 2):
    killed.write(step, {"loss": 10.0 + step})
  killed.close()  # what a SIGKILL leaves: flushed records, no checkpoint
  rerun = _logger(workdir, 0)
  for step in (1, 2, 3, 4):
    rerun.write(step, {"loss": float(step)})
  rerun.close()
  assert [(r["step"], r["train/loss"]) for r in read_metrics(workdir)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
  # TensorBoard: each run's event file opens with a restart marker at the step after its checkpoint (1 here), so
  # readers drop what an earlier run logged from there on (tensorboard's purge of orphaned data)
  paths = sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")))  # TensorBoard's reading order
  assert len(paths) == 2 and all(".1700000000." in path for path in paths), paths
  events = [e for path in paths for e in EventFileLoader(path).Load()]
  marks = [("start", e.step) if e.HasField("session_log") and e.session_log.status == e.session_log.START
           else ("loss", e.step, _value(e)) for e in events if e.HasField("session_log")
           or e.HasField("summary")]
  assert marks == [("start", 1), ("loss", 1, 11.0), ("loss", 2, 12.0),
                   ("start", 1), ("loss", 1, 1.0), ("loss", 2, 2.0), ("loss", 3, 3.0), ("loss", 4, 4.0)], marks


def test_logs_of_a_workdir_in_a_bucket_keep_earlier_runs_and_upload_events_as_they_go(bucket, tmp_path,
                                                                                     one_second):
  """In a bucket, TensorBoard's events are written locally and uploaded at the first logged step, then at most
  once a minute, and whole when the logs close; a resumed run's metrics.jsonl keeps what earlier runs logged up to
  its checkpoint (an object cannot be appended to: gcsfs opens it empty), and its events go to a file of their own
  although it started in the same second."""
  from etils import epath
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  workdir = f"{bucket}/logs"

  def uploaded() -> bytes:
    (events,) = epath.Path(workdir, "tb").iterdir()
    (tmp_path / events.name).write_bytes(events.read_bytes())
    return (tmp_path / events.name).read_bytes()

  first = _logger(workdir, 0)
  first.write(1, {"loss": 1.0})
  at_first_step = uploaded()  # the run is in TensorBoard at once (its first scalars may follow in the next upload)
  for step in (2, 3):
    first.write(step, {"loss": float(step)})
  assert uploaded() == at_first_step  # not a minute yet
  first.close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
  assert uploaded() != at_first_step and [(e.step, _value(e)) for e in EventFileLoader(str(path)).Load()
                                          if e.HasField("summary")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
  resumed = _logger(workdir, 2)  # from a checkpoint at step 2
  resumed.write(3, {"loss": 30.0})
  resumed.close()
  files = sorted(epath.Path(workdir, "tb").iterdir())
  assert len(files) == 2 and files[0].name == path.name and files[0].read_bytes() == path.read_bytes(), files
  (tmp_path / "resumed").write_bytes(files[1].read_bytes())
  assert [(e.step, _value(e)) for e in EventFileLoader(str(tmp_path / "resumed")).Load()
          if e.HasField("summary")] == [(3, 30.0)]
  assert [(r["step"], r["train/loss"]) for r in map(json.loads, epath.Path(workdir, "metrics.jsonl").read_text()
                                                    .splitlines())] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_bucket_workdirs_metrics_are_uploaded_as_the_run_goes_and_at_each_save(bucket):
  """metrics.jsonl goes up with the events (the first logged step, then at most once a minute) and at every
  checkpoint save (`sync`): a run killed without closing its logs (SIGKILL) leaves what it logged up to its last
  save, which its resume keeps (and early stopping replays). It used to appear only when the logs closed."""
  from etils import epath
  workdir = f"{bucket}/killed"

  def steps() -> list[int]:
    path = epath.Path(workdir, "metrics.jsonl")
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

  killed = _logger(workdir, 0)
  killed.write(1, {"loss": 1.0})
  assert steps() == [1]
  killed.write(2, {"loss": 2.0})
  killed.write(2, {"bits_per_token": 3.0}, prefix="eval")
  assert steps() == [1]  # not a minute yet
  killed.sync()  # checkpoint 2 saved
  assert steps() == [1, 2, 2]
  killed.write(3, {"loss": 3.0})  # then the process is killed: its logs are never closed
  resumed = _logger(workdir, 2)
  resumed.write(3, {"loss": 30.0})
  resumed.close()
  assert [(r["step"], r.get("train/loss", r.get("eval/bits_per_token"))) for r in map(
      json.loads, epath.Path(workdir, "metrics.jsonl").read_text().splitlines())] == [(1, 1.0), (2, 2.0), (2, 3.0),
                                                                                        (3, 30.0)]


# ---- throughput, the plain line, peak FLOPs --------------------------------------------------------------------------
def test_without_a_terminal_each_logged_step_prints_one_plain_line(tmp_path, capsys):
  """stderr is not a terminal under pytest, as in a scheduler's log: no progress bar, one line per logged step."""
  logger = MetricsLogger(str(tmp_path), total_steps=100, start_step=0, tokens_per_step=64,
                         train_flops_per_token=1.0, peak_flops=1e9, num_devices=1, show_progress=True)
  logger.write(10, {"loss": 2.5, "lr": 3e-4, "tokens_per_sec": 1234.4, "mfu": 0.0123, "step_time_s": 1.5})
  logger.write(20, {"loss": 2.25})
  logger.write(20, {"bits_per_token": 3.0}, prefix="eval")  # evaluation has its own message
  logger.close()
  lines = capsys.readouterr().err.splitlines()
  assert lines == ["step 10/100 | loss 2.5000 | lr 0.0003 | tokens/s 1234 | MFU 1.23% | ETA 2m15s",
                   "step 20/100 | loss 2.2500"], lines


@pytest.mark.parametrize("platform, device_kind, flops", [
    ("gpu", "NVIDIA B200", 2.25e15),
    ("gpu", "NVIDIA GB200", 2.5e15),
    ("gpu", "NVIDIA B100", 1.75e15),
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12),
    ("gpu", "NVIDIA H100 PCIe", 756e12),
    ("gpu", "NVIDIA H100 NVL", 835e12),
    ("gpu", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA GH200 480GB", 989e12),
    ("gpu", "NVIDIA H800", 989e12),
    ("gpu", "NVIDIA H20", 148e12),
    ("gpu", "NVIDIA L40S", 362e12),
    ("gpu", "NVIDIA L4", 121e12),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312e12),
    ("gpu", "NVIDIA A100 80GB PCIe", 312e12),
    ("gpu", "NVIDIA A30", 165e12),
    ("gpu", "NVIDIA A10G", 125e12),
    ("gpu", "Tesla V100-SXM2-16GB", 125e12),
    ("tpu", "TPU7x", 2.307e15),
    ("tpu", "TPU v6 lite", 918e12),
    ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5", 459e12),
    ("tpu", "TPU v5p", 459e12),
    ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v3", 123e12),
    ("tpu", "TPU v2", 45e12),
    ("cpu", "cpu", 1e11),
])
def test_peak_flops_table_reads_each_device_kind(platform, device_kind, flops):
  from diffgemma_jax.train.logging import PEAK_FLOPS, peak_flops_for
  entry = peak_flops_for(platform, device_kind)
  assert entry is not None and entry.flops == flops, (device_kind, entry)
  assert entry in PEAK_FLOPS


def test_configured_peak_flops_win_over_the_table():
  from diffgemma_jax.train.logging import peak_flops_per_device
  assert peak_flops_per_device(123e12) == 123e12
  assert peak_flops_per_device(0.0) == 1e11  # this machine's CPU


def test_weights_and_biases_writer_in_offline_mode(tmp_path, monkeypatch):
  """log.wandb_project: the same records go to a Weights & Biases run (offline here: written under workdir/wandb)."""
  wandb = pytest.importorskip("wandb")  # the optional `wandb` extra
  monkeypatch.setenv("WANDB_SILENT", "true")
  logger = MetricsLogger(str(tmp_path), total_steps=4, start_step=0, tokens_per_step=64, train_flops_per_token=1.0,
                         peak_flops=1e9, num_devices=1, show_progress=False,
                         wandb={"project": "diffgemma-test", "mode": "offline", "config": {"train": {"num_steps": 4}}})
  run = logger._wandb  # pylint: disable=protected-access
  for step in (1, 2):
    logger.write(step, {"loss": float(10 - step)})
  logger.write(2, {"bits_per_token": 2.5}, prefix="eval")
  logger.write(3, {"loss": 7.0})  # a step's row is complete once a later step is logged
  assert run.summary["train/loss"] == 8.0 and run.summary["eval/bits_per_token"] == 2.5
  assert run.config["train"] == {"num_steps": 4} and run.offline
  logger.close()
  files = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*", "run-*.wandb"))
  assert len(files) == 1 and os.path.getsize(files[0]) > 0 and wandb.run is None

"""Run metrics: tensorboardX scalars in `workdir/tb/`, the same scalars as JSON lines in `workdir/metrics.jsonl`,
a tqdm progress bar, throughput and MFU, and the closing summary."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import numpy as np
from etils import epath

from diffgemma_jax import storage
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.train.checkpoint import config_to_dict


@dataclasses.dataclass(frozen=True)
class PeakFlops:
  """Dense bfloat16 peak FLOP/s of one device kind: `pattern` is searched (a regular expression) in
  "<platform> <device_kind>", lower case, as JAX reports them; the first entry that matches wins."""
  pattern: str
  flops: float
  name: str


# Vendor data-sheet figures, dense (no sparsity) bfloat16 per device (one GPU; one TPU chip). Order matters: a
# specific kind before the family it would also match (H100 PCIe before H100, v5 lite before v5).
PEAK_FLOPS = (
    PeakFlops(r"gb200", 2.5e15, "NVIDIA GB200 (per GPU)"),
    PeakFlops(r"b200", 2.25e15, "NVIDIA B200"),
    PeakFlops(r"b100", 1.75e15, "NVIDIA B100"),
    PeakFlops(r"h100 pcie", 756e12, "NVIDIA H100 PCIe"),
    PeakFlops(r"h100 nvl", 835e12, "NVIDIA H100 NVL"),
    PeakFlops(r"gh200|h200|h100|h800", 989e12, "NVIDIA H100 / H200 / H800 SXM, GH200"),
    PeakFlops(r"h20\b", 148e12, "NVIDIA H20"),
    PeakFlops(r"l40s", 362e12, "NVIDIA L40S"),
    PeakFlops(r"\bl4\b", 121e12, "NVIDIA L4"),
    PeakFlops(r"a100", 312e12, "NVIDIA A100"),
    PeakFlops(r"a30\b", 165e12, "NVIDIA A30"),
    PeakFlops(r"a10g?\b", 125e12, "NVIDIA A10 / A10G"),
    PeakFlops(r"v100", 125e12, "NVIDIA V100 (float16 tensor cores)"),
    PeakFlops(r"tpu7x|tpu v7", 2.307e15, "TPU v7 Ironwood"),
    PeakFlops(r"v6 lite|v6e", 918e12, "TPU v6e Trillium"),
    PeakFlops(r"v5 lite|v5e|v5litepod", 197e12, "TPU v5e"),
    PeakFlops(r"v5p|tpu v5\b", 459e12, "TPU v5p"),
    PeakFlops(r"tpu v4", 275e12, "TPU v4"),
    PeakFlops(r"tpu v3", 123e12, "TPU v3"),
    PeakFlops(r"tpu v2", 45e12, "TPU v2"),
    PeakFlops(r"^cpu", 1e11, "CPU host (rough estimate for 2-16 cores)"),
)


def peak_flops_for(platform: str, device_kind: str) -> PeakFlops | None:
  kind = f"{platform} {device_kind}".lower()
  return next((entry for entry in PEAK_FLOPS if re.search(entry.pattern, kind)), None)


def peak_flops_per_device(configured: float = 0.0) -> float:
  """`train.peak_flops_per_device` when positive, else the PEAK_FLOPS entry of the first device's kind (a kind not
  in the table falls back to the CPU figure: set the key for it)."""
  if configured and configured > 0:
    return float(configured)
  device = jax.devices()[0]
  entry = peak_flops_for(device.platform, device.device_kind)
  return entry.flops if entry is not None else PEAK_FLOPS[-1].flops


def step_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """Scalars of one step's fetched metrics; the per-expert load becomes its balance (max / mean load)."""
  out: dict[str, float] = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    if key == "expert_load":
      mean = float(np.mean(value))
      out["expert_load_max_over_mean"] = float(np.max(value)) / mean if mean > 0 else 0.0
      out["expert_load_min_over_mean"] = float(np.min(value)) / mean if mean > 0 else 0.0
    elif value.size == 1:
      out[key] = float(value)
  out.setdefault("dropped_tokens", 0.0)  # every dispatch backend is dropless so far
  return out


def _logged_lines(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(line, its record) of each line of the metrics.jsonl `path` (none: no file); an unreadable line, cut by a
  kill, is dropped."""
  if not epath.Path(path).is_file():
    return
  for line in epath.Path(path).read_text().splitlines(keepends=True):
    try:
      yield line, json.loads(line)
    except ValueError:
      continue


def eval_prefix(set_name: str = "") -> str:
  """Where metrics.jsonl keeps an evaluation's figures (`<prefix>/bits_per_token`, ...): `eval` for the run's own
  held-out split, `eval/NAME` for the eval.heldout_sets set NAME."""
  return f"eval/{set_name}" if set_name else "eval"


def logged_records(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir`'s metrics.jsonl, in the order logged (a line cut by a kill dropped)."""
  return [record for _, record in _logged_lines(os.path.join(workdir, "metrics.jsonl"))]


def _records_through(path: str, step: int) -> str:
  """The lines of metrics.jsonl logged up to `step` (none: no file); an unreadable line, cut by a kill, is dropped."""
  return "".join(line if line.endswith("\n") else line + "\n" for line, record in _logged_lines(path)
                 if int(record.get("step", 0)) <= step)


def _duration(seconds: float) -> str:
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def log_line(step: int, total_steps: int, scalars: dict[str, float]) -> str:
  """The plain per-step line of a run without a progress bar (a scheduler's log): step, loss, learning rate,
  tokens/s, MFU and the time left at the measured step time."""
  parts = [f"step {step}/{total_steps}"]
  if "loss" in scalars:
    parts.append(f"loss {scalars['loss']:.4f}")
  if "lr" in scalars:
    parts.append(f"lr {scalars['lr']:.3g}")
  if "tokens_per_sec" in scalars:
    parts.append(f"tokens/s {scalars['tokens_per_sec']:.0f}")
  if "mfu" in scalars:
    parts.append(f"MFU {100 * scalars['mfu']:.2f}%")
  if "step_time_s" in scalars:
    parts.append(f"ETA {_duration((total_steps - step) * scalars['step_time_s'])}")
  return " | ".join(parts)


_last_event_file_ns = 0


def event_file_suffix() -> str:
  """What makes a writer's event file name its own: tensorboardX names the file events.out.tfevents.<unix
  seconds>.<hostname>, so two runs that start in the same second in one folder (a restart right after a crash; a
  bucket workdir, whose events are written locally and uploaded by name) would share one file and one run's events
  would be lost. The start time in nanoseconds (strictly increasing within a process) keeps names in start order,
  the order TensorBoard reads a folder's files in, which a restart's purge of the steps it repeats relies on; the
  process id separates processes starting in the same nanosecond."""
  global _last_event_file_ns
  _last_event_file_ns = max(time.time_ns(), _last_event_file_ns + 1)
  return f".{_last_event_file_ns}.{os.getpid()}"


class _StagedLogs:
  """The logs of a workdir in a bucket (TensorBoard's events under tb/, metrics.jsonl): written to a local folder
  laid out as the workdir, uploaded (whole files) at the first flush, then at most every `every_s` seconds, at every
  checkpoint save (`sync`), and when the logs close. An object cannot be appended to, and an object written through
  an open stream appears only when the stream closes: a run killed without closing its logs (SIGKILL, a lost node)
  kept none of its metrics.jsonl records. tensorboardX's own bucket writers would upload the whole events file at
  every flush (GCS takes about one write a second per object), need boto3 or google-cloud-storage, and upload it
  once more as the process exits (a GCS client retries for two minutes where no server answers)."""

  def __init__(self, url: str, every_s: float = 60.0):
    self.url, self.every_s = url, every_s
    self.local = tempfile.mkdtemp(prefix="diffgemma-logs-")
    self._uploaded = -math.inf

  def flushed(self) -> None:
    if time.monotonic() - self._uploaded >= self.every_s:
      self.sync()

  def sync(self) -> None:
    storage.upload_folder(self.local, self.url)
    self._uploaded = time.monotonic()

  def close(self) -> None:
    self.sync()
    shutil.rmtree(self.local, ignore_errors=True)


class MetricsLogger:
  """Writes scalars to TensorBoard and metrics.jsonl (process 0 only) and drives the progress bar; without one
  (`show_progress=False` or stderr not a terminal) it prints `log_line` at every logged step instead."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tokens_per_step: int,
               train_flops_per_token: float, peak_flops: float, num_devices: int, show_progress: bool = True,
               wandb: dict[str, Any] | None = None):
    """`wandb`: keyword arguments of `wandb.init` (project, entity, mode, config) to log to Weights & Biases too
    (`log.wandb_project`; the optional `wandb` package)."""
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._wandb = None
    self.tokens_per_step = tokens_per_step
    self.train_flops_per_token = train_flops_per_token
    self.peak_flops = peak_flops * num_devices
    self._writer = None
    self._staged = None
    self._jsonl = None
    self._bar = None
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self.history: list[dict[str, float]] = []
    if self.enabled:
      from tensorboardX import SummaryWriter
      # A run repeats the steps after the checkpoint it starts from (step 0 when a killed run saved none): what an
      # interrupted run logged past it is dropped from both logs (TensorBoard's purge_step, and the jsonl
      # rewritten), so every step appears once.
      kept = _records_through(os.path.join(workdir, "metrics.jsonl"), start_step)
      local = workdir
      if storage.is_url(workdir):  # written locally, earlier runs' records first, and uploaded as the run goes
        self._staged = _StagedLogs(workdir)
        local = self._staged.local
      self._writer = SummaryWriter(os.path.join(local, "tb"), purge_step=start_step + 1,
                                   filename_suffix=event_file_suffix())
      path = os.path.join(local, "metrics.jsonl")
      epath.Path(path).write_text(kept)
      self._jsonl = open(path, "a")
      if wandb:
        self._wandb = _start_wandb(workdir, wandb)
      if show_progress and sys.stderr.isatty():
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         file=sys.stderr, desc="train")

  def set_total_steps(self, total_steps: int) -> None:
    """The run's last step changed (wsd_time placed its decay): the step counts and the progress bar follow."""
    self.total_steps = total_steps
    if self._bar is not None:
      self._bar.total = total_steps
      self._bar.refresh()

  def throughput(self, step: int) -> dict[str, float]:
    """tokens/s and MFU since the previous call, measured on the host as steps complete."""
    now = time.perf_counter()
    steps = step - self._last_step
    elapsed = now - self._last_time
    self._last_time, self._last_step = now, step
    if steps <= 0 or elapsed <= 0:
      return {}
    tokens_per_sec = steps * self.tokens_per_step / elapsed
    return {"tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * self.train_flops_per_token / self.peak_flops,
            "step_time_s": elapsed / steps}

  def reset_clock(self, step: int) -> None:
    """Excludes host-side pauses (evaluation, checkpoint saves) from the next throughput measurement."""
    self._last_time, self._last_step = time.perf_counter(), step

  def write(self, step: int, scalars: dict[str, float | str], prefix: str = "train") -> None:
    """One record of `scalars` at `step`: metrics.jsonl takes every value, TensorBoard and wandb the numbers."""
    record = {"step": int(step), **{f"{prefix}/{k}": v for k, v in scalars.items()}}
    self.history.append(record)
    if not self.enabled:
      return
    for key, value in scalars.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._writer.add_scalar(f"{prefix}/{key}", value, step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    self._writer.flush()
    if self._staged is not None:
      self._staged.flushed()
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=int(step))
    if prefix == "train" and self._bar is None:
      print(log_line(step, self.total_steps, scalars), file=sys.stderr, flush=True)

  def progress(self, step: int, scalars: dict[str, float]) -> None:
    if self._bar is None:
      return
    self._bar.n = step
    postfix = {}
    if "loss" in scalars:
      postfix["loss"] = f"{scalars['loss']:.4f}"
    if "tokens_per_sec" in scalars:
      postfix["tok/s"] = f"{scalars['tokens_per_sec']:.0f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.refresh()

  def sync(self) -> None:
    """The logs of a workdir in a bucket uploaded now (a checkpoint was saved: a run killed after it resumes from
    it with what it logged up to it, its evaluations for early stopping's count among them); elsewhere nothing."""
    if self._staged is not None:
      self._writer.flush()
      self._staged.sync()

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._staged is not None:
      self._staged.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _start_wandb(workdir: str, settings: dict[str, Any]):
  """A Weights & Biases run for this workdir: its id is derived from the workdir, so a resume continues the same
  run; its files go under `workdir/wandb` (a workdir in a bucket: under the temporary folder)."""
  import hashlib
  try:
    import wandb  # pylint: disable=import-outside-toplevel (an optional extra)
  except ImportError:
    raise ConfigError("log.wandb_project is set but the wandb package is not installed: pip install "
                      "'diffgemma-jax[wandb]' (or clear log.wandb_project)") from None
  where = storage.resolve(workdir)
  run_id = hashlib.sha1(where.encode()).hexdigest()[:16]
  local = workdir  # wandb writes local files: for a workdir in a bucket, a folder in the temporary folder
  if storage.is_url(workdir):
    local = os.path.join(tempfile.gettempdir(), f"diffgemma-wandb-{run_id}")
    os.makedirs(local, exist_ok=True)
  return wandb.init(dir=local, id=run_id, resume="allow", name=os.path.basename(where),
                    **{k: v for k, v in settings.items() if v not in ("", None)})


def wandb_settings(config) -> dict[str, Any] | None:
  """The `wandb.init` arguments of a run config's `log` section, or None when `log.wandb_project` is empty."""
  if not config.log.wandb_project:
    return None
  return {"project": str(config.log.wandb_project), "entity": str(config.log.wandb_entity),
          "mode": str(config.log.wandb_mode), "config": config_to_dict(config)}


def format_summary(summary: dict[str, Any]) -> str:
  """A few human-readable lines closing a run."""
  lines = [f"trained {summary['start_step']} -> {summary['final_step']} steps in {summary['wall_time_s']:.1f}s "
           f"({summary.get('tokens_per_sec', 0.0):.0f} tokens/s, MFU {100 * summary.get('mfu', 0.0):.2f}%)"]
  if summary.get("final_loss") is not None:
    lines.append(f"final train loss {summary['final_loss']:.4f}")
  ev = summary.get("eval")
  if ev:
    averaged = " (moving average)" if ev.get("weights") == "ema" else ""
    lines.append(f"held-out bound{averaged} {ev['bits_per_token']:.4f} +- {ev['stderr_bits_per_token']:.4f} "
                 f"bits/token, "
                 f"ppl <= {ev['ppl_bound']:.2f} over {ev['num_tokens']} tokens"
                 + (f" (unigram ppl {ev['unigram_ppl']:.2f})" if ev.get("unigram_ppl") else ""))
  for name, other in ((ev or {}).get("heldout_sets") or {}).items():  # eval.heldout_sets
    lines.append(f"held-out set {name}: {other['bits_per_token']:.4f} +- {other['stderr_bits_per_token']:.4f} "
                 f"bits/token, ppl <= {other['ppl_bound']:.2f} over {other['num_tokens']} tokens")
  if summary.get("checkpoint_step") is not None:
    lines.append(f"last checkpoint: step {summary['checkpoint_step']} in {summary['checkpoint_dir']}")
  best = summary.get("best_checkpoint")
  if best:
    lines.append(f"best checkpoint kept: step {best['step']}, held-out {best['bits_per_token']:.4f} bits/token "
                 f"(--step best)")
  return "\n".join(lines)

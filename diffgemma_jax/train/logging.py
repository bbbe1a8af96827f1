"""Run metrics: tensorboardX scalars in `workdir/tb/`, the same scalars as JSON lines in `workdir/metrics.jsonl`,
a tqdm progress bar, throughput and MFU, and the closing summary."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, by device kind; the CPU figure is a rough per-host estimate for 2-16 cores.
PEAK_FLOPS_BY_KIND = (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("v5p", 459e12), ("v5", 197e12),
                      ("v4", 275e12), ("cpu", 1e11))


def peak_flops_per_device(configured: float = 0.0) -> float:
  """`train.peak_flops_per_device` when positive, else a table value for the first device's kind."""
  if configured and configured > 0:
    return float(configured)
  kind = f"{jax.devices()[0].platform} {jax.devices()[0].device_kind}".lower()
  for name, flops in PEAK_FLOPS_BY_KIND:
    if name in kind:
      return flops
  return 1e11


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


def _truncate_after(path: str, step: int) -> None:
  """Drops the records of metrics.jsonl logged after `step` (an unreadable line, cut by a kill, goes too)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if int(record.get("step", 0)) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


class MetricsLogger:
  """Writes scalars to TensorBoard and metrics.jsonl (process 0 only) and drives the progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tokens_per_step: int,
               train_flops_per_token: float, peak_flops: float, num_devices: int, show_progress: bool = True):
    self.enabled = jax.process_index() == 0
    self.tokens_per_step = tokens_per_step
    self.train_flops_per_token = train_flops_per_token
    self.peak_flops = peak_flops * num_devices
    self._writer = None
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
      self._writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)
      path = os.path.join(workdir, "metrics.jsonl")
      if os.path.isfile(path):
        _truncate_after(path, start_step)
      self._jsonl = open(path, "a")
      if show_progress:
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         file=sys.stderr, desc="train")

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

  def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
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


def format_summary(summary: dict[str, Any]) -> str:
  """A few human-readable lines closing a run."""
  lines = [f"trained {summary['start_step']} -> {summary['final_step']} steps in {summary['wall_time_s']:.1f}s "
           f"({summary.get('tokens_per_sec', 0.0):.0f} tokens/s, MFU {100 * summary.get('mfu', 0.0):.2f}%)"]
  if summary.get("final_loss") is not None:
    lines.append(f"final train loss {summary['final_loss']:.4f}")
  ev = summary.get("eval")
  if ev:
    lines.append(f"held-out bound {ev['bits_per_token']:.4f} +- {ev['stderr_bits_per_token']:.4f} bits/token, "
                 f"ppl <= {ev['ppl_bound']:.2f} over {ev['num_tokens']} tokens"
                 + (f" (unigram ppl {ev['unigram_ppl']:.2f})" if ev.get("unigram_ppl") else ""))
  if summary.get("checkpoint_step") is not None:
    lines.append(f"last checkpoint: step {summary['checkpoint_step']} in {summary['checkpoint_dir']}")
  return "\n".join(lines)

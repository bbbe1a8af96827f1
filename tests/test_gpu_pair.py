"""bench/gpu_pair.py --smoke: every phase of the GPU speed experiment runs end to end on a CPU (a tiny model, step
counts instead of the clock), so the first GPU run measures rather than debugs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_reports_every_phase(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  cmd = [sys.executable, os.path.join(REPO, "bench", "gpu_pair.py"), "--smoke", "--out", str(out), "--workdir",
         str(work), "--only", "block_threshold 0.9", "--num_prompts", "1", "--gen_length", "32",
         "--prompt_tokens", "16", "--ceiling_rows", "4"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, PYTHONPATH=REPO))
  report = json.loads((out / "gpu_pair.json").read_text())
  phases = report["phases"]
  assert proc.returncode == 0, {k: v.get("error") for k, v in phases.items()} or proc.stderr[-3000:]
  assert [name for name, phase in phases.items() if phase["status"] == "ok"] == [
      "corpus", "ar", "block", "ceiling", "generate"]
  corpus = phases["corpus"]
  assert corpus["heldout"]["tokens"] > 0 and corpus["train"]["tokens"] > corpus["heldout"]["tokens"]
  assert phases["ar"]["run"]["final_step"] == 6 and phases["block"]["run"]["final_step"] == 4
  # wsd_time with step caps: the decay starts at 80% of each cap and ends at it (on a GPU the clock places it)
  assert (phases["ar"]["run"]["lr_decay"]["decay_start"], phases["ar"]["run"]["lr_decay"]["horizon"]) == (5, 6)
  assert phases["ar"]["sizing"]["cap_steps"] == 6 and phases["block"]["run"]["lr_decay"]["decay_start"] == 4
  assert phases["ar"]["run"]["eval"]["exact"] and not phases["block"]["run"]["eval"]["exact"]
  rows = {row["setting"]: row for row in phases["generate"]["results"]}
  assert set(rows) == {"ar", "block_threshold 0.9"}
  assert rows["ar"]["batch_tokens_per_call"] == 1.0 and rows["ar"]["gen_ppl_x_ar"] == 1.0
  block = rows["block_threshold 0.9"]
  assert 0 < block["batch_tokens_per_call"] and math.isfinite(block["gen_ppl"]) and block["batch1_x_ar_paired"] > 0
  # the served twice-over prompts: the same tokens as the static batches, for the AR decoder and the block sampler
  for row in rows.values():
    assert row["serving_requests"] == 2 and row["serving_same_tokens_as_static"] and row["serving_x_static"] > 0
  assert rows["ar"]["serving_mean_model_calls"] == 32 and block["serving_x_ar"] > 0
  assert [row["threshold"] for row in phases["ceiling"]["thresholds"]] == [0.9, 0.7, 0.5, 0.3]
  samples = (out / "samples.txt").read_text()
  assert "===== ar | prompt 0 =====" in samples and "===== block_threshold 0.9 | prompt 0 =====" in samples

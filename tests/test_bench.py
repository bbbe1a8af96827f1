"""Smoke tests of the CPU benchmark scripts that CI can afford (the GPU ones are in test_pallas_gmm.py)."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_call_cost_reports_each_width_against_the_ar_step(capsys):
  sys.path.insert(0, str(REPO / "bench"))
  import call_cost  # pylint: disable=import-outside-toplevel
  assert call_cost.main(["--config", str(REPO / "configs" / "block_tiny.py"), "--widths", "16", "--calls", "4",
                         "--repeats", "1", "--rounds", "1", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  rows = {row["tokens_per_call"]: row for row in report["rows"]}
  assert sorted(rows) == [1, 16]  # the AR step is always measured
  assert rows[1]["x_ar_step"] == 1.0 and rows[1]["ms_per_call"] > 0
  assert rows[16]["x_ar_step"] == rows[16]["ms_per_call"] / rows[1]["ms_per_call"]
  assert rows[16]["tokens_per_call_for_2x"] == 2 * rows[16]["x_ar_step"]


def test_generate_benchmark_runs_every_block_setting_against_the_ar_decoder(capsys):
  """bench/generate.py end to end at a tiny size (random weights: speed rows only): the AR row is the baseline,
  fixed step budgets make exactly that many calls (plus the prompt's prefill), threshold rows at least one token
  per call."""
  sys.path.insert(0, str(REPO / "bench"))
  import generate as bench_generate  # pylint: disable=import-outside-toplevel
  assert bench_generate.main(["--random_weights", "--gen_length", "32", "--block_length", "16", "--only",
                              "ar,block_fused", "--repeats", "1", "--quality_samples", "2", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  rows = {row["setting"]: row for row in report["results"]}
  assert rows["ar"]["model_calls"] == 32 and rows["ar"]["speedup_vs_ar"] == 1.0
  assert rows["block_fused low_confidence steps=8"]["model_calls"] == 8 + 1
  assert rows["block_fused low_confidence steps=4"]["model_calls"] == 4 + 1
  for name, row in rows.items():
    assert row["tokens_per_s"] > 0 and row["speedup_vs_ar"] > 0, name
    assert row["quality_samples"] == 2 and row["unigram_entropy"] > 0, name
    if "threshold" in name:
      assert 1 < row["model_calls"] <= 32 + 1, name


def test_generate_benchmark_time_budget_leaves_settings_out_and_still_reports(capsys):
  """Under gpu_check.sh's hard timeout the sampler step must end with its JSON: past --time_budget_s no new
  setting starts, and the report names each one left out."""
  sys.path.insert(0, str(REPO / "bench"))
  import generate as bench_generate  # pylint: disable=import-outside-toplevel
  assert bench_generate.main(["--random_weights", "--gen_length", "16", "--block_length", "16", "--only",
                              "ar,threshold 0.9", "--repeats", "1", "--time_budget_s", "1e-9", "--json"]) == 0
  captured = capsys.readouterr()
  report = json.loads(captured.out)
  assert report["results"] == [] and report["left_out_for_time"] == ["ar", "threshold 0.9"]
  assert "left out: --time_budget_s=1e-09 spent" in captured.err

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

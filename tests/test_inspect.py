import json
import subprocess
import sys


def test_inspect_cli_reports_the_reference_totals():
  out = subprocess.run([sys.executable, "-m", "launch.inspect", "--config", "configs/diffusiongemma_26b_a4b.py",
                        "--json"], capture_output=True, text=True, check=True).stdout
  report = json.loads(out)
  assert abs(report["total_params"] / 25.2e9 - 1) < 0.02
  assert abs(report["active_params_per_token"] / 3.8e9 - 1) < 0.05
  assert report["forward_flops_per_token"] > 2 * report["active_params_per_token"]


def test_inspect_cli_bad_override_exits_nonzero_naming_the_key():
  proc = subprocess.run([sys.executable, "-m", "launch.inspect", "--config", "configs/pretrain_tiny.py",
                         "--config.model.top_k=99"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert "model.top_k" in proc.stderr

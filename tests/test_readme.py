"""README.md stays true to the measurements recorded in BENCHMARKS.md."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
  with open(os.path.join(REPO, name), encoding="utf-8") as f:
    return f.read()


def test_the_main_job_range_covers_every_recorded_run():
  """The README's expected held-out bound for the main job is a range, measured on more than one machine or
  floating-point setting; every run in BENCHMARKS.md's main-job table lies inside it."""
  low, high = map(float, re.search(r"Expect (\d\.\d+)-(\d\.\d+) bits/token", _read("README.md")).groups())
  # the current runs: the section up to its first subsection (runs with an earlier tokenizer sample follow there)
  section = _read("BENCHMARKS.md").split("## The README's main job", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
  rows = [line.split("|") for line in section.splitlines() if re.match(r"\| .+ \| \d\.\d+ \| \d+\.\d+ \|$", line)]
  bits = [float(row[-3]) for row in rows]
  settings = {(row[2].strip(), row[3].strip()) for row in rows}
  assert len(bits) >= 2 and len(settings) >= 2, rows
  assert all(low <= b <= high for b in bits), (low, high, bits)

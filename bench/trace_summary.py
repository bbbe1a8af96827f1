"""Where a profiled train step spends its time: a `jax.profiler` trace summed by the model's named scopes.

  python bench/trace_summary.py TRACE_DIR [--hlo STEP.hlo.txt] [--steps N] [--top 12] [--json]

TRACE_DIR is a trace folder (`<workdir>/tb/plugins/profile/<timestamp>/`, what `train.profile_steps` and
`bench/train_gpu.py --profile` write). Device ops (events carrying an `hlo_op`: GPU kernels, or XLA:CPU thunks)
count their self time (nested ops' time goes to the innermost). With the compiled step's HLO text (`--hlo`; its
op metadata holds each op's JAX name stack) ops are grouped by the innermost scope the model and train step name:
embed, attention, dense_mlp, moe, unembed, objective (the loss outside the model), optimizer; `backward` marks
ops of the gradient (a `transpose(...)` in the name stack).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

SCOPES = ("attention", "moe", "dense_mlp", "embed", "unembed", "optimizer", "objective")
_METADATA = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]+)\"", re.MULTILINE)


def load_events(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "*.trace.json.gz")))
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz in {trace_dir} (a jax.profiler trace folder)")
  events = []
  for path in paths:
    with gzip.open(path) as f:
      events.extend(e for e in json.load(f)["traceEvents"] if e.get("ph") == "X")
  return events


def device_op_self_times(events: list[dict]) -> collections.Counter:
  """{hlo op name: total self time in microseconds} over the events that carry an hlo_op."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if "hlo_op" in e.get("args", {}):
      by_thread[(e["pid"], e["tid"])].append(e)
  totals = collections.Counter()
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    stack = []  # (end time, op, self time accumulated in totals)
    for e in thread_events:
      start, duration = e["ts"], e.get("dur", 0.0)
      while stack and stack[-1][0] <= start:
        stack.pop()
      if stack:  # nested: its time is its own, not its parent's
        totals[stack[-1][1]] -= duration
      op = e["args"]["hlo_op"]
      totals[op] += duration
      stack.append((start + duration, op))
  return totals


def op_names(hlo_text: str) -> dict[str, str]:
  """{hlo instruction name: JAX op_name} from a compiled module's text."""
  return {name: op_name for name, op_name in _METADATA.findall(hlo_text)}


def scope_of(op_name: str | None) -> str:
  """'<innermost named scope>[ backward]', or 'other'."""
  if not op_name:
    return "other"
  found = [(m.start(), scope) for scope in SCOPES for m in re.finditer(rf"\b{scope}\b", op_name)]
  scope = max(found)[1] if found else "other"
  return scope + (" backward" if "transpose(" in op_name else "")


def summarize(trace_dir: str, hlo_text: str | None = None, *, steps: int = 1, top: int = 12) -> dict:
  totals = device_op_self_times(load_events(trace_dir))
  names = op_names(hlo_text) if hlo_text else {}
  total = sum(totals.values())
  by_scope = collections.Counter()
  for op, micros in totals.items():
    by_scope[scope_of(names.get(op))] += micros
  per_step = lambda micros: micros / 1e3 / steps  # noqa: E731  (ms per step)
  return {"trace_dir": trace_dir, "steps": steps, "device_ms_per_step": per_step(total),
          "by_scope": [{"scope": s, "ms_per_step": per_step(m), "fraction": m / total}
                       for s, m in by_scope.most_common()],
          "top_ops": [{"op": op, "scope": scope_of(names.get(op)), "ms_per_step": per_step(m), "fraction": m / total,
                       "op_name": names.get(op)} for op, m in totals.most_common(top)]}


def print_summary(summary: dict) -> None:
  print(f"{summary['device_ms_per_step']:.1f} ms of device ops per step ({summary['steps']} step(s) traced)")
  for row in summary["by_scope"]:
    print(f"  {row['scope']:22s} {row['ms_per_step']:9.2f} ms  {100 * row['fraction']:5.1f} %")
  print("largest ops:")
  for row in summary["top_ops"]:
    print(f"  {row['op']:28s} {row['scope']:22s} {row['ms_per_step']:9.2f} ms  {100 * row['fraction']:5.1f} %  "
          f"{(row['op_name'] or '')[-90:]}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir")
  parser.add_argument("--hlo", default="", help="the compiled step's HLO text (compiled.as_text())")
  parser.add_argument("--steps", type=int, default=1, help="steps in the trace (times are per step)")
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  hlo = open(args.hlo).read() if args.hlo else None  # pylint: disable=consider-using-with
  summary = summarize(args.trace_dir, hlo, steps=args.steps, top=args.top)
  if args.json:
    print(json.dumps(summary, indent=1))
  else:
    print_summary(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())

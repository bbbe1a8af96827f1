"""What a compiled program communicates: its collectives read from the optimized HLO text, each counted as often as
it runs (a scanned layer stack's collectives once per layer) and sized by its result, per device.

A program compiled for a mesh carries every collective the SPMD partitioner inserted (GSPMD's, and the explicit
ones of the shard_maps), so the inventory answers "what does each device send and receive per step on this mesh"
before any run, on fake CPU devices too (`bench/collectives.py`). Sizes are the result arrays' bytes on one device:
an all-gather's gathered array, a reduce-scatter's slice, an all-reduce's array, an all-to-all's exchanged buffers.
Collectives whose groups hold one device each (a mesh axis of size 1) move nothing and are left out.

Read a CPU inventory with two differences from a GPU's in mind: XLA:CPU forms no reduce-scatter from an all-reduce
and a slice (XLA:GPU does), so an FSDP gradient counts as an all-reduce of the whole array; and it computes
bfloat16 in float32, collectives included, so a bfloat16 run's collectives count at twice their GPU size.
"""

from __future__ import annotations

import collections
import dataclasses
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_COLLECTIVE = re.compile(r"=\s+(\(.*?\)|\S+)\s+(" + "|".join(map(re.escape, KINDS)) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_TRIP = re.compile(r'known_trip_count"?:\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  shape: str  # the result type as the HLO prints it, layouts dropped
  bytes: int  # of the result, on one device
  runs: int  # times it runs per call of the program
  op_name: str  # the JAX operation it came from (metadata), or ""


def array_bytes(shape_text: str) -> int:
  """Bytes of an HLO result type: one array `f32[8,32]` or a tuple of them; a scalar `f32[]` is one element."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype not in DTYPE_BYTES:
      continue
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    total += count * DTYPE_BYTES[dtype]
  return total


def group_size(line: str) -> int | None:
  """How many devices each group of a collective instruction spans (None: every device, or a form not parsed):
  from its replica groups, as a list `{{0,1},{2,3}}`, an iota `[2,2]<=[4]` or a mesh `mesh['a'=2,'b'=4] {'b'}`;
  a collective-permute whose every pair sends to itself spans 1."""
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
  if pairs is not None:
    moves = [tuple(p.split(",")) for p in re.findall(r"\{(\d+,\d+)", pairs.group(0))]
    return 1 if moves and all(a == b for a, b in moves) else None
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if listed is not None:
    return len(listed.group(1).split(","))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if iota is not None:
    return int(iota.group(2))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if mesh is not None:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    size = 1
    for axis in re.findall(r"'(\w+)'", mesh.group(2)):
      size *= int(sizes.get(axis, 1))
    return size
  return None


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """{name: its instruction lines} of an HLO module's text, and the entry computation's name."""
  bodies: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    header = _HEADER.match(line.strip())
    if header and not line.startswith(" "):
      current = header.group(1)
      bodies[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      if line.strip() == "}":
        current = None
      else:
        bodies[current].append(line)
  return bodies, entry


def _callees(line: str) -> list[tuple[str, int]]:
  """(computation, runs per run of `line`) of every computation an instruction calls: a while loop's body its known
  trip count of times (once if unknown), a conditional's branches once each (an upper bound), anything else once."""
  out = []
  trip = _TRIP.search(line)
  for key, names in re.findall(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|"
                               r"false_computation)=\{?([%\w.\-,\s]+?)\}?(?=[,\s]|$)", line):
    for name in re.findall(r"%?([\w.\-]+)", names):
      runs = int(trip.group(1)) if key == "body" and trip else 1
      out.append((name, runs))
  return out


def inventory(hlo: str) -> list[Collective]:
  """Every collective of a compiled module's text (`compiled.as_text()`), with how often it runs per call: the
  product of the trip counts of the loops around it, summed over the places its computation is called from."""
  bodies, entry = _computations(hlo)
  runs = collections.Counter({entry: 1})
  order, seen = [entry], {entry}
  # callers precede callees in a breadth-first walk from the entry only if the call graph is a tree; propagate to a
  # fixed point instead (HLO call graphs are acyclic, so this ends)
  for _ in range(len(bodies) + 1):
    new = collections.Counter({entry: 1})
    for name in order:
      for line in bodies.get(name, ()):
        for callee, times in _callees(line):
          if callee in bodies:
            new[callee] += runs[name] * times
            if callee not in seen:
              seen.add(callee)
              order.append(callee)
    if new == runs:
      break
    runs = new
  found = []
  for name in order:
    for line in bodies[name]:
      match = _COLLECTIVE.search(line)
      if match is None or runs[name] == 0 or group_size(line) == 1:  # groups of one device move nothing
        continue
      shape = re.sub(r"\{[^}]*\}", "", match.group(1))
      op = _OP_NAME.search(line)
      found.append(Collective(match.group(2), shape, array_bytes(shape), runs[name], op.group(1) if op else ""))
  return found


def summary(found: list[Collective]) -> dict[str, dict[str, int]]:
  """{kind: {"ops": collectives in the program, "runs": runs per call, "bytes": result bytes per call}}."""
  out: dict[str, dict[str, int]] = {}
  for c in found:
    entry = out.setdefault(c.kind, {"ops": 0, "runs": 0, "bytes": 0})
    entry["ops"] += 1
    entry["runs"] += c.runs
    entry["bytes"] += c.bytes * c.runs
  return out

"""Synchronisation checks on Mosaic GPU kernels lowered for CUDA on this CPU (helpers for the Mosaic kernel tests).

Interpret mode runs TMA copies and wgmma synchronously, so a missing wait or fence passes every numeric test there.
The lowered program is where asynchrony is visible: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`
embeds each kernel as an MLIR bytecode module (already lowered to LLVM / NVVM ops) in its custom call. These helpers
decode those modules and walk each kernel's operations in program text order, which for these kernels (straight-line
code, loops whose body is emitted once) is the order one step of each loop issues them:

- a TMA load (GMEM -> SMEM) issued after a wgmma commit with no wgmma wait in between may refill a buffer that an
  in-flight wgmma is still reading (emit_pipeline refills the slot of an earlier step right after the body);
- a wgmma or a TMA store issued after a register -> SMEM store with no `fence.proxy.async` (plgpu.commit_smem) in
  between may read SMEM the async proxy does not see yet;
- a TMA store with no bulk wait_group (plgpu.wait_smem_to_gmem) before the next SMEM store or the kernel's end may
  still be reading its SMEM when it is overwritten or released.

Text order is not execution order across loop back edges, so these checks are necessary conditions, not proofs.
"""

from __future__ import annotations

import re


def _unescape(attribute: str) -> bytes:
  """The bytes of an MLIR string attribute's body (\\XX hex escapes, \\\\ and \\")."""
  out, i = bytearray(), 0
  while i < len(attribute):
    if attribute[i] == "\\":
      if attribute[i + 1] in '\\"':
        out.append(ord(attribute[i + 1]))
        i += 2
      else:
        out.append(int(attribute[i + 1:i + 3], 16))
        i += 3
    else:
      out += attribute[i].encode()
      i += 1
  return bytes(out)


def kernel_modules(lowered_text: str) -> list[str]:
  """The Mosaic GPU kernel modules embedded in a lowered program's text, each printed in MLIR's generic form."""
  from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
  from jax._src.lib import mosaic_gpu_dialect  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir import ir  # pylint: disable=import-outside-toplevel

  modules = []
  for match in re.finditer(r'module = "((?:[^"\\]|\\.)*)"', lowered_text):
    data = _unescape(match.group(1))
    if not data.startswith(b"ML\xefR"):
      continue
    context = mlir.make_ir_context()
    context.allow_unregistered_dialects = True  # the modules are serialised with a versioned dialect prefix
    with context, ir.Location.unknown():
      mosaic_gpu_dialect.register_dialect(context)  # its types (barriers) appear inside memref types
      modules.append(str(ir.Module.parse(data)))
  return modules


def _events(module_text: str):
  """(kind, line) of each synchronisation-relevant operation in text order."""
  for line in module_text.splitlines():
    if "wgmma.mma_async" in line:
      yield "wgmma", line
    elif "nvvm.wgmma.commit.group" in line:
      yield "wgmma_commit", line
    elif "nvvm.wgmma.wait.group" in line:
      yield "wgmma_wait", line
    elif "nvvm.cp.async.bulk.tensor.shared.cluster.global" in line:
      yield "tma_load", line
    elif "nvvm.cp.async.bulk.tensor.global.shared" in line:
      yield "tma_store", line
    elif "nvvm.cp.async.bulk.wait_group" in line:
      yield "tma_store_wait", line
    elif "nvvm.fence.proxy" in line:
      yield "fence", line
    elif "llvm.store" in line and "!llvm.ptr<3>" in line:
      yield "smem_store", line
    elif "func.return" in line:
      yield "end", line


def hazards(module_text: str) -> list[str]:
  """The synchronisation hazards of one kernel module (see the module docstring); empty when none is found."""
  found = []
  wgmma_pending = False  # a wgmma committed and not yet waited for
  unfenced_store = False  # a register -> SMEM store not yet fenced for the async proxy
  store_pending = False  # a TMA store not yet waited for
  counts = {"wgmma": 0, "wgmma_commit": 0, "tma_load": 0, "tma_store": 0}
  for kind, _ in _events(module_text):
    if kind in counts:
      counts[kind] += 1
    if kind == "wgmma_commit":
      wgmma_pending = True
    elif kind == "wgmma_wait":
      wgmma_pending = False
    elif kind == "tma_load" and wgmma_pending:
      found.append(f"TMA load #{counts['tma_load']} issued while wgmma group #{counts['wgmma_commit']} may still "
                   "read SMEM (no wgmma_wait since its commit)")
      wgmma_pending = False  # report each unwaited wgmma once
    elif kind == "smem_store":
      if store_pending:
        found.append(f"SMEM written while TMA store #{counts['tma_store']} may still read it (no wait_smem_to_gmem)")
        store_pending = False
      unfenced_store = True
    elif kind == "fence":
      unfenced_store = False
    elif kind in ("wgmma", "tma_store") and unfenced_store:
      found.append(f"{kind} #{counts[kind]} reads SMEM written from registers with no commit_smem fence since")
      unfenced_store = False
    if kind == "tma_store":
      store_pending = True
    elif kind == "tma_store_wait":
      store_pending = False
    elif kind == "end" and store_pending:
      found.append("the kernel ends with a TMA store not waited for")
  if not counts["wgmma"]:
    found.append("no wgmma found: the module is not the kernel these checks expect")
  return found

"""Per-device memory of the train step at a large vocabulary: the embedding table's uses from its shards (ours)
vs gathering the table.

python bench/embedding_memory.py [--json] [--vocab 131072] [--embed_dim 512] [--meshes 1,8,1,1 1,2,4,1]
                                 [--schemes ours,gathered] [--self_conditioning]

Compiles the real train step (`compile_train_step`: AdamW, masked diffusion, float32 parameters, bfloat16
compute) of a model with a large vocabulary and otherwise small (2 layers, 8 experts) on 8 emulated CPU devices,
once per mesh and lookup, and reads the executable's `memory_analysis()` (bytes per device) and its HLO:

- `ours` (`parallel/embedding.py`): the lookup moves only looked-up rows; the tied logits and self-conditioning's
  mix gather the table one vocabulary tile (V / (tensor x fsdp) rows) at a time;
- `ours_lookup`: ours for the lookup, GSPMD for the logits and the self-conditioning mix (the table gathered);
- `gathered`: the lookup reads the table gathered over `fsdp`, GSPMD the rest (this repository before
  parallel/embedding.py);
- `stored`: a plain `take` on the stored table under GSPMD, GSPMD the rest (before that; XLA's partitioner
  replicates the lookup's gradient whole on `fsdp x expert` meshes: "Involuntary full rematerialization").

Per run: temp / argument / output bytes per device, the temp bytes saved against ours, and the arrays of the whole
table's size [V, D] the compiled step makes in the lookup's scope (`embed`), the tied logits' (`unembed`) and in all
(self-conditioning's mix included). No step is run and nothing is timed: the numbers do not depend on the machine's
load. XLA's CPU backend widens bf16 collectives to float32 and all-reduces gradients where a GPU reduce-scatters, so
absolute bytes are the CPU compiler's; the difference between lookups is what the table costs.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import benchlib  # noqa: E402  bench/, the script's folder, is on sys.path
from diffgemma_jax.config import base_config  # noqa: E402
from diffgemma_jax.parallel import embedding, make_mesh, rules  # noqa: E402
from diffgemma_jax.parallel.placement import MeshPlacement  # noqa: E402
from diffgemma_jax.train import compile_train_step, synthetic_batch  # noqa: E402

def _gathered_lookup(self, table_VD, tokens_BL, dtype):
  return jnp.take(rules.constrain(table_VD, ("vocab", None), self.mesh), tokens_BL, axis=0).astype(dtype)


def _stored_lookup(self, table_VD, tokens_BL, dtype):  # pylint: disable=unused-argument
  return jnp.take(table_VD, tokens_BL, axis=0).astype(dtype)


def _gspmd_logits(self, x_BLD, table_VD):  # pylint: disable=unused-argument
  return embedding.local_logits(x_BLD, table_VD)


def _gspmd_mix(self, weights_BLV, table_VD):  # pylint: disable=unused-argument
  return jnp.einsum("BLV,VD->BLD", weights_BLV, table_VD.astype(jnp.float32))


# scheme -> (MeshPlacement.lookup, MeshPlacement.logits, MeshPlacement.mix)
SCHEMES = {
    "ours": (MeshPlacement.lookup, MeshPlacement.logits, MeshPlacement.mix),
    "ours_lookup": (MeshPlacement.lookup, _gspmd_logits, _gspmd_mix),
    "gathered": (_gathered_lookup, _gspmd_logits, _gspmd_mix),
    "stored": (_stored_lookup, _gspmd_logits, _gspmd_mix),
}


@contextlib.contextmanager
def scheme(name: str):
  """MeshPlacement's table uses replaced by scheme `name`'s while the step is built and compiled."""
  original = MeshPlacement.lookup, MeshPlacement.logits, MeshPlacement.mix
  MeshPlacement.lookup, MeshPlacement.logits, MeshPlacement.mix = SCHEMES[name]
  try:
    yield
  finally:
    MeshPlacement.lookup, MeshPlacement.logits, MeshPlacement.mix = original


def config_for(vocab: int, embed_dim: int, batch_size: int, seq_len: int, self_conditioning: bool = False):
  c = base_config()
  c.model.update(dict(vocab_size=vocab, embed_dim=embed_dim, num_layers=2, layer_pattern=("sliding", "global"),
                      num_heads=4, head_dim=64, num_kv_heads=1, sliding_window=64, global_head_dim=64,
                      global_num_kv_heads=1, mlp_dim=2 * embed_dim, num_experts=8, top_k=2,
                      expert_dim=embed_dim // 2, dispatch="dense", compute_dtype="bfloat16"))
  c.train.update(batch_size=batch_size, seq_len=seq_len)
  if self_conditioning:  # the released recipe's objective: uniform block diffusion, pass 1 feeding pass 2
    c.model.self_conditioning = True
    c.objective.update(name="uniform", block_size=32, self_cond_prob=0.5)
  return c


def whole_tables(hlo: str, vocab: int, embed_dim: int) -> dict[str, int]:
  """How many instructions of the compiled step make a [V, D] array, by scope (the lookup's, the logits')."""
  counts = {"all": len(re.findall(rf'= (?:f32|bf16)\[{vocab},{embed_dim}\]', hlo))}
  for scope in ("embed", "unembed"):
    pattern = re.compile(rf'= (f32|bf16)\[{vocab},{embed_dim}\]\S* .*op_name="[^"]*/{scope}/')
    counts[scope] = sum(1 for line in hlo.splitlines() if pattern.search(line))
  return counts


def measure(config, mesh_shape: tuple[int, ...], name: str) -> dict:
  mesh = make_mesh(mesh_shape)
  batch = synthetic_batch(int(config.train.batch_size), int(config.train.seq_len), int(config.model.vocab_size))
  with scheme(name):
    compiled = compile_train_step(config, mask_id=4, mesh=mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=compiled.batch_sharding) for k, v in batch.items()}
    executable = compiled.step.lower(compiled.abstract_state, batch, jax.random.key(0)).compile()
  memory = executable.memory_analysis()
  return {"mesh": list(mesh_shape), "scheme": name, "temp_bytes": int(memory.temp_size_in_bytes),
          "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
          "whole_table_arrays": whole_tables(executable.as_text(), int(config.model.vocab_size),
                                             int(config.model.embed_dim))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--vocab", type=int, default=131_072)
  parser.add_argument("--embed_dim", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--self_conditioning", action="store_true",
                      help="the uniform objective with self-conditioning (the released recipe) instead of masked")
  parser.add_argument("--meshes", nargs="+", default=["1,8,1,1", "1,2,4,1", "1,4,2,1"],
                      help="data,fsdp,expert,tensor sizes, each multiplying to 8")
  parser.add_argument("--schemes", default="ours,ours_lookup,gathered,stored")
  args = parser.parse_args(argv)
  names = args.schemes.split(",")
  if "ours" not in names or any(n not in SCHEMES for n in names):
    parser.error(f"--schemes: a comma-separated subset of {sorted(SCHEMES)} including 'ours'")
  meshes = [tuple(int(s) for s in m.split(",")) for m in args.meshes]
  for m in meshes:
    if len(m) != 4 or m[0] * m[1] * m[2] * m[3] != 8:
      parser.error(f"--meshes: {m} is not four sizes (data, fsdp, expert, tensor) multiplying to 8")
  config = config_for(args.vocab, args.embed_dim, args.batch_size, args.seq_len, args.self_conditioning)
  table_bytes = args.vocab * args.embed_dim * 4
  load = benchlib.MachineLoad()
  rows = []
  for mesh_shape in meshes:
    results = {name: measure(config, mesh_shape, name) for name in names}
    for name in names:
      results[name]["temp_bytes_over_ours"] = results[name]["temp_bytes"] - results["ours"]["temp_bytes"]
      rows.append(results[name])
  report = {"commit": benchlib.commit(), "vocab": args.vocab, "embed_dim": args.embed_dim,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "objective": str(config.objective.name),
            "self_conditioning": args.self_conditioning, "table_bytes_float32": table_bytes,
            "results": rows, **load.report()}
  if args.json:
    print(json.dumps(report))
    return 0
  mib = 2.0 ** 20
  print(f"train step, V={args.vocab} D={args.embed_dim} (table {table_bytes / mib:.0f} MiB in float32), batch "
        f"{args.batch_size} x {args.seq_len}, objective {config.objective.name}"
        f"{' with self-conditioning' if args.self_conditioning else ''}, 8 CPU devices, commit {report['commit']}; "
        "bytes per device")
  print(f"{'mesh (d,f,e,t)':>15} {'scheme':>11} {'temp MiB':>9} {'args MiB':>9} {'out MiB':>8} "
        f"{'temp - ours':>12} {'tables':>7}  [V, D] arrays: lookup / logits / all")
  for r in rows:
    extra = r["temp_bytes_over_ours"]
    print(f"{','.join(map(str, r['mesh'])):>15} {r['scheme']:>11} {r['temp_bytes'] / mib:9.1f} "
          f"{r['argument_bytes'] / mib:9.1f} {r['output_bytes'] / mib:8.1f} {extra / mib:+11.1f}M "
          f"{extra / table_bytes:+7.2f}  {r['whole_table_arrays']['embed']} / {r['whole_table_arrays']['unembed']} / "
          f"{r['whole_table_arrays']['all']}")
  print(load.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())

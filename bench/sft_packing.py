"""Rows an SFT epoch costs with packed rows (`data.sft_packing`) against one example per row.

  python bench/sft_packing.py [--data data/python_docstrings-v512] [--seq_lens 128,512,2048] [--block_size 16]
                              [--json]

Every training row costs the same compute at a given `train.seq_len`, so the rows an epoch of the train split
needs are its cost: the ratio of one-per-row rows to packed rows is the epoch's speed-up at the same step time, for
the same examples (each still normalised by its own response). Both layouts are built by `data.sft.make_rows` from
the dataset's own records and tokenizer, in one run; packed twice: responses ended by one EOS (objectives without
canvases) and EOS-padded to whole canvases of --block_size (block, uniform). Also reported: the share of row
tokens that are an example's own (prompt, response and its first EOS), the rest being EOS padding or empty
padding. No timing: the counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import benchlib  # bench/, the script's folder, is on sys.path
from diffgemma_jax.data.manifest import read_records
from diffgemma_jax.data.sft import make_rows
from diffgemma_jax.data.tokenizer import Tokenizer


def own_tokens(rows: dict[str, np.ndarray], eos_id: int) -> int:
  """Tokens that are an example's own: every real token but the EOS padding after a response's first EOS."""
  count = 0
  for tokens, segments, loss in zip(rows["tokens"], rows["segment_ids"], rows["loss_mask"]):
    for s in range(1, int(segments.max()) + 1):
      at = np.flatnonzero(segments == s)
      response = tokens[at][loss[at] > 0]
      eos = np.flatnonzero(response == eos_id)
      padding = len(response) - (int(eos[0]) + 1) if len(eos) else 0
      count += len(at) - padding
  return count


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", default="data/python_docstrings-v512", help="a built SFT dataset folder")
  parser.add_argument("--seq_lens", default="128,512,2048")
  parser.add_argument("--block_size", type=int, default=16)
  parser.add_argument("--template", default="plain", help="the chat template (configs/sft_tiny.py: plain)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  load = benchlib.MachineLoad()
  records = read_records(args.data, "train")
  tokenizer = Tokenizer(os.path.join(args.data, "tokenizer.model"))
  results = []
  for seq_len in (int(x) for x in args.seq_lens.split(",")):
    layouts = {"one_per_row": 0, "packed_eos": 1, f"packed_canvas{args.block_size}": args.block_size}
    row = {"seq_len": seq_len}
    for name, unit in layouts.items():
      rows, stats = make_rows(records, tokenizer, seq_len, args.template, pack_unit=unit)
      row[name] = {"rows": len(rows["tokens"]), "own_token_share": round(own_tokens(rows, tokenizer.eos_id) / float(
          rows["tokens"].size), 3), "responses_cut": stats.responses_cut}
    for name in list(layouts)[1:]:
      row[f"{name}_speedup"] = round(row["one_per_row"]["rows"] / row[name]["rows"], 2)
    results.append(row)
  report = {"data": args.data, "examples": len(records), "commit": benchlib.commit(), "results": results,
            **load.report()}
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    for row in results:
      print(f"seq_len {row['seq_len']}: one per row {row['one_per_row']['rows']} rows; packed "
            + ", ".join(f"{name} {row[name]['rows']} rows ({row[name + '_speedup']}x)" for name in row
                        if name.startswith("packed") and not name.endswith("speedup")))
    print(load.line())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Held-out evaluation tasks from the CPython standard library, as local JSONL for the lm-evaluation-harness task
files in diffgemma_jax/harness_tasks (no download).

The functions come from the modules `python_stdlib` holds out (the same split, module by module), so a model
pretrained on that recipe never saw them. Two tasks:
  stdlib_heldout_mc          which of four bodies belongs to this signature and docstring (chance 25%). The three
                             distractors are the bodies of the other held-out functions closest in length, so
                             length alone says little; the choices are shuffled with a fixed seed. A docstring that
                             would not leave room for the body in a short context is cut to its first line.
  stdlib_heldout_completion  the next line of a function: signature, docstring and the body's first line(s) as the
                             prompt, the body's next non-blank line (stripped) as the target; exact match.
Each item also records the two trivial baselines the report compares with: MC "pick the shortest body", completion
"repeat the line before" (both written to baselines.json).

python -m data_recipes.stdlib_tasks [--output diffgemma_jax/harness_tasks]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

from data_recipes.common import split_by_hash
from data_recipes.python_docstrings import function_pairs
from data_recipes.python_stdlib import HELDOUT_FRACTION, documents

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffgemma_jax",
                              "harness_tasks")
MAX_BODY_CHARS = 160  # a body the tiny models' 128-token context holds with its prompt (about 3 characters a token)
MAX_ITEM_CHARS = 330  # prompt + body
MAX_TARGET_CHARS = 60
SEED = 0


def held_out_functions(root: str | None = None) -> list[tuple[str, dict]]:
  """(source, {"prompt", "response"}) of every documented function of the held-out modules, in a fixed order."""
  modules = split_by_hash(documents(root), HELDOUT_FRACTION)["heldout"]
  return [pair for rel, text in modules for pair in function_pairs(rel, text)]


def _short_prompt(prompt: str, budget: int) -> str | None:
  """The prompt, or with its docstring cut to the first line (closed again) when the whole does not fit."""
  if len(prompt) <= budget:
    return prompt
  lines = prompt.splitlines(keepends=True)
  head = next((i for i, line in enumerate(lines) if '"""' in line or "'''" in line), None)
  if head is None:
    return None
  quote = '"""' if '"""' in lines[head] else "'''"
  first = lines[head].rstrip("\n")
  short = "".join(lines[:head]) + (first if first.rstrip().endswith(quote) and first.count(quote) == 2
                                   else first + quote) + "\n"
  return short if len(short) <= budget else None


def multiple_choice_items(functions: list[tuple[str, dict]]) -> list[dict]:
  bodies = [(source, pair["response"]) for source, pair in functions if len(pair["response"]) <= MAX_BODY_CHARS]
  rng = random.Random(SEED)
  items = []
  for source, pair in functions:
    body = pair["response"]
    if len(body) > MAX_BODY_CHARS:
      continue
    others = sorted({b for s, b in bodies if s != source and b.strip() != body.strip()},
                    key=lambda b: (abs(len(b) - len(body)), b))[:3]
    prompt = _short_prompt(pair["prompt"], MAX_ITEM_CHARS - max(len(b) for b in others + [body]))
    if prompt is None or len(others) < 3:
      continue
    choices = others + [body]
    rng.shuffle(choices)
    items.append({"source": source, "prompt": prompt, "choices": choices, "answer": choices.index(body),
                  "shortest": min(range(4), key=lambda i: len(choices[i]))})
  return items


def completion_items(functions: list[tuple[str, dict]]) -> list[dict]:
  items = []
  for source, pair in functions:
    lines = pair["response"].splitlines(keepends=True)
    filled = [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")]
    if len(filled) < 2:
      continue
    index = filled[1]  # the second statement line: the first is context
    target = lines[index].strip()
    if len(target) > MAX_TARGET_CHARS:
      continue
    items.append({"source": source, "prompt": pair["prompt"] + "".join(lines[:index]), "target": target,
                  "previous_line": lines[filled[0]].strip()})
  return items


def _write_jsonl(path: str, items: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for item in items:
      f.write(json.dumps(item, ensure_ascii=False) + "\n")


def build(output: str = DEFAULT_OUTPUT) -> dict:
  functions = held_out_functions()
  mc, completion = multiple_choice_items(functions), completion_items(functions)
  os.makedirs(output, exist_ok=True)
  _write_jsonl(os.path.join(output, "stdlib_heldout_mc.jsonl"), mc)
  _write_jsonl(os.path.join(output, "stdlib_heldout_completion.jsonl"), completion)
  baselines = {
      "python": sys.version.split()[0], "held_out_functions": len(functions),
      "stdlib_heldout_mc": {"items": len(mc), "chance": 0.25,
                            "pick_the_shortest": sum(i["shortest"] == i["answer"] for i in mc) / max(len(mc), 1)},
      "stdlib_heldout_completion": {"items": len(completion), "repeat_the_line_before": sum(
          i["previous_line"] == i["target"] for i in completion) / max(len(completion), 1)}}
  with open(os.path.join(output, "baselines.json"), "w") as f:
    json.dump(baselines, f, indent=2)
    f.write("\n")
  return baselines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--output", default=DEFAULT_OUTPUT)
  args = p.parse_args(argv)
  print(json.dumps(build(args.output), indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""SFT pairs from the CPython standard library: prompt = a function's signature and docstring, response = its body.

The split is the pretraining one (`python_stdlib`: by module, the same hash, the same held-out fraction), so the
held-out pairs come from modules a model pretrained on `python_stdlib` never saw. Every function or method with a
docstring and at least one statement after it gives one pair, dedented to its `def` line; decorators are left
out; pairs with a side longer than MAX_CHARS characters are skipped (they would be mostly cut at any short
sequence length).
"""

from __future__ import annotations

import ast
import sys
import sysconfig

from data_recipes.common import is_current, split_by_hash, write_dataset
from data_recipes.python_stdlib import EXCLUDED_DIRS, HELDOUT_FRACTION, documents
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.errors import DataError

MAX_CHARS = 1200


def _dedent(lines: list[str], indent: str) -> str:
  return "".join(line[len(indent):] if line.startswith(indent) else line.lstrip(" \t") for line in lines)


def function_pairs(source: str, text: str) -> list[tuple[str, dict]]:
  """(name, {"prompt", "response"}) of every documented function of one module."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return []
  lines = text.splitlines(keepends=True)
  pairs = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
      continue
    if ast.get_docstring(node, clean=False) is None:
      continue
    doc_end = node.body[0].end_lineno
    if node.body[1].lineno <= doc_end:  # a statement on the docstring's own line
      continue
    def_line = lines[node.lineno - 1]
    indent = def_line[:len(def_line) - len(def_line.lstrip(" \t"))]
    prompt = _dedent(lines[node.lineno - 1:doc_end], indent)
    response = _dedent(lines[doc_end:node.end_lineno], indent)
    if not response.strip() or len(prompt) > MAX_CHARS or len(response) > MAX_CHARS:
      continue
    if not response.endswith("\n"):
      response += "\n"
    pairs.append((f"{source}:{node.lineno}:{node.name}", {"prompt": prompt, "response": response}))
  return sorted(pairs, key=lambda p: int(p[0].split(":")[1]))


def build(output_dir: str, vocab_size: int | None = None, source: str | None = None, tokenizer: str | None = None,
          **_) -> dict:
  del vocab_size, source  # the vocabulary is the given tokenizer's
  if not tokenizer:
    raise DataError("the python_docstrings recipe trains no tokenizer: set data.tokenizer (a sentencepiece "
                    ".model) or init.checkpoint (its run's tokenizer is used)")
  root = sysconfig.get_paths()["stdlib"]
  notes = {"stdlib_root": root, "python": sys.version.split()[0], "excluded_dirs": sorted(EXCLUDED_DIRS),
           "max_chars": MAX_CHARS}
  if is_current(output_dir, "python_docstrings", None, None, tokenizer):
    manifest = read_manifest(output_dir)
    if all(manifest.get(key) == value for key, value in notes.items()):
      return manifest
  modules = split_by_hash(documents(root), HELDOUT_FRACTION)  # the python_stdlib split, module by module
  splits = {split: [pair for rel, text in modules[split] for pair in function_pairs(rel, text)]
            for split in modules}
  return write_dataset(output_dir, "python_docstrings", splits, notes=notes, tokenizer=tokenizer)


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "python_docstrings", argv)


if __name__ == "__main__":
  sys.exit(main())

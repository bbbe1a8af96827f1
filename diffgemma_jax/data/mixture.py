"""Mixtures of built pretraining datasets (`data.mixture`): which datasets, their weights, and the weighted bound;
the trainer's other held-out sets (`eval.heldout_sets`, `parse_heldout_sets`).

`data.mixture` is "DIR:WEIGHT,DIR:WEIGHT,..." (weights positive, normalised to sum 1). Every dataset must be a
built token store with the same tokenizer. Training draws rows by weight (data/pipeline.py `row_ids`: each
dataset's rows shuffled with the seed, the datasets interleaved in proportion). Evaluation scores each dataset's
held-out split on its own; the total is the weighted mean of the per-dataset bounds in nats per token, the bound
of the mixture the model was trained on, with the standard error of a weighted sum of independent estimates.
"""

from __future__ import annotations

import math
import os
import re

from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.data.tokenizer import same_tokenizer
from diffgemma_jax.errors import ConfigError, DataError

LN2 = math.log(2.0)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """[(directory, weight)], weights normalised; errors name data.mixture."""
  entries = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    directory, sep, weight = part.rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = float("nan")
    if not sep or not directory or not value > 0 or not math.isfinite(value):
      raise DataError(f"data.mixture: {part!r} is not DIR:WEIGHT with a positive weight "
                      f"(e.g. data.mixture='data/code:0.7,data/prose:0.3')")
    entries.append((directory, value))
  if len(entries) < 2:
    raise DataError(f"data.mixture={spec!r} names {len(entries)} dataset(s); a mixture needs at least two "
                    f"(for one dataset use data.dir)")
  directories = [d for d, _ in entries]
  if len(set(directories)) != len(directories):
    raise DataError(f"data.mixture={spec!r} names a dataset twice; give each once with its total weight")
  total = sum(w for _, w in entries)
  return [(d, w / total) for d, w in entries]


def check_mixture(entries: list[tuple[str, float]]) -> None:
  """Every dataset is a built pretraining dataset with the first one's tokenizer."""
  first = entries[0][0]
  for directory, _ in entries:
    manifest = read_manifest(directory)
    if manifest is None:
      raise DataError(f"data.mixture: {directory!r} holds no built dataset (no manifest.json); build it first, "
                      f"e.g. python -m data_recipes.text_files --output {directory} --source ...")
    if manifest.get("kind", "text") != "text" or "store" not in manifest:
      raise DataError(f"data.mixture: {directory!r} is not a pretraining token store (SFT datasets, or ones built "
                      f"before the token store, cannot be mixed); rebuild it with a pretraining recipe")
    if not same_tokenizer(os.path.join(first, "tokenizer.model"), os.path.join(directory, "tokenizer.model")):
      raise DataError(f"data.mixture: {directory!r} has another tokenizer than {first!r}; build every dataset of a "
                      f"mixture with one tokenizer (data.tokenizer / --tokenizer {first}/tokenizer.model)")


def mixture_bound(results: list[tuple[str, float, dict]]) -> dict:
  """The weighted total of per-dataset bounds [(name, weight, held_out_bound result)], with them under
  `sources`."""
  nats = sum(w * r["nats_per_token"] for _, w, r in results)
  stderr_bits = math.sqrt(sum((w * r["stderr_bits_per_token"]) ** 2 for _, w, r in results))
  total = {"nats_per_token": nats, "bits_per_token": nats / LN2, "stderr_bits_per_token": stderr_bits,
           "ppl_bound": math.exp(nats)}
  for key in ("num_tokens", "num_sequences", "num_examples"):
    total[key] = sum(int(r[key]) for _, _, r in results)
  total["num_t_samples"] = results[0][2]["num_t_samples"]
  total["sources"] = {name: dict(r, weight=w) for name, w, r in results}
  return total


def weighted_unigram_ppl(values: list[tuple[float, float]]) -> float:
  """exp of the weighted mean log perplexity [(weight, ppl)]: the unigram baseline on the weighted scale."""
  return math.exp(sum(w * math.log(p) for w, p in values))


def parse_heldout_sets(text: str) -> list[tuple[str, str]]:
  """`eval.heldout_sets` ("NAME=FILES; NAME2=FILES2") as [(name, files)]; a ConfigError naming the key when an
  entry has no name or files, a name is not a word (letters, digits, `_`, `-`, `.`) or is given twice."""
  sets = []
  for entry in (e.strip() for e in text.split(";")):
    if not entry:
      continue
    name, eq, files = (part.strip() for part in entry.partition("="))
    if not eq or not files or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
      raise ConfigError(f"eval.heldout_sets: {entry!r} is not NAME=FILES (a name of letters, digits, '_', '-' or "
                        f"'.', then data.source's forms); separate sets with ';'")
    if name in {n for n, _ in sets}:
      raise ConfigError(f"eval.heldout_sets: the name {name!r} is given twice")
    sets.append((name, files))
  return sets

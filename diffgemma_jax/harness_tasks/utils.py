"""Loaders of the held-out task files (local JSONL beside this file, built by `python -m data_recipes.stdlib_tasks`);
the task YAMLs name them as `custom_dataset`, so the harness downloads nothing."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> dict:
  with open(os.path.join(HERE, name), encoding="utf-8") as f:
    return {"test": datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])}


def load_mc(**_):
  return _load("stdlib_heldout_mc.jsonl")


def load_completion(**_):
  return _load("stdlib_heldout_completion.jsonl")

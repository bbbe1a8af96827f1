"""The built dataset directory as the library reads it (`data/manifest.py`): what a recipe writes (`write_dataset`)
reads back in order, and a directory without a manifest is no dataset."""

import json

import pytest

from data_recipes.common import write_dataset
from diffgemma_jax.data.manifest import read_manifest, read_records
from diffgemma_jax.errors import DataError


def test_records_read_back_in_order_as_written(tiny_tokenizer, tmp_path):
  splits = {"train": [(f"t{i}", {"prompt": f"p{i}", "response": f"r{i}"}) for i in range(3)],
            "heldout": [("h0", {"messages": [{"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}]})]}
  written = write_dataset(str(tmp_path / "ds"), "jsonl", splits, tokenizer=tiny_tokenizer.path)
  assert read_manifest(str(tmp_path / "ds")) == json.loads(json.dumps(written))
  assert read_records(str(tmp_path / "ds"), "train") == [dict(record, source=source)
                                                           for source, record in splits["train"]]
  assert read_records(str(tmp_path / "ds"), "heldout")[0]["messages"][1] == {"role": "assistant", "content": "a"}


def test_a_directory_without_a_manifest_is_no_dataset(tmp_path):
  assert read_manifest(str(tmp_path)) is None
  with pytest.raises(DataError, match="holds no manifest.json; build it with a data recipe"):
    read_records(str(tmp_path), "train")

"""Data: sentencepiece tokenizer, the token store and grain pipelines.

Batches are dicts of int32 numpy arrays [B, L]: `tokens`; `segment_ids` (1, 2, ... per packed document piece in
a row, 0 = padding); `positions` (position within the segment, 0 at padding). SFT rows add `loss_mask`.

The pipeline names load on first use: the build's worker processes import this package and need neither grain
nor JAX, which take seconds to import.
"""

import importlib

from diffgemma_jax.data.tokenizer import Tokenizer, same_tokenizer, train_tokenizer

_PIPELINE = ("BATCH_KEYS", "EvalBatches", "make_eval_batches", "make_train_iterator", "unigram_ppl")

__all__ = ["Tokenizer", "same_tokenizer", "train_tokenizer", *_PIPELINE]


def __getattr__(name):
  if name in _PIPELINE:
    return getattr(importlib.import_module("diffgemma_jax.data.pipeline"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

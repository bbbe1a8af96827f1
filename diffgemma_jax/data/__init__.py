"""Data: sentencepiece tokenizer and grain pipelines.

Batches are dicts of int32 numpy arrays [B, L]: `tokens`; `segment_ids` (1, 2, ... per packed document piece in
a row, 0 = padding); `positions` (position within the segment, 0 at padding). SFT rows add `loss_mask`.
"""

from diffgemma_jax.data.errors import DataError
from diffgemma_jax.data.pipeline import (BATCH_KEYS, make_eval_batches, make_train_iterator, pack_rows, token_stream,
                                         unigram_ppl)
from diffgemma_jax.data.tokenizer import Tokenizer, same_tokenizer, train_tokenizer

__all__ = ["BATCH_KEYS", "DataError", "Tokenizer", "make_eval_batches", "make_train_iterator", "pack_rows",
           "same_tokenizer", "token_stream", "train_tokenizer", "unigram_ppl"]

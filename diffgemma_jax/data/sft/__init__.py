"""Supervised fine-tuning data, by concern: JSONL records (`records.py`), chat templates that render an example as
(prompt text, response text) (`templates.py`), their token ids with the template's markers (`encoding.py`), and
prompt-masked rows (`rows.py`)."""

from diffgemma_jax.data.sft.encoding import encode_text, marker_ids, split_tokens
from diffgemma_jax.data.sft.records import ROLES, read_jsonl, validate_record
from diffgemma_jax.data.sft.rows import RowStats, iter_rows, make_row, make_rows
from diffgemma_jax.data.sft.templates import (CHAT_TEMPLATES, TEMPLATE_MARKERS, ChatText, chat_prompt, join_texts,
                                              render)

__all__ = ["CHAT_TEMPLATES", "ChatText", "ROLES", "RowStats", "TEMPLATE_MARKERS", "chat_prompt", "encode_text",
           "iter_rows", "join_texts", "make_row", "make_rows", "marker_ids", "read_jsonl", "render", "split_tokens",
           "validate_record"]

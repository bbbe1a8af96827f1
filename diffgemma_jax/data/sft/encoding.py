"""Token ids of rendered SFT texts: the template's markers as their ids, markers typed in content as text.

A marker the tokenizer holds as a user-defined symbol (the recipes' tokenizers) is produced by plain encoding; one
it holds as a control piece (the released tokenizer) never is, so the text is cut at the markers and their ids are
spliced in (`marker_ids`, `encode_text`). In a `templates.ChatText`, a marker inside message content is encoded as
the bytes of its text (`Tokenizer.literal_ids`), never as the marker's id: only the template puts turn markers into
a row or a chat prompt.
"""

from __future__ import annotations

import re

from diffgemma_jax.data.sft.templates import CHAT_TEMPLATES, TEMPLATE_MARKERS, join_texts
from diffgemma_jax.errors import DataError


def marker_ids(tokenizer, template: str) -> dict[str, int] | None:
  """{marker: id} when plain encoding does not produce some marker of `template` as its piece (a control symbol:
  the text must be cut at the markers and their ids spliced in); None when plain encoding works (user-defined
  symbols, as the recipes' tokenizers have: the whole text is encoded at once, so no piece boundary and no dummy-
  prefix space appear after each marker). A marker the tokenizer lacks is an error naming the template."""
  ids, splice = {}, False
  for marker in TEMPLATE_MARKERS[template]:
    piece = tokenizer.sp.piece_to_id(marker)
    if piece == tokenizer.unk_id:
      raise DataError(f"data.chat_template={template!r} needs the piece {marker!r}, which the tokenizer "
                      f"{tokenizer.path} lacks; use a template of this tokenizer (valid: {CHAT_TEMPLATES})")
    ids[marker] = piece
    splice |= piece not in tokenizer.sp.encode(f"a{marker}a")
  return ids if splice else None


def encode_text(tokenizer, text: str, markers: dict[str, int] | None = None) -> list[int]:
  """Token ids of `text`; with `markers` (see `marker_ids`) the markers become their ids and the text between
  them is encoded piece by piece. In a `ChatText`, a marker inside message content is text: it is encoded as its
  bytes (`Tokenizer.literal_ids`), and with `markers` the text is not cut there (see the module docstring)."""
  spans = getattr(text, "content_spans", ())
  symbols = {}  # id -> marker, of the template's markers that are pieces of this tokenizer
  for marker in getattr(text, "markers", ()) if spans else ():
    piece = tokenizer.sp.piece_to_id(marker)
    if piece != tokenizer.unk_id:
      symbols[piece] = marker
  in_content = lambda at: any(s <= at < e for s, e in spans)
  if not markers:
    return _literal_markers(tokenizer, tokenizer.encode(text), text, symbols, in_content)
  # A stretch between template markers: every marker id in it comes from content.
  stretch = lambda start, end: tokenizer.spell_out(tokenizer.encode(text[start:end]), symbols) if end > start else []
  out: list[int] = []
  at = 0
  for match in re.finditer("|".join(re.escape(m) for m in markers), text):
    if in_content(match.start()):
      continue  # a marker the message spells: part of the text around it
    out += stretch(at, match.start()) + [markers[match.group()]]
    at = match.end()
  return out + stretch(at, len(text))


def _literal_markers(tokenizer, ids: list[int], text: str, symbols: dict[int, str], in_content) -> list[int]:
  """`ids` (the encoding of `text`) with the marker ids whose occurrence in `text` lies in content replaced by
  their text's bytes. The k-th marker id of `ids` is the k-th marker occurrence of the text: markers are single
  pieces (user-defined symbols, which sentencepiece always matches) and come from nothing else."""
  if not symbols or not any(i in symbols for i in ids):
    return ids
  positions = [k for k, i in enumerate(ids) if i in symbols]
  found = [m.start() for m in re.finditer("|".join(re.escape(m) for m in symbols.values()), text)]
  if len(found) != len(positions):
    raise DataError(f"the tokenizer {tokenizer.path} encodes the chat markers {sorted(symbols.values())} "
                    f"inconsistently ({len(found)} in the text, {len(positions)} marker ids)")
  return tokenizer.spell_out(ids, symbols, {k for k, at in zip(positions, found) if in_content(at)})


def split_tokens(tokenizer, prompt: str, response: str, markers: dict[str, int] | None = None
                 ) -> tuple[list[int], list[int]]:
  """Token ids of prompt and response, taken from the tokenisation of their concatenation (what the model reads
  at sampling time); where a piece straddles the boundary it goes to the response."""
  full = encode_text(tokenizer, join_texts(prompt, response), markers)
  head = encode_text(tokenizer, prompt, markers) if prompt else []
  k = 0
  limit = min(len(head), len(full))
  while k < limit and full[k] == head[k]:
    k += 1
  return full[:k], full[k:]

"""Supervised fine-tuning data: JSONL records, the chat template, and prompt-masked rows.

Records (one JSON object per line) come in two formats:
  {"prompt": "...", "response": "..."}                          one example
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
A conversation gives one example per assistant turn: everything before that turn is the prompt, the turn is the
response (so every assistant turn of a multi-turn chat is a target, each with its full history).

Templates turn an example into (prompt text, response text):
  gemma  `<start_of_turn>{role}\\n{content}<end_of_turn>\\n` per turn (role user, model or system), the prompt ending
         with the generation header `<start_of_turn>model\\n`, the response with `<end_of_turn>`. The markers are
         reserved symbols of every tokenizer the recipes train (ids 5 and 6), so each is one token.
  diffusiongemma  the released DiffusionGemma's (Gemma 4) text template with thinking off: `<|turn>{role}\\n`
         stripped content `<turn|>\\n` per turn; the prompt ends with what Gemma 4's `add_generation_prompt`
         appends, `<|turn>model\\n<|channel>thought\\n<channel|>` (an empty thought channel: thinking off), and
         the reply ends with `<turn|>`. Earlier assistant turns of a conversation render as history, without the
         thought channel, as the release's template renders them. So a model is trained on exactly the prefix a
         serving stack sends. For the released tokenizer (data.tokenizer), where the markers are control pieces.
  plain  prompt and response as they are (completion data such as code); turns of a conversation joined by "\\n".
A template's markers inside message content are text the writer typed (a chat about chat templates, or a prompt
that tries to close its own turn), not turn boundaries: the rendered texts are `ChatText`, which remember where
content lies, and `encode_text` encodes a marker there as the bytes of its text (`Tokenizer.literal_ids`), never
as the marker's id. Only the template puts turn markers into a row or a chat prompt.

Rows (one example per row of `seq_len`): [bos] prompt response [eos] [eos]... with `loss_mask` 1 on the response
and its EOS padding (DESIGN section 3: the padding is corrupted and scored so the model learns to stop), 0 on bos
and prompt; segment 1 everywhere; positions 0..seq_len-1. An example longer than the row is cut: the response
keeps at most the row minus half of it (or minus the whole prompt, if shorter), cut on the right; the prompt is cut
from the left. Both cuts are counted and reported.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from diffgemma_jax.errors import DataError

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATES = ("gemma", "diffusiongemma", "plain")
# Each template's turn markers: (opening, closing). Every marker must be one piece of the tokenizer.
TEMPLATE_MARKERS = {"gemma": ("<start_of_turn>", "<end_of_turn>"),
                    "diffusiongemma": ("<|turn>", "<turn|>", "<|channel>", "<channel|>"), "plain": ()}
# What follows the opening marker and role of the turn the model writes (the generation header's tail).
_GENERATION_SUFFIX = {"gemma": "", "diffusiongemma": "<|channel>thought\n<channel|>"}
_GEMMA_ROLE = {"system": "system", "user": "user", "assistant": "model"}


class ChatText(str):
  """A rendered text that remembers which of its characters are message content: `content_spans`, [start, end)
  character ranges. Compares, prints and serialises as the plain string."""
  content_spans: tuple[tuple[int, int], ...]
  markers: tuple[str, ...]

  def __new__(cls, parts: Sequence[tuple[str, bool]], markers: Sequence[str] = ()):
    """From (text, is_content) parts, in order; `markers`: the template's markers (what content must not open)."""
    spans, at = [], 0
    for part, is_content in parts:
      if is_content and part:
        spans.append((at, at + len(part)))
      at += len(part)
    obj = super().__new__(cls, "".join(part for part, _ in parts))
    obj.content_spans, obj.markers = tuple(spans), tuple(markers)
    return obj

  def __getnewargs__(self):  # pickle and copy rebuild it from its parts, not from the bare string
    return self.parts(), self.markers

  def parts(self) -> list[tuple[str, bool]]:
    out, at = [], 0
    for start, end in self.content_spans:
      out += [(str.__getitem__(self, slice(at, start)), False), (str.__getitem__(self, slice(start, end)), True)]
      at = end
    return out + [(str.__getitem__(self, slice(at, len(self))), False)]


def join_texts(*texts: str) -> str:
  """Concatenation that keeps every `ChatText`'s content spans (plain strings count as template text)."""
  if not any(isinstance(t, ChatText) for t in texts):
    return "".join(texts)
  markers = next(t.markers for t in texts if isinstance(t, ChatText))
  return ChatText([p for t in texts for p in (t.parts() if isinstance(t, ChatText) else [(t, False)])], markers)


def _where(source: str, line: int | None) -> str:
  return f"{source}:{line}" if line is not None else source


def _check_unicode(text: str, where: str, field: str) -> None:
  """JSON can escape half a surrogate pair (`"\\ud800"`), which is no character: refuse it here, not later when
  the text is encoded."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(f"{where}: {field} holds a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}, "
                    f"which is not valid Unicode; escape a non-BMP character as a full surrogate pair or write it "
                    f"as UTF-8") from None


def validate_record(record: Any, source: str, line: int | None = None) -> dict[str, Any]:
  """Checks one record; returns it normalised (`prompt`/`response` or `messages`). Errors name file and line."""
  where = _where(source, line)
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object with 'prompt' and 'response' or with 'messages', got "
                    f"{type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, message in enumerate(messages):
      if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
      role, content = message["role"], message["content"]
      if role not in ROLES:
        raise DataError(f"{where}: messages[{i}] has unknown role {role!r}; valid roles are {ROLES}")
      if not isinstance(content, str):
        raise DataError(f"{where}: messages[{i}].content must be a string")
      _check_unicode(content, where, f"messages[{i}].content")
      if role == "system" and i > 0:
        raise DataError(f"{where}: messages[{i}] is a system message; only the first message may be one")
      if role == "assistant" and not content.strip():
        raise DataError(f"{where}: messages[{i}] is an empty assistant response")
      out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
      raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return {"messages": out}
  if "prompt" in record or "response" in record:
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str):
      raise DataError(f"{where}: 'prompt' must be a string")
    if not isinstance(response, str) or not response.strip():
      raise DataError(f"{where}: 'response' must be a non-empty string")
    _check_unicode(prompt, where, "'prompt'")
    _check_unicode(response, where, "'response'")
    return {"prompt": prompt, "response": response}
  raise DataError(f"{where}: a record needs 'prompt' and 'response', or 'messages'; got keys {sorted(record)}")


def read_jsonl(path: str, *, max_bad_lines: int, seen_bad: int = 0, display: str | None = None
               ) -> tuple[list[dict], int]:
  """Valid records of a JSONL file and the number of malformed lines (bad JSON or not UTF-8) skipped, each
  reported on stderr with its file and line. More than `max_bad_lines` malformed lines in all (`seen_bad` of them
  in earlier files), or any invalid record, is an error."""
  display = display or path
  records, bad = [], 0
  try:
    f = open(path, "rb")  # decoded line by line, so a non-UTF-8 line is reported with its number
  except OSError as e:
    raise DataError(f"cannot read {display}: {e.strerror}") from None
  with f:
    for number, raw in enumerate(f, start=1):
      if number == 1:  # a byte-order mark (some Windows editors write one) is not part of the first record
        raw = raw.removeprefix(b"\xef\xbb\xbf")
      try:
        line = raw.decode("utf-8")
        if not line.strip():
          continue
        record = json.loads(line)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        bad += 1
        problem = (f"not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line)"
                   if isinstance(e, UnicodeDecodeError) else f"malformed JSON ({e.msg}, column {e.colno})")
        print(f"warning: {display}:{number}: {problem}; line skipped", file=sys.stderr)
        if seen_bad + bad > max_bad_lines:
          raise DataError(f"{display}: more than data.max_bad_lines={max_bad_lines} malformed lines (the last at "
                          f"line {number}: {problem}); fix the file or raise the limit") from None
        continue
      record = validate_record(record, display, number)
      records.append(dict(record, source=f"{display}:{number}"))
  return records, bad


def render(record: dict[str, Any], template: str) -> list[tuple[str, str]]:
  """(prompt text, response text) of every example of a record under `template`."""
  if template not in CHAT_TEMPLATES:
    raise DataError(f"data.chat_template: unknown template {template!r}; valid templates are {CHAT_TEMPLATES}")
  if "messages" in record:
    turns = [(m["role"], m["content"]) for m in record["messages"]]
  elif template == "plain":  # completion data: the prompt is the text as it is
    return [(record["prompt"], record["response"])]
  else:
    turns = [("user", record["prompt"]), ("assistant", record["response"])]
  examples = []
  if template == "plain":
    history: list[str] = []
    for role, content in turns:
      if role == "assistant":
        examples.append(("".join(h + "\n" for h in history), content))
      history.append(content)
    return examples
  open_, close = TEMPLATE_MARKERS[template][:2]
  text = lambda parts: ChatText(parts, TEMPLATE_MARKERS[template])
  strip = template == "diffusiongemma"  # the released template strips every message
  prefix: list[tuple[str, bool]] = []
  for role, content in turns:
    content = content.strip() if strip else content
    if role == "assistant":
      examples.append((text(prefix + [(f"{open_}model\n" + _GENERATION_SUFFIX[template], False)]),
                       text([(content, True), (close, False)])))
    prefix += [(f"{open_}{_GEMMA_ROLE[role]}\n", False), (content, True), (f"{close}\n", False)]
  return examples


def chat_prompt(text: str, template: str, system: str | None = None) -> str:
  """The prompt text a fine-tuned model reads for one user turn (what `render` makes the prompt of an example),
  ending with the template's generation header."""
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": text}, {"role": "assistant", "content": "-"}]
  return render({"messages": messages}, template)[0][0]


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


@dataclasses.dataclass
class RowStats:
  examples: int = 0
  prompts_cut: int = 0
  responses_cut: int = 0

  def report(self, what: str) -> str | None:
    if not (self.prompts_cut or self.responses_cut):
      return None
    return (f"warning: {what}: {self.prompts_cut} of {self.examples} prompts were cut from the left and "
            f"{self.responses_cut} responses cut on the right to fit train.seq_len")


def make_row(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int, *, bos_id: int, eos_id: int,
             stats: RowStats | None = None) -> dict[str, np.ndarray]:
  """One SFT row (see module docstring); counts cuts in `stats`."""
  if seq_len < 3:
    raise DataError(f"train.seq_len={seq_len} is too short for an SFT row (bos, prompt, response, eos)")
  prompt, response = list(prompt_ids), list(response_ids) + [eos_id]
  budget = seq_len - 1  # after bos
  if len(prompt) + len(response) > budget:
    keep_prompt = max(budget - len(response), min(len(prompt), budget // 2))
    keep_response = budget - keep_prompt
    if stats is not None:
      stats.prompts_cut += keep_prompt < len(prompt)
      stats.responses_cut += keep_response < len(response)
    prompt = prompt[len(prompt) - keep_prompt:]
    response = response[:keep_response]
  if stats is not None:
    stats.examples += 1
  head = [bos_id] + prompt
  tokens = np.full((seq_len,), eos_id, np.int32)
  tokens[:len(head)] = head
  tokens[len(head):len(head) + len(response)] = response
  loss_mask = np.zeros((seq_len,), np.int32)
  loss_mask[len(head):] = 1
  return {"tokens": tokens, "segment_ids": np.ones((seq_len,), np.int32),
          "positions": np.arange(seq_len, dtype=np.int32), "loss_mask": loss_mask}


def make_rows(records: Iterable[dict[str, Any]], tokenizer, seq_len: int, template: str,
              ) -> tuple[dict[str, np.ndarray], RowStats]:
  """All rows of a list of records, stacked: {tokens, segment_ids, positions, loss_mask} of [N, seq_len]."""
  stats = RowStats()
  markers = marker_ids(tokenizer, template)
  pairs = [pair for record in records for pair in render(record, template)]
  rows = []
  for prompt, response in pairs:
    prompt_ids, response_ids = split_tokens(tokenizer, prompt, response, markers)
    rows.append(make_row(prompt_ids, response_ids, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                         stats=stats))
  keys = ("tokens", "segment_ids", "positions", "loss_mask")
  if not rows:
    return {k: np.zeros((0, seq_len), np.int32) for k in keys}, stats
  return {k: np.stack([r[k] for r in rows]) for k in keys}, stats

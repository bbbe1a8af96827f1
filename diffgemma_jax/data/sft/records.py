"""SFT records: JSONL files of one JSON object per line, checked and normalised.

Two formats:
  {"prompt": "...", "response": "..."}                          one example
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
A conversation gives one example per assistant turn (`templates.render`). Malformed lines (bad JSON, not UTF-8)
are skipped and reported up to data.max_bad_lines; an invalid record is an error naming its file and line.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from diffgemma_jax.errors import DataError

ROLES = ("system", "user", "assistant")


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

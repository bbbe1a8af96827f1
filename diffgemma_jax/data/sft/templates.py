"""Chat templates: an SFT example rendered as (prompt text, response text).

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
A conversation gives one example per assistant turn: everything before that turn is the prompt, the turn is the
response (so every assistant turn of a multi-turn chat is a target, each with its full history).

A template's markers inside message content are text the writer typed (a chat about chat templates, or a prompt
that tries to close its own turn), not turn boundaries: the rendered texts are `ChatText`, which remember where
content lies, so that encoding (`encoding.encode_text`) never reads a marker there as a turn boundary.
"""

from __future__ import annotations

from typing import Any, Sequence

from diffgemma_jax.errors import DataError

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

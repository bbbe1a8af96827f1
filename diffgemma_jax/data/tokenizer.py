"""A sentencepiece tokenizer with the reserved ids every recipe trains in: pad 0, unk 1, bos 2, eos 3, then the
user-defined symbols `<mask>` (4), `<start_of_turn>` (5) and `<end_of_turn>` (6) used by the chat template."""

from __future__ import annotations

import filecmp
import os

import numpy as np
import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from diffgemma_jax.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
USER_SYMBOLS = ("<mask>", "<start_of_turn>", "<end_of_turn>")


class Tokenizer:

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f"tokenizer model {path!r} does not exist; build the dataset first (data_recipes)")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.get_piece_size()
    self.pad_id = self.sp.pad_id()
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()
    self.unk_id = self.sp.unk_id()
    self.mask_id = self.sp.piece_to_id("<mask>")
    self.start_of_turn_id = self.sp.piece_to_id("<start_of_turn>")
    self.end_of_turn_id = self.sp.piece_to_id("<end_of_turn>")
    if self.mask_id == self.unk_id:  # e.g. the released DiffusionGemma's: uniform-state noise needs no mask
      self.mask_id = -1
    self.special_ids = frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id, self.mask_id) if i >= 0)
    # `<mask>` is a user-defined symbol, so the literal text "<mask>" (ML code and docs write it) would encode to
    # the mask id: data would hold the token the objectives give zero probability. Its ids are replaced by the
    # text's bytes (byte-fallback pieces), which decode back to "<mask>".
    mask_from_text = self.mask_id >= 0 and self.mask_id in self.sp.encode("<mask>")
    self._spelled_mask = {self.mask_id: "<mask>"} if mask_from_text else {}

  def literal_ids(self, text: str) -> list[int]:
    """The byte-fallback pieces of `text`'s UTF-8 bytes, which decode back to `text` without ever being one of
    the tokenizer's symbols (a text that spells `<mask>` or a turn marker); [unk] without byte pieces."""
    byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
    return byte_ids if self.unk_id not in byte_ids else [self.unk_id]

  def spell_out(self, ids: list[int], symbols: dict[int, str], positions=None) -> list[int]:
    """`ids` with each id of `symbols` (only at the indices in `positions`, when given) replaced by the
    `literal_ids` of its text."""
    out: list[int] = []
    for k, i in enumerate(ids):
      spelled = i in symbols and (positions is None or k in positions)
      out.extend(self.literal_ids(symbols[i]) if spelled else (i,))
    return out

  def encode(self, text: str | list[str], num_threads: int = 0):
    """Ids of a text (or of each text of a list); the mask id never comes out of text."""
    if isinstance(text, list):
      return [self._no_mask(ids) for ids in self.sp.encode(text, num_threads=num_threads)]
    return self._no_mask(self.sp.encode(text))

  def encode_packed(self, texts: list[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The texts as packed documents back to back, each `[bos] ids [eos]` with the ids of `encode`: (the ids,
    int32; each document's length, int64). One array for the batch, not one per document."""
    try:
      arrays = self.sp.encode(texts, num_threads=num_threads, out_type="numpy")
    except (TypeError, ValueError):  # a sentencepiece without array output
      arrays = [np.asarray(ids, np.int32) for ids in self.sp.encode(texts, num_threads=num_threads)]
    if self._spelled_mask and any(self.mask_id in ids for ids in arrays):
      arrays = [np.asarray(self._no_mask(ids.tolist()), np.int32) for ids in arrays]
    lengths = np.fromiter((len(ids) + 2 for ids in arrays), np.int64, len(arrays))
    ends = np.cumsum(lengths)
    packed = np.empty((int(ends[-1]) if len(ends) else 0,), np.int32)
    packed[ends - lengths], packed[ends - 1] = self.bos_id, self.eos_id
    for start, end, ids in zip((ends - lengths + 1).tolist(), (ends - 1).tolist(), arrays):
      packed[start:end] = ids
    return packed, lengths

  def _no_mask(self, ids: list[int]) -> list[int]:
    if not self._spelled_mask or self.mask_id not in ids:
      return ids
    return self.spell_out(ids, self._spelled_mask)

  def decode(self, ids) -> str:
    """Text of the ids, leaving out padding, bos/eos and mask tokens."""
    return self.sp.decode([int(i) for i in ids if int(i) not in self.special_ids])

  def decode_continuation(self, prefix_ids, ids) -> str:
    """Text of `ids` as it reads after `prefix_ids` (a completion after its prompt). `decode(ids)` alone would
    read them as a text's start and drop the leading space the dummy prefix stands for (a code line's first
    indent space); here the prefix's text is cut off the text of both."""
    head = self.decode(prefix_ids)
    text = self.decode(list(prefix_ids) + list(ids))
    return text[len(head):] if text.startswith(head) else self.decode(ids)


def train_tokenizer(texts, model_prefix: str, vocab_size: int, *, max_sentences: int = 120_000) -> Tokenizer:
  """Trains a byte-fallback sentencepiece model on the given texts (whitespace kept as written, for code)."""
  def lines():
    count = 0
    for text in texts:
      for line in text.split("\n"):
        if line.strip():
          yield line
          count += 1
          if count >= max_sentences:
            return

  min_vocab = 256 + 4 + len(USER_SYMBOLS) + 16
  if vocab_size < min_vocab:
    raise DataError(f"vocab_size={vocab_size} is too small for a byte-fallback tokenizer; use at least {min_vocab}")
  try:
    _train(lines(), model_prefix, vocab_size, max_sentences)
  except RuntimeError as e:
    raise DataError(f"sentencepiece could not train a {vocab_size}-token vocabulary on this corpus: "
                    f"{str(e).splitlines()[0][-200:]}; try another vocab_size (model.vocab_size), or, if the "
                    f"vocabulary was too large, a sample of more than {max_sentences} lines "
                    f"(data.tokenizer_sample_lines)") from None
  _drop_build_paths(model_prefix + ".model")
  return Tokenizer(model_prefix + ".model")


# TrainerSpec fields that say where and how a model was trained, not how it tokenises: sentencepiece stores the
# build's paths (`model_prefix`, e.g. `data/<name>.partial/tokenizer`), so two builds of one corpus differ in bytes.
_BUILD_FIELDS = ("model_prefix", "input", "input_format")
# TrainerSpec fields that change the ids of a text or the text of ids; the pieces (piece, score, type) and the
# normalizer/denormalizer specs are compared whole.
_TOKENIZING_FIELDS = ("model_type", "vocab_size", "byte_fallback", "treat_whitespace_as_suffix",
                      "allow_whitespace_only_pieces", "split_digits", "unk_id", "bos_id", "eos_id", "pad_id",
                      "unk_piece", "bos_piece", "eos_piece", "pad_piece", "unk_surface", "control_symbols",
                      "user_defined_symbols")


def _model_proto(path: str):
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def _drop_build_paths(path: str) -> None:
  """Rewrites a freshly trained model without the build's paths, so its bytes depend on the corpus only."""
  proto = _model_proto(path)
  for field in _BUILD_FIELDS:
    proto.trainer_spec.ClearField(field)
  with open(path, "wb") as f:
    f.write(proto.SerializeToString())


def same_tokenizer(path_a: str, path_b: str) -> bool:
  """Whether two sentencepiece files tokenise alike: the same pieces, scores and types, normalizer and
  denormalizer, and tokenising settings, whatever paths or training options each build recorded."""
  if filecmp.cmp(path_a, path_b, shallow=False):
    return True
  try:
    a, b = _model_proto(path_a), _model_proto(path_b)
  except DecodeError:  # not a sentencepiece model, and the bytes differ
    return False
  return (a.pieces == b.pieces and a.normalizer_spec == b.normalizer_spec
          and a.denormalizer_spec == b.denormalizer_spec
          and all(getattr(a.trainer_spec, f) == getattr(b.trainer_spec, f) for f in _TOKENIZING_FIELDS))


def _train(lines, model_prefix, vocab_size, max_sentences):
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_prefix=model_prefix, vocab_size=vocab_size, model_type="unigram",
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=list(USER_SYMBOLS),
      byte_fallback=True, character_coverage=0.9995, split_digits=True, remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, normalization_rule_name="identity", num_threads=2,
      input_sentence_size=max_sentences, shuffle_input_sentence=True, hard_vocab_limit=True,
      max_sentence_length=8192, minloglevel=2)

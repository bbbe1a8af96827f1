"""The sentencepiece tokenizer (`data/tokenizer.py`) on a tiny tokenizer trained directly (the session fixture
`tiny_tokenizer`): reserved ids, continuations that keep their leading spaces, the literal "<mask>" text, and
tokenizers compared by content rather than by bytes."""

import os

import pytest
from sentencepiece import sentencepiece_model_pb2

from diffgemma_jax.data import same_tokenizer
from diffgemma_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, USER_SYMBOLS
from diffgemma_jax.errors import ConfigError, DataError
from diffgemma_jax.train.dataset import pin_tokenizer


def test_reserved_ids_and_user_symbols(tiny_tokenizer):
  tok = tiny_tokenizer
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (PAD_ID, BOS_ID, EOS_ID, 512)
  assert [tok.sp.id_to_piece(i) for i in (tok.mask_id, tok.start_of_turn_id, tok.end_of_turn_id)] == list(
      USER_SYMBOLS)
  assert tok.special_ids == {PAD_ID, BOS_ID, EOS_ID, tok.mask_id}
  with pytest.raises(DataError, match="does not exist"):
    type(tok)(os.path.join(os.path.dirname(tok.path), "missing.model"))


def test_tokenizers_compare_by_content_not_by_the_path_they_were_built_at(tiny_tokenizer, tmp_path):
  out = os.path.dirname(tiny_tokenizer.path)
  built = tiny_tokenizer.path
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(open(built, "rb").read())
  assert proto.trainer_spec.model_prefix == "" and not proto.trainer_spec.input  # new builds record no path

  def variant(name, change):
    p = sentencepiece_model_pb2.ModelProto()
    p.CopyFrom(proto)
    change(p)
    (tmp_path / name).mkdir()
    (tmp_path / name / "tokenizer.model").write_bytes(p.SerializeToString())
    return str(tmp_path / name)

  # A run pinned before builds dropped their path: same pieces, another model_prefix. It must still match.
  old_run = variant("old_run", lambda p: setattr(p.trainer_spec, "model_prefix", "data/x-v400.partial/tokenizer"))
  assert open(built, "rb").read() != open(os.path.join(old_run, "tokenizer.model"), "rb").read()
  assert same_tokenizer(built, os.path.join(old_run, "tokenizer.model"))
  pin_tokenizer(out, old_run, write=False)
  rescored = variant("rescored", lambda p: setattr(p.pieces[300], "score", p.pieces[300].score + 1.0))
  no_bytes = variant("no_bytes", lambda p: setattr(p.trainer_spec, "byte_fallback", False))
  for other in (rescored, no_bytes):
    assert not same_tokenizer(built, os.path.join(other, "tokenizer.model"))
    with pytest.raises(ConfigError, match="differs"):
      pin_tokenizer(out, other, write=False)


def test_a_completion_decodes_with_its_leading_spaces(tiny_tokenizer):
  tok = tiny_tokenizer
  for prompt, completion in (("def f(path):\n", "    return path\n"), ("x =", " 1"), ("", "  indented"),
                             ("caf\xe9", " cr\xe8me")):
    ids, head = tok.encode(prompt + completion), tok.encode(prompt)
    assert ids[:len(head)] == head
    prefix = [tok.bos_id] + head
    assert tok.decode_continuation(prefix, ids[len(head):]) == completion


def test_literal_mask_text_never_encodes_to_the_mask_id(tiny_tokenizer):
  """"<mask>" written in a document is text, not the token the objectives give zero probability: it encodes to
  its bytes and decodes back, for single texts and batches."""
  tok = tiny_tokenizer
  assert tok.mask_id in tok.sp.encode("<mask>")  # what sentencepiece alone does with a user-defined symbol
  text = "fill('the <mask> of <mask>')"
  for ids in (tok.encode(text), tok.encode([text, "plain"])[0]):
    assert tok.mask_id not in ids and tok.decode(ids) == text

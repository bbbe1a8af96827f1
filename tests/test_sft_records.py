"""SFT records (`data/sft/records.py`): validation errors name file, line and field; malformed lines are reported
and skipped up to data.max_bad_lines."""

import json

import pytest

from diffgemma_jax.data.sft import read_jsonl, validate_record
from diffgemma_jax.errors import DataError


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "response": "  "}, "f.jsonl:7: 'response' must be a non-empty string"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "f.jsonl:7: messages[0] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "f.jsonl:7: messages[1] is an empty assistant response"),
    ({"messages": [{"role": "user", "content": "x"}]}, "f.jsonl:7: the conversation has no assistant turn"),
    ({"text": "x"}, "f.jsonl:7: a record needs 'prompt' and 'response', or 'messages'"),
])
def test_bad_records_name_file_and_line(record, message):
  with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")):
    validate_record(record, "f.jsonl", 7)


def test_malformed_lines_reported_and_skipped_up_to_the_limit(tmp_path, capsys):
  good = json.dumps({"prompt": "a", "response": "b"})
  path = _write(tmp_path / "d.jsonl", [good, "{not json", good, "", '{"prompt": "a", "response": "b"'])
  records, bad = read_jsonl(path, max_bad_lines=2)
  assert len(records) == 2 and bad == 2 and records[1]["source"] == f"{path}:3"
  err = capsys.readouterr().err
  assert f"{path}:2: malformed JSON" in err and f"{path}:5: malformed JSON" in err
  with pytest.raises(DataError,
                     match=r"more than data.max_bad_lines=1 malformed lines \(the last at line 5: malformed JSON"):
    read_jsonl(path, max_bad_lines=1)
  # The limit counts malformed lines over all the files of a build, and the error names the configured limit.
  from data_recipes.jsonl import source_records
  other = _write(tmp_path / "e.jsonl", [good, "{oops"])
  with pytest.raises(DataError, match=r"e.jsonl: more than data.max_bad_lines=2 malformed lines"):
    source_records(str(tmp_path / "[de].jsonl"), "data.source", 2)
  assert len(source_records(other, "data.source", 2)[0]) == 1
  bad_role = _write(tmp_path / "r.jsonl", [good, json.dumps({"messages": [{"role": "bot", "content": "x"}]})])
  with pytest.raises(DataError, match=r"r.jsonl:2: messages\[0\] has unknown role 'bot'"):
    read_jsonl(bad_role, max_bad_lines=10)


def test_non_utf8_lines_count_as_malformed_and_a_bom_is_not_a_record(tmp_path, capsys):
  good = json.dumps({"prompt": "a", "response": "b"}).encode()
  path = tmp_path / "d.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"prompt": "caf\xe9", "response": "b"}\n' + good + b"\n")
  records, bad = read_jsonl(str(path), max_bad_lines=1)
  assert len(records) == 2 and bad == 1 and records[0]["source"] == f"{path}:1"  # the BOM line is kept
  assert f"{path}:2: not valid UTF-8 (byte 0xe9" in capsys.readouterr().err
  with pytest.raises(DataError, match=r"d.jsonl: more than data.max_bad_lines=0 malformed lines \(the last at line "
                                      r"2: not valid UTF-8"):
    read_jsonl(str(path), max_bad_lines=0)


def test_a_lone_surrogate_names_file_line_and_field(tmp_path):
  path = _write(tmp_path / "s.jsonl", [json.dumps({"prompt": "a", "response": "b"}),
                                       '{"prompt": "a", "response": "b\\ud800"}'])
  with pytest.raises(DataError, match=r"s.jsonl:2: 'response' holds a lone surrogate \\ud800"):
    read_jsonl(path, max_bad_lines=10)
  chat = {"messages": [{"role": "user", "content": "x\udc00"}, {"role": "assistant", "content": "y"}]}
  with pytest.raises(DataError, match=r"f.jsonl:3: messages\[0\].content holds a lone surrogate"):
    validate_record(chat, "f.jsonl", 3)

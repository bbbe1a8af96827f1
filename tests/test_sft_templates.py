"""Chat templates (`data/sft/templates.py`): every assistant turn an example with its history, the generate CLI's
chat prompt equal to training's, and the released DiffusionGemma template."""

from diffgemma_jax.data.sft import chat_prompt, render, validate_record


def test_both_formats_and_multi_turn_expansion():
  pair = {"prompt": "2+2?", "response": "4"}
  assert render(pair, "plain") == [("2+2?", "4")]
  assert render(pair, "gemma") == [("<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
                                    "4<end_of_turn>")]
  chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                       {"role": "assistant", "content": "Goodbye."}]}
  examples = render(validate_record(chat, "f.jsonl", 1), "gemma")
  assert len(examples) == 2  # every assistant turn is a target, with everything before it as the prompt
  first, second = examples
  assert first[1] == "Hello.<end_of_turn>" and second[1] == "Goodbye.<end_of_turn>"
  assert first[0] == ("<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
                      "<start_of_turn>model\n")
  assert second[0] == first[0] + "Hello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
  plain = render(chat, "plain")
  assert plain[1] == ("Be brief.\nHi\nHello.\nBye\n", "Goodbye.")


def test_chat_prompt_is_the_training_prompt_of_a_one_turn_conversation():
  record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "assistant", "content": "A"}]}
  assert chat_prompt("U", "gemma", "S") == render(record, "gemma")[0][0]
  assert chat_prompt("U", "gemma").endswith("<start_of_turn>user\nU<end_of_turn>\n<start_of_turn>model\n")
  assert chat_prompt("U", "plain") == "U\n"

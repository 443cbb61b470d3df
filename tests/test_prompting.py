"""verakit.prompting: the prompt format recorded with an artifact, and token ids equal to the ones training
encodes (train.lm_data / train.generate), so serving and `verakit generate` read prompts as training did."""

import pytest

from lm_helpers import tiny_tokenizer
from verakit.prompting import PromptFormat, end_token_ids, prompt_format, prompt_token_ids, stop_token_ids


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()  # ChatML template: <|im_end|> ends a turn, </s> is EOS


@pytest.mark.parametrize("info, has_template, override, expected", [
    ({}, True, None, PromptFormat(chat_template=True, newline=False)),  # the base model alone
    ({}, False, None, PromptFormat(chat_template=False, newline=False)),
    ({"task": "e2e", "chat_template": False}, True, None, PromptFormat(chat_template=False, newline=True)),
    ({"task": "instruct", "chat_template": True}, True, None, PromptFormat(chat_template=True, newline=True)),
    ({"task": "jsonl", "chat_template": False}, True, None, PromptFormat(chat_template=False, newline=False)),
    ({"task": "e2e", "chat_template": False}, True, True, PromptFormat(chat_template=True, newline=True)),  # a flag wins
])
def test_recorded_format(info, has_template, override, expected):
    assert prompt_format(info, has_template, override) == expected


def test_text_and_token_ids(tok):
    plain = PromptFormat(chat_template=False, newline=True)
    assert plain.text("name[Zizzi]") == "name[Zizzi]\n" and plain.text("a\n") == "a\n"
    assert plain.token_ids(tok, "name[Zizzi]") == tok("name[Zizzi]\n").input_ids
    chat = PromptFormat(chat_template=True, newline=True)
    rendered = "<|im_start|>user\nname[Zizzi]<|im_end|>\n<|im_start|>assistant\n"  # the newline stripped again
    assert chat.token_ids(tok, "name[Zizzi]") == tok(rendered, add_special_tokens=False).input_ids
    assert end_token_ids(tok, True) == tok("<|im_end|>", add_special_tokens=False).input_ids
    assert stop_token_ids(tok, True) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    assert stop_token_ids(tok, False) == [tok.eos_token_id]


@pytest.mark.parametrize("chat", [False, True])
def test_same_ids_as_training(tok, chat):
    """Until training imports this module, its own copy of the rule must agree with it."""
    from verakit.train.generate import stop_token_ids as train_stops
    from verakit.train.lm_data import _end_tokens, _prompt_tokens

    for prompt in ("name[Zizzi], food[French]\n", "Give three tips for staying healthy.", "  x  "):
        assert prompt_token_ids(tok, prompt, chat) == _prompt_tokens(tok, prompt, chat)
    assert end_token_ids(tok, chat) == _end_tokens(tok, chat)
    assert stop_token_ids(tok, chat) == train_stops(tok, chat)


def test_missing_template_names_the_tokenizer(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        prompt_token_ids(bare, "x", True)

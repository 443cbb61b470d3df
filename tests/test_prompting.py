"""verakit.prompting: the prompt format recorded with an artifact, and the token ids training encodes with it
(train.lm_data / train.generate use this module), so serving and `verakit generate` read prompts as training did."""

import pytest
import torch

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


class CharChat:
    """One id per character (its code point), BOS=1 on add_special_tokens, EOS=2, and a template that writes
    "<u>{user}|\n<a>" for a user turn and its generation prompt, so every id below can be written by hand."""

    bos_token_id, eos_token_id, pad_token_id, name_or_path = 1, 2, 0, "char-chat"
    chat_template = "<u>...|<a>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True) -> str:
        assert not tokenize
        text = "".join(f"<{m['role'][0]}>{m['content']}|\n" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")


def _ords(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize("chat", [False, True])
def test_training_encodes_by_this_rule(chat):
    """Training's encoding (train.lm_data, train.generate's stops), pinned to ids built by hand: plain text
    gets the tokenizer's BOS and ends with EOS; a chat prompt is the rendered user turn with its trailing
    newline stripped, no second BOS, and the completion ends with what the template writes after a reply."""
    from verakit.train.causal.generate import DecodeConfig, generate_ids
    from verakit.train.causal.lm_data import IGNORE_INDEX, LMExample, prompt_ids, tokenize_examples

    tok = CharChat()
    prompt = _ords("<u>ab|\n<a>") if chat else [1, *_ords("ab\n")]
    end = _ords("|") if chat else [2]  # "|\n" after the reply, trailing newline dropped; else EOS
    (row,) = tokenize_examples(tok, [LMExample("ab\n", "xy")], 64, use_chat_template=chat)
    assert row["input_ids"] == prompt + _ords("xy") + end
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + _ords("xy") + end
    assert prompt_ids(tok, ["ab\n"], use_chat_template=chat)["input_ids"].tolist() == [prompt]
    assert prompt_token_ids(tok, "ab\n", chat) == prompt and end_token_ids(tok, chat) == end

    class Echo(torch.nn.Module):
        """generate() that appends a fixed continuation: the first stop token cuts it."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.stops = None

        def generate(self, input_ids, eos_token_id, **_):
            self.stops = eos_token_id
            tail = torch.tensor([_ords("ok") + [ord("|"), 2, ord("z")]] * input_ids.shape[0])
            return torch.cat([input_ids, tail], dim=1)

    model = Echo()
    got = generate_ids(model, tok, ["ab\n"], use_chat_template=chat, config=DecodeConfig(max_new_tokens=5))
    assert model.stops == ([ord("|"), 2] if chat else [2])
    assert got == [_ords("ok") if chat else _ords("ok|")]


def test_missing_template_names_the_tokenizer(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        prompt_token_ids(bare, "x", True)

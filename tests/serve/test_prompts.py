"""serve.prompts.PromptEncoder: ids in the trained format (or raw), the stop ids that go with them, and the
limits, on the tiny ChatML tokenizer (no model)."""

import pytest

from lm_helpers import tiny_tokenizer
from verakit.prompting import PromptFormat
from verakit.serve.prompts import InputError, PromptEncoder

PLAIN = PromptFormat(chat_template=False, newline=True)  # an E2E adapter
CHAT = PromptFormat(chat_template=True, newline=True)  # an instruct adapter


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _encoder(tok, max_input_tokens=64, context=96):
    return PromptEncoder(tok, max_input_tokens, context, "tiny", generate=True)


def test_formats_give_training_ids_and_stops(tok):
    enc = _encoder(tok)
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    raw = enc.encode("name[Zizzi]", 8, None)
    assert raw.ids == tuple(tok("name[Zizzi]").input_ids) and raw.stop_ids == ()
    plain = enc.encode("name[Zizzi]", 8, PLAIN)
    assert plain.ids == tuple(tok("name[Zizzi]\n").input_ids) and plain.stop_ids == (eos,)
    chat = enc.encode("name[Zizzi]", 8, CHAT)
    rendered = "<|im_start|>user\nname[Zizzi]<|im_end|>\n<|im_start|>assistant\n"
    assert chat.ids == tuple(tok(rendered, add_special_tokens=False).input_ids) and chat.stop_ids == (im_end, eos)
    assert enc.encode_chat([{"role": "user", "content": "name[Zizzi]"}], 8, CHAT, "a") == chat
    assert enc.encode_chat([{"role": "user", "content": "name[Zizzi]"}], 8, PLAIN, "a") == plain
    assert enc.format({"task": "e2e", "chat_template": False}) == PLAIN and enc.format({}).chat_template


def test_limits_and_refusals_name_the_fault(tok):
    n = len(tok("name[Zizzi]\n").input_ids)
    with pytest.raises(InputError, match=f"the prompt has {n} tokens; the limit is {n - 1}"):
        _encoder(tok, max_input_tokens=n - 1).encode("name[Zizzi]", 1, PLAIN)
    with pytest.raises(InputError, match=rf"prompt \({n} tokens\) \+ max_tokens \(5\) exceed the context of {n + 4}"):
        _encoder(tok, context=n + 4).encode("name[Zizzi]", 5, PLAIN)
    assert len(_encoder(tok, context=n + 5).encode("name[Zizzi]", 5, PLAIN).ids) == n
    with pytest.raises(InputError, match="empty after tokenization"):
        _encoder(tok).encode("", 1, None)
    two = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="adapter 'e2e' reads plain-text prompts"):
        _encoder(tok).encode_chat(two, 1, PLAIN, "e2e")
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(InputError, match="the model 'tiny' has no chat template; use /v1/completions"):
        PromptEncoder(bare, 64, 96, "tiny", generate=True).encode_chat(two, 1, None, None)
    with pytest.raises(InputError, match="has no chat_template"):  # an adapter trained with one, this base without
        PromptEncoder(bare, 64, 96, "tiny", generate=True).encode("hi", 1, CHAT)

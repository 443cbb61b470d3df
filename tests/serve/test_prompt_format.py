"""The server encodes prompts as each adapter was trained (verakit.prompting): a completion equals
`verakit generate`'s output for the same adapter and prompt (greedy); `"raw": true` sends the text as is.

Adapters over the tiny Llama of conftest: `e2e` records plain prompts ending in a newline, `chat` records the
chat template, `bare` records nothing (so, like the base model, it gets the template the tokenizer has)."""

import json
from dataclasses import replace

import pytest
import torch

from serve.cases import trained_adapter
from verakit import VeraConfig
from verakit.cli import main
from verakit.fileformat import write_adapter

RECORDS = {"e2e": {"task": "e2e", "chat_template": False}, "chat": {"task": "instruct", "chat_template": True},
           "bare": {}}
PROMPT = "hello world"  # a prompt whose greedy text differs between the formats of each adapter


@pytest.fixture(scope="module")
def served(llama_dirs, tmp_path_factory):
    """(client, tokenizer, model_dir, adapter_dir): an in-process app over an Engine with the three adapters."""
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from verakit.serve.app import create_app
    from verakit.serve.engine import Engine
    from verakit.serve.metrics import ServeMetrics
    from verakit.serve.options import ServeOptions

    torch.set_num_threads(1)
    model_dir = llama_dirs[0]
    adapter_dir = tmp_path_factory.mktemp("formats")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for i, (name, record) in enumerate(RECORDS.items()):
        adapter = trained_adapter(base, VeraConfig(r=8), seed=10 + i, std=1.0)
        write_adapter(replace(adapter, extra=record), adapter_dir / f"{name}.safetensors")
    options = ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1, max_wait_ms=0, max_new_tokens=32)
    metrics = ServeMetrics(lambda: (0, 0, 0, 0, 0))
    engine = Engine(options, on_batch=metrics.observe_batch)
    try:
        with TestClient(create_app(engine, metrics, options)) as client:
            yield client, engine.tokenizer, model_dir, adapter_dir
    finally:
        engine.close()


def _generate_cli(capsys, model_dir, adapter, prompt, max_new_tokens, *flags):
    """`verakit generate ... --json`'s text for one prompt."""
    args = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens), "--json",
            *flags]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    capsys.readouterr()
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)[0]["generation"]


def _complete(client, model, prompt, max_tokens=12, **extra):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name", ["e2e", "chat", "bare", None])
def test_completion_equals_verakit_generate(served, capsys, name):
    client, tok, model_dir, adapter_dir = served
    adapter = adapter_dir / f"{name}.safetensors" if name else None
    out = _complete(client, name or "llama", PROMPT)
    # `verakit generate` strips the whitespace around its text; the API returns the text as generated.
    assert out["choices"][0]["text"].strip() == _generate_cli(capsys, model_dir, adapter, PROMPT, 12)
    chat_ids = tok(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False).input_ids
    expected_ids = tok(PROMPT + "\n").input_ids if name == "e2e" else chat_ids
    assert out["usage"]["prompt_tokens"] == len(expected_ids)


def test_raw_sends_the_text_unchanged(served, capsys):
    client, tok, model_dir, adapter_dir = served
    raw = _complete(client, "e2e", PROMPT, raw=True)
    formatted = _complete(client, "e2e", PROMPT)
    assert raw["usage"]["prompt_tokens"] == len(tok(PROMPT).input_ids)  # no newline added
    assert raw["choices"][0]["text"] != formatted["choices"][0]["text"]  # so the format matters for this adapter
    # `bare` records nothing, so `verakit generate --no-chat-template` encodes exactly the raw text (BOS + PROMPT).
    for name in ("chat", "bare", "llama"):  # each format changes the answer, so the comparisons above mean something
        assert _complete(client, name, PROMPT, raw=True)["choices"][0]["text"] != \
            _complete(client, name, PROMPT)["choices"][0]["text"]
    raw_bare = _complete(client, "bare", PROMPT, raw=True)
    assert raw_bare["choices"][0]["text"].strip() == _generate_cli(
        capsys, model_dir, adapter_dir / "bare.safetensors", PROMPT, 12, "--no-chat-template")
    assert raw_bare["usage"]["prompt_tokens"] == len(tok(PROMPT).input_ids)


def _chat(client, model, messages, **extra):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 12,
                                                     "temperature": 0, **extra})


def test_chat_follows_the_adapter_format(served):
    client, tok, _, _ = served
    user = [{"role": "user", "content": PROMPT}]
    for name in ("chat", "e2e"):  # one user message reads exactly like the completion prompt
        r = _chat(client, name, user)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == _complete(client, name, PROMPT)["choices"][0]["text"]

    conversation = [{"role": "system", "content": "be brief"}, *user]
    r = _chat(client, "e2e", conversation)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"
    message = r.json()["error"]["message"]
    assert "adapter 'e2e' reads plain-text prompts" in message and "without a chat template" in message and '"raw": true' in message
    r = _chat(client, "e2e", conversation, raw=True)  # the tokenizer's template over the messages as sent
    template_ids = tok(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(template_ids)


def test_unreadable_adapter_is_409_and_missing_is_404(served):
    """Reading the format from the file's header must keep the statuses of a failed load."""
    client, _, _, adapter_dir = served
    junk = adapter_dir / "junk.safetensors"
    junk.write_bytes(b"not an adapter file")
    try:
        for path in ("/v1/completions", "/v1/chat/completions"):
            body = {"model": "junk", "prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
            r = client.post(path, json=body)
            assert r.status_code == 409 and "adapter 'junk' cannot be served" in r.json()["error"]["message"], r.text
    finally:
        junk.unlink()
    assert client.post("/v1/completions", json={"model": "junk", "prompt": PROMPT}).status_code == 404

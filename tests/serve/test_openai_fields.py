"""OpenAI request fields on /v1/chat/completions (docs/serving.md, "Endpoints" and "What generation supports"):
`max_completion_tokens` is accepted as `max_tokens` is, within --max-new-tokens; unknown OpenAI fields are
ignored, on the request and on its messages. An in-process app over the tiny Llama of conftest (no server process)."""

import pytest
import torch

MAX_NEW_TOKENS = 32
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def client(llama_dirs):
    from fastapi.testclient import TestClient

    from verakit.serve.app import create_app
    from verakit.serve.engine import Engine
    from verakit.serve.metrics import ServeMetrics
    from verakit.serve.options import ServeOptions

    torch.set_num_threads(1)
    model_dir, adapter_dir = llama_dirs
    options = ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1, max_wait_ms=0,
                           max_new_tokens=MAX_NEW_TOKENS)
    metrics = ServeMetrics(lambda: (0, 0, 0, 0, 0))
    engine = Engine(options, on_batch=metrics.observe_batch)
    try:
        with TestClient(create_app(engine, metrics, options)) as c:
            yield c
    finally:
        engine.close()


def _chat(client, status=200, **fields):
    r = client.post("/v1/chat/completions", json={"model": "g0", "messages": MESSAGES, "temperature": 0,
                                                  "raw": True, **fields})
    assert r.status_code == status, r.text
    return r.json()


def test_max_completion_tokens_bounds_the_answer_like_max_tokens(client):
    """max_completion_tokens: 3 gives the same 3-token greedy answer as max_tokens: 3, where the server's own
    default (--max-new-tokens 32) gives a longer one; over --max-new-tokens it is a 422 naming the field."""
    unbounded = _chat(client)
    assert unbounded["usage"]["completion_tokens"] > 3  # so a bound of 3 is visible in the answer

    by_new_name = _chat(client, max_completion_tokens=3)
    by_old_name = _chat(client, max_tokens=3)
    for answer in (by_new_name, by_old_name):
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["choices"][0]["finish_reason"] == "length"
    text = by_new_name["choices"][0]["message"]["content"]
    assert text == by_old_name["choices"][0]["message"]["content"]
    assert unbounded["choices"][0]["message"]["content"].startswith(text)

    refused = _chat(client, 422, max_completion_tokens=MAX_NEW_TOKENS + 1)
    assert "max_completion_tokens" in refused["error"]["message"]


def test_unknown_openai_fields_are_ignored(client):
    """Fields the server does not implement (`user`, penalties, `logit_bias`, `seed`, a message's `name`) are
    ignored: 200 and the same answer as without them, on chat and on /v1/completions."""
    plain = _chat(client, max_completion_tokens=3)
    extra = _chat(client, max_completion_tokens=3, user="x", presence_penalty=0, frequency_penalty=0.5,
                  logit_bias={"50": 1}, seed=7, messages=[{**MESSAGES[0], "name": "alice"}])
    assert extra["choices"][0]["message"] == plain["choices"][0]["message"]
    assert extra["usage"] == plain["usage"]

    def complete(**extra):
        r = client.post("/v1/completions", json={"model": "g0", "prompt": "hello world", "max_tokens": 3,
                                                 "temperature": 0, "raw": True, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    plain, extra = complete(), complete(user="x", presence_penalty=0, best_of=1, echo=False)
    assert extra["choices"][0]["text"] == plain["choices"][0]["text"] and extra["usage"] == plain["usage"]

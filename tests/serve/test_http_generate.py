"""A real `verakit serve` process (tiny Llama, no admin token) over real HTTP: OpenAI-compatible
completions and chat equal offline greedy generation per adapter under concurrency; SSE streaming; limits.

The completions here send `"raw": true` (the prompt's token ids are then just `tok(prompt)`); the default,
the prompt format each adapter was trained with, is tested in test_prompt_format.py."""

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from verakit import load_adapter


@pytest.fixture(scope="module")
def offline(llama_dirs):
    """offline(adapter, prompt_ids, max_new_tokens) -> greedy text of that prompt alone, adapter loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model_dir, adapter_dir = llama_dirs
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    models = {}

    def generate(adapter, ids, max_new_tokens):
        if adapter not in models:
            m = copy.deepcopy(base)
            if adapter is not None:
                load_adapter(m, adapter_dir / f"{adapter}.safetensors")
            models[adapter] = m
        x = torch.tensor([ids])
        with torch.no_grad():
            out = models[adapter].generate(x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        return tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)

    generate.tok = tok
    return generate


def _sse(response):
    events = [line[len("data: ") :] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_concurrent_completions_equal_offline_generation(generate_server, offline):
    url, tok = generate_server.url, offline.tok
    prompts = ["hello world", "The answer is", "x", "a b c d e f", "Once upon a time", "42"]
    bodies = [{"model": ["g0", "g1", "llama", "g2"][i % 4], "prompt": prompts[i % len(prompts)], "max_tokens": 6 + i % 5,
               "temperature": 0, "raw": True} for i in range(10)]
    barrier = threading.Barrier(len(bodies))

    def call(body):
        barrier.wait()
        return httpx.post(f"{url}/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(call, bodies))
    texts = set()
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "text_completion" and out["model"] == body["model"]
        choice = out["choices"][0]
        adapter = None if body["model"] == "llama" else body["model"]
        ids = tok(body["prompt"]).input_ids
        assert choice["text"] == offline(adapter, ids, body["max_tokens"])
        assert out["usage"]["prompt_tokens"] == len(ids)
        texts.add((body["prompt"], choice["text"]))
    assert len(texts) == len(bodies)  # adapters (and prompts) really change the outputs


def test_chat_completion_and_streaming_equal_offline(generate_server, offline):
    url, tok = generate_server.url, offline.tok
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
    expected = offline("g1", ids, 12)
    body = {"model": "g1", "messages": messages, "max_tokens": 12, "temperature": 0}
    out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected}

    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) > 3

    r = httpx.post(f"{url}/v1/completions", json={"model": "g0", "prompt": "hello", "max_tokens": 8, "temperature": 0,
                                                    "stream": True, "raw": True}, timeout=60)
    chunks = _sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == offline("g0", tok("hello").input_ids, 8)


def test_n_prompts_stop_and_sampling(generate_server, offline):
    url, tok = generate_server.url, offline.tok
    full = offline("g2", tok("abc").input_ids, 10)
    body = {"model": "g2", "prompt": ["abc", "zz"], "max_tokens": 10, "temperature": 0, "n": 2, "raw": True}
    out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] == full and texts[2] == texts[3] == offline("g2", tok("zz").input_ids, 10)

    stop = full[3:5]
    cut = full[: full.index(stop)]
    out = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "abc", "n": 1, "stop": [stop, "\u0001"]},
                     timeout=60).json()
    assert out["choices"][0] == {"index": 0, "text": cut, "finish_reason": "stop", "logprobs": None}

    sampled = httpx.post(f"{url}/v1/completions", json={"model": "g0", "prompt": "abc", "max_tokens": 8,
                                                         "temperature": 1.5, "top_p": 0.9, "n": 3}, timeout=60).json()
    assert len(sampled["choices"]) == 3 and sampled["usage"]["completion_tokens"] <= 24


def _error(r, status, *fragments):
    assert r.status_code == status, r.text
    for f in fragments:
        assert f in r.json()["error"]["message"]


def test_generation_errors_and_disabled_admin(generate_server, llama_dirs):
    url = generate_server.url
    post = lambda path, body: httpx.post(f"{url}{path}", json=body, timeout=30)  # noqa: E731
    _error(post("/v1/completions", {"model": "nope", "prompt": "x"}), 404, "'nope' not found")
    _error(post("/v1/completions", {"model": "nope", "prompt": "x", "stream": True}), 404, "'nope' not found")
    _error(post("/v1/completions", {"model": "g0", "prompt": "x", "max_tokens": 33}), 422, "max_tokens: Input should be less than or equal to 32")
    _error(post("/v1/completions", {"model": "g0", "prompt": "x", "n": 4}), 422, "n: Input should be less than or equal to 3")
    _error(post("/v1/completions", {"model": "g0", "prompt": "x" * 110, "max_tokens": 30, "raw": True}), 422, "exceed the context of 128")
    _error(post("/v1/completions", {"model": "g0", "prompt": "x", "temperature": 3}), 422, "temperature")
    _error(post("/v1/completions", {"model": "g0", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 422, "stop")
    _error(post("/v1/completions", {"model": "g0", "prompt": ""}), 422, "prompt")
    _error(post("/v1/chat/completions", {"model": "g0", "messages": []}), 422, "messages")
    _error(post("/v1/chat/completions", {"model": "g0", "messages": [{"role": "robot", "content": "x"}]}), 422, "role")
    _error(post("/v1/classify", {"inputs": ["x"]}), 400, "needs a classify model")
    data = (llama_dirs[1] / "g0.safetensors").read_bytes()
    _error(httpx.post(f"{url}/v1/adapters", params={"name": "new"}, content=data), 403, "disabled")
    _error(httpx.delete(f"{url}/v1/adapters/g0"), 403, "disabled")
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert ids == ["llama", "g0", "g1", "g2"] and generate_server.alive()

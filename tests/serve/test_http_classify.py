"""A real `verakit serve` process (tiny BERT classifier, capacity 2 for 4+ adapters) over real HTTP:
answers equal offline single-adapter answers under concurrency, every error case, metrics."""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from serve.cases import BERT_LABELS, make_tokenizer, tiny_llama, trained_adapter
from verakit import VeraConfig, load_adapter
from verakit.fileformat import write_adapter

TEXTS = ["a fine film", "dull and long", "who knows", "bright, brisk, brave", "not my cup of tea", "meh",
         "the cast shines", "x"]


@pytest.fixture(scope="module")
def offline(bert_dirs):
    """offline(adapter, input) -> probs of that one input alone, adapter loaded normally (None: base)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    model_dir, adapter_dir = bert_dirs
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    models = {}

    def probs(adapter, text, path=None):
        key = (adapter, str(path))
        if key not in models:
            m = copy.deepcopy(base)
            if adapter is not None:
                load_adapter(m, path or adapter_dir / f"{adapter}.safetensors")
            models[key] = m
        enc = tok(*([text] if isinstance(text, str) else text), return_tensors="pt")
        with torch.no_grad():
            return models[key](**enc).logits[0].softmax(-1)

    return probs


def _metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_concurrent_mixed_adapters_equal_offline_answers_and_metrics(classify_server, offline):
    url = classify_server.url
    before = _metrics(url)
    requests = []
    for i in range(16):
        adapter = [None, "a0", "a1", "a2", "a3"][i % 5]
        inputs = [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]
        if i % 4 == 0:
            inputs.append(["first sentence", "second one"])
        requests.append({"adapter": adapter, "inputs": inputs})
    barrier = threading.Barrier(len(requests))

    def call(body):
        barrier.wait()
        return httpx.post(f"{url}/v1/classify", json=body, timeout=60)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(call, requests))
    for body, r in zip(requests, responses, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["adapter"] == body["adapter"] and out["label_names"] == BERT_LABELS
        for text, probs, label in zip(body["inputs"], out["probs"], out["labels"], strict=True):
            expected = offline(body["adapter"], text)
            torch.testing.assert_close(torch.tensor(probs), expected, atol=1e-5, rtol=0)
            assert label == BERT_LABELS[int(expected.argmax())]

    after = _metrics(url)
    ok = ("verakit_requests_total", {"endpoint": "/v1/classify", "status": "200"})
    assert _get(after, ok[0], **ok[1]) - _get(before, ok[0], **ok[1]) == 16
    assert _get(after, "verakit_request_seconds_count", **ok[1]) - _get(before, "verakit_request_seconds_count", **ok[1]) == 16
    batches = _get(after, "verakit_batch_rows_count") - _get(before, "verakit_batch_rows_count")
    rows = _get(after, "verakit_batch_rows_sum") - _get(before, "verakit_batch_rows_sum")
    assert rows == sum(len(b["inputs"]) for b in requests) and 1 <= batches < 16  # requests were merged
    single = _get(after, "verakit_batch_adapters_bucket", le="1.0") - _get(before, "verakit_batch_adapters_bucket", le="1.0")
    assert single < batches  # at least one forward mixed several adapters
    assert _get(after, "verakit_resident_adapters") <= 2 == _get(after, "verakit_bank_capacity")
    assert _get(after, "verakit_adapter_evictions_total") > _get(before, "verakit_adapter_evictions_total")
    assert _get(after, "verakit_adapter_loads_total") >= 4


def _post(server, body, **kw):
    return httpx.post(f"{server.url}/v1/classify", json=body, timeout=30, **kw)


def _error(r, status, *fragments):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status
    for f in fragments:
        assert f in err["message"], err["message"]


def test_bad_requests_get_json_4xx_naming_the_problem(classify_server):
    s = classify_server
    _error(_post(s, {"adapter": "nope", "inputs": ["x"]}), 404, "'nope' not found")
    _error(_post(s, {"adapter": "../a0", "inputs": ["x"]}), 422, "invalid adapter name '../a0'")
    _error(_post(s, {"adapter": "a0"}), 422, "inputs", "Field required")
    _error(_post(s, {"adapter": "a0", "inputs": []}), 422, "inputs")
    _error(_post(s, {"adapter": "a0", "inputs": [["only one"]]}), 422, "inputs.0")
    _error(_post(s, {"adapter": "a0", "inputs": ["x"] * 9}), 422, "inputs: List should have at most 8 items", "not 9")
    _error(_post(s, {"adapter": "a0", "inputs": ["ok", "y" * 80]}), 422, "inputs[1] has 82 tokens; the limit is 64")
    _error(_post(s, {"adapter": "a0", "inputs": ["x"], "extra": 1}), 422, "extra")
    _error(httpx.post(f"{s.url}/v1/classify", content=b'{"inputs": ["x"', headers={"content-type": "application/json"}),
           422, "body is not valid JSON (at character 15: ")
    _error(httpx.post(f"{s.url}/v1/classify", content=b'{"inputs": ["x"]}'), 422, "Content-Type: application/json")
    _error(_post(s, {"adapter": "a0", "inputs": ["z" * 25000]}), 413, "exceeds the limit of 20000")

    def chunks():  # no Content-Length: counted while streaming in
        for _ in range(30):
            yield b"x" * 1000

    _error(httpx.post(f"{s.url}/v1/classify", content=chunks(), headers={"content-type": "application/json"}),
           413, "exceeds the limit of 20000")
    _error(httpx.post(f"{s.url}/v1/completions", json={"model": "a0", "prompt": "x"}), 400, "needs a generate model")
    _error(httpx.get(f"{s.url}/v1/nothing"), 404, "Not Found")
    assert httpx.get(f"{s.url}/health").json()["status"] == "ok" and s.alive()


def test_broken_adapter_files_fail_only_their_requests(classify_server, bert_dirs, offline):
    s, (_, adapter_dir) = classify_server, bert_dirs
    good = (adapter_dir / "a0.safetensors").read_bytes()
    (adapter_dir / "broken.safetensors").write_bytes(good[: len(good) // 2])
    base = tiny_llama(102)
    write_adapter(trained_adapter(base, VeraConfig(r=8), 0), adapter_dir / "alien.safetensors")
    from transformers import AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(bert_dirs[0])
    write_adapter(trained_adapter(bert, VeraConfig(r=8, seed=5), 0), adapter_dir / "reseeded.safetensors")
    try:
        with ThreadPoolExecutor(4) as pool:
            bodies = [{"adapter": a, "inputs": ["a fine film"]} for a in ("broken", "a0", "alien", "reseeded")]
            r_broken, r_ok, r_alien, r_seed = pool.map(lambda b: _post(s, b), bodies)
        _error(r_broken, 409, "adapter 'broken' cannot be served", "truncated")
        _error(r_alien, 409, "adapter 'alien' cannot be served", "model_type 'llama', bank 'bert'")
        _error(r_seed, 409, "seed=0 but the adapter 5")
        assert r_ok.status_code == 200
        torch.testing.assert_close(torch.tensor(r_ok.json()["probs"][0]), offline("a0", "a fine film"), atol=1e-5, rtol=0)
        assert s.alive() and _post(s, {"adapter": "a1", "inputs": ["x"]}).status_code == 200
        assert _get(_metrics(s.url), "verakit_adapter_load_failures_total") >= 3
    finally:
        for n in ("broken", "alien", "reseeded"):
            (adapter_dir / f"{n}.safetensors").unlink()


def test_models_lists_base_and_adapters(classify_server):
    data = httpx.get(f"{classify_server.url}/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "bert" and data[0]["kind"] == "base"
    assert {"a0", "a1", "a2", "a3"} <= set(ids)
    assert sum(m["resident"] for m in data if m["kind"] == "adapter") <= 2


def test_base_model_by_null_or_its_name(classify_server, offline):
    for adapter in (None, "bert"):
        r = _post(classify_server, {"adapter": adapter, "inputs": ["meh"]})
        torch.testing.assert_close(torch.tensor(r.json()["probs"][0]), offline(None, "meh"), atol=1e-5, rtol=0)


def test_tokenizer_of_fixture_matches_server_model(bert_dirs):
    """Guards the fixtures: the server's tokenizer is the byte-exact test tokenizer."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(bert_dirs[0])
    assert saved("ab", "c")["input_ids"] == make_tokenizer("bert")("ab", "c")["input_ids"]

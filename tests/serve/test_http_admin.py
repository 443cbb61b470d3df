"""Admin endpoints of a real server: bearer auth, validated atomic uploads, path traversal, delete."""

import dataclasses
import os

import httpx
import pytest
import torch

from serve.cases import TOKEN, dvora_adapter, tiny_llama, trained_adapter
from verakit import VeraConfig, load_adapter
from verakit.fileformat import write_adapter

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bert(bert_dirs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    return (AutoModelForSequenceClassification.from_pretrained(bert_dirs[0]).eval(),
            AutoTokenizer.from_pretrained(bert_dirs[0]))


def _adapter_bytes(tmp_path, model, which, **cfg):
    path = tmp_path / f"src{which}.safetensors"
    write_adapter(trained_adapter(model, VeraConfig(**{"r": 8, **cfg}), which), path)
    return path, path.read_bytes()


def _probs(server, adapter, text):
    r = httpx.post(f"{server.url}/v1/classify", json={"adapter": adapter, "inputs": [text]}, timeout=30)
    assert r.status_code == 200, r.text
    return torch.tensor(r.json()["probs"][0])


def _offline(bert, path, text):
    import copy

    model, tok = bert
    m = load_adapter(copy.deepcopy(model), path)
    with torch.no_grad():
        return m(**tok(text, return_tensors="pt")).logits[0].softmax(-1)


def _names(server):
    return {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}


def test_upload_use_overwrite_delete(classify_server, bert_dirs, bert, tmp_path):
    s, adapter_dir = classify_server, bert_dirs[1]
    path, data = _adapter_bytes(tmp_path, bert[0], 11)
    up = lambda name, payload, **params: httpx.post(  # noqa: E731
        f"{s.url}/v1/adapters", params={"name": name, **params}, content=payload, headers=AUTH, timeout=30)
    r = up("fresh", data)
    assert r.status_code == 201 and r.json()["r"] == 8 and r.json()["labels"] == ["neg", "neu", "pos"]
    assert "fresh" in _names(s)
    torch.testing.assert_close(_probs(s, "fresh", "a fine film"), _offline(bert, path, "a fine film"), atol=1e-5, rtol=0)

    path2, data2 = _adapter_bytes(tmp_path, bert[0], 12)
    r = up("fresh", data2)
    assert r.status_code == 409 and "already exists" in r.json()["error"]["message"]
    assert up("fresh", data2, overwrite="true").status_code == 201
    # the resident copy was dropped, so the new file answers from now on
    torch.testing.assert_close(_probs(s, "fresh", "a fine film"), _offline(bert, path2, "a fine film"), atol=1e-5, rtol=0)

    r = httpx.delete(f"{s.url}/v1/adapters/fresh", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"deleted": "fresh"}
    assert not (adapter_dir / "fresh.safetensors").exists() and "fresh" not in _names(s)
    r = httpx.post(f"{s.url}/v1/classify", json={"adapter": "fresh", "inputs": ["x"]})
    assert r.status_code == 404 and "'fresh' not found" in r.json()["error"]["message"]
    assert httpx.delete(f"{s.url}/v1/adapters/fresh", headers=AUTH).status_code == 404


def test_bad_uploads_never_become_visible(classify_server, bert_dirs, bert, tmp_path):
    s, adapter_dir = classify_server, bert_dirs[1]
    before = sorted(os.listdir(adapter_dir))
    _, data = _adapter_bytes(tmp_path, bert[0], 13)
    _, alien = _adapter_bytes(tmp_path, tiny_llama(102), 14)
    _, reseeded = _adapter_bytes(tmp_path, bert[0], 15, seed=3)
    _, high_rank = _adapter_bytes(tmp_path, bert[0], 16, r=64)
    cases = [
        (data[:100], 422, "upload 'junk': truncated"),
        (b"", 422, "upload 'junk': not a safetensors file"),
        (alien, 409, "model_type 'llama', bank 'bert'"),
        (reseeded, 409, "seed=0 but the adapter 3"),
        (high_rank, 409, "adapter rank 64 exceeds the bank's rank 8"),
        (data + b"\0" * 200_000, 413, "exceeds the limit of 200000"),
    ]
    for payload, status, message in cases:
        r = httpx.post(f"{s.url}/v1/adapters", params={"name": "junk"}, content=payload, headers=AUTH, timeout=30)
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"]
    assert sorted(os.listdir(adapter_dir)) == before and "junk" not in _names(s)


def test_auth_is_required(classify_server, bert_dirs):
    s = classify_server
    data = (bert_dirs[1] / "a0.safetensors").read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.post(f"{s.url}/v1/adapters", params={"name": "sneaky"}, content=data, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.delete(f"{s.url}/v1/adapters/a0", headers=headers).status_code == 401
    assert (bert_dirs[1] / "a0.safetensors").exists() and not (bert_dirs[1] / "sneaky.safetensors").exists()


def test_path_traversal_is_refused(classify_server, bert_dirs, tmp_path):
    s, (model_dir, adapter_dir) = classify_server, bert_dirs
    data = (adapter_dir / "a0.safetensors").read_bytes()
    for name in ("../evil", "..", ".hidden", "a/b", "/etc/passwd", "x" * 129, "..%2Fevil"):
        r = httpx.post(f"{s.url}/v1/adapters", params={"name": name}, content=data, headers=AUTH)
        assert r.status_code == 422 and "invalid adapter name" in r.json()["error"]["message"], (name, r.text)
    assert not (adapter_dir.parent / "evil.safetensors").exists()
    # encoded slashes and dots in the path never reach a file outside the adapter directory
    for raw in ("/v1/adapters/..%2Fbert%2Fconfig", "/v1/adapters/%2e%2e", "/v1/adapters/.hidden"):
        r = httpx.request("DELETE", httpx.URL(f"{s.url}{raw}"), headers=AUTH)
        assert r.status_code in (404, 422), (raw, r.text)
    r = httpx.post(f"{s.url}/v1/classify", json={"adapter": "../bert/model", "inputs": ["x"]})
    assert r.status_code == 422
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()


def test_uploaded_dvora_adapter_is_served_beside_plain_ones(classify_server, bert, tmp_path):
    """A DVoRA file (format version 3, with vera_m) uploaded to a server whose bank holds plain VeRA adapters
    answers as the file loaded offline; the magnitude is not ignored (the same vectors without it differ)."""
    s = classify_server
    ad = dvora_adapter(bert[0], VeraConfig(r=8, magnitude=True), 21)
    path = tmp_path / "dv.safetensors"
    write_adapter(ad, path)
    r = httpx.post(f"{s.url}/v1/adapters", params={"name": "dvora"}, content=path.read_bytes(), headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    try:
        got = _probs(s, "dvora", "a fine film")
        torch.testing.assert_close(got, _offline(bert, path, "a fine film"), atol=1e-5, rtol=0)
        plain = tmp_path / "plain.safetensors"
        write_adapter(dataclasses.replace(ad, config=dataclasses.replace(ad.config, magnitude=False), m={}), plain)
        assert (got - _offline(bert, plain, "a fine film")).abs().max() > 1e-3
    finally:
        httpx.delete(f"{s.url}/v1/adapters/dvora", headers=AUTH)

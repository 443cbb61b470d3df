"""The serving bank refuses an adapter trained on another checkpoint of the same architecture (its recorded
base-weight samples differ from the served base), as load_adapter does; --no-base-check serves it anyway."""

from __future__ import annotations

import copy
import dataclasses

import httpx
import pytest
import torch

from helpers import perturb_weights
from serve.cases import TOKEN, Server, tiny_bert, trained_adapter
from verakit import BaseMismatchError, VeraConfig, attach
from verakit.fileformat import read_adapter, write_adapter
from verakit.serve.bank import AdapterBank

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def base():
    return tiny_bert(99)


def _bank(model, **kw):
    return AdapterBank(attach(copy.deepcopy(model), VeraConfig(r=8)), capacity=4, **kw)


def test_adapter_of_another_checkpoint_is_refused_and_the_bank_unchanged(base, tmp_path, monkeypatch):
    from verakit.serve import bank as bank_module

    reads = []
    real = bank_module.read_samples
    monkeypatch.setattr(bank_module, "read_samples", lambda *a: reads.append(a[0]) or real(*a))
    bank = _bank(base)
    own = tmp_path / "own.safetensors"
    write_adapter(trained_adapter(base, VeraConfig(r=8), 0), own)
    bank.add("own", own)
    first = len(reads)
    assert first > 0 and len(set(reads)) == first  # each adapted module's base samples read once
    other = tmp_path / "other.safetensors"
    write_adapter(trained_adapter(perturb_weights(copy.deepcopy(base), 0.02), VeraConfig(r=8), 1), other)
    with pytest.raises(BaseMismatchError, match=r"other.safetensors: base model mismatch: .*relative RMS difference "
                                                r".*--no-base-check"):
        bank.add("other", other)
    assert bank.names() == ["own"]
    bank.add("again", own)  # another adapter of the right base: the samples read before are reused
    assert len(reads) == first and bank.names() == ["own", "again"]
    off = _bank(base, check_base=False)
    off.add("other", other)
    assert off.names() == ["other"]


def test_casts_of_the_served_base_and_files_without_samples_are_served(base, tmp_path):
    path = tmp_path / "a.safetensors"
    write_adapter(trained_adapter(base, VeraConfig(r=8), 0), path)
    _bank(copy.deepcopy(base).to(torch.bfloat16)).add("a", path)  # a bf16 server over the fp32-trained base
    bare = read_adapter(path)

    moved = _bank(perturb_weights(copy.deepcopy(base), 0.02))
    with pytest.raises(BaseMismatchError):
        moved.add("a", bare)
    moved.add("old", dataclasses.replace(bare, samples=None))  # an older file: names and shapes only
    assert moved.names() == ["old"]


@pytest.mark.parametrize("check", [True, False])
def test_upload_of_a_mismatched_adapter(check, bert_dirs, tmp_path):
    """A real `verakit serve`: the upload answers 409 naming the mismatch and stores nothing; started with
    --no-base-check it answers 201 and serves the adapter."""
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = bert_dirs
    served = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    path = tmp_path / "m.safetensors"
    write_adapter(trained_adapter(perturb_weights(copy.deepcopy(served), 0.02), VeraConfig(r=8), 3), path)
    store = tmp_path / "adapters"
    store.mkdir()
    server = Server(["--model", str(model_dir), "--adapters", str(store), "--admin-token", TOKEN,
                     *([] if check else ["--no-base-check"])], tmp_path / "serve.log")
    try:
        r = httpx.post(f"{server.url}/v1/adapters", params={"name": "m"}, content=path.read_bytes(), headers=AUTH,
                       timeout=60)
        if check:
            assert r.status_code == 409 and "base model mismatch" in r.json()["error"]["message"], r.text
            assert not (store / "m.safetensors").exists()
        else:
            assert r.status_code == 201, r.text
            c = httpx.post(f"{server.url}/v1/classify", json={"adapter": "m", "inputs": ["a fine film"]}, timeout=60)
            assert c.status_code == 200, c.text
    finally:
        server.stop()

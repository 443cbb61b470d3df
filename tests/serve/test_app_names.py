"""Adapter names on a server: an upload under the base model's name is refused, since requests naming it are
answered by the base model (the name the OpenAI `model` field gives it) and the adapter could never be used."""

from __future__ import annotations

from serve.cases import TOKEN
from serve.test_base_head import _client


def test_an_upload_named_like_the_base_model_is_refused(bert_dirs):
    """It was stored (201) and listed by /v1/models, and every request for it answered as the base model."""
    from verakit.serve.options import ServeOptions

    model_dir, adapter_dir = bert_dirs
    data = (adapter_dir / "a0.safetensors").read_bytes()
    engine, client = _client(ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1, max_wait_ms=0,
                                          admin_token=TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with client:
            r = client.post(f"/v1/adapters?name={model_dir.name}", content=data, headers=auth)
            ok = client.post("/v1/adapters?name=a0-copy", content=data, headers=auth)
            client.delete("/v1/adapters/a0-copy", headers=auth)
    finally:
        engine.close()
    assert r.status_code == 409, r.text
    assert r.json()["error"]["message"] == (f"'{model_dir.name}' is the base model's name: requests naming it get the "
                                            "base model, never this adapter; upload it under another name")
    assert not (adapter_dir / f"{model_dir.name}.safetensors").exists()
    assert ok.status_code == 201


def test_an_adapter_file_named_like_the_base_model_is_named_at_start_up(bert_dirs, tmp_path, caplog):
    """A file already on disk under the base model's name can never be served: the start-up log says so."""
    import logging
    import shutil

    from verakit.serve.engine import Engine
    from verakit.serve.options import ServeOptions

    model_dir, adapter_dir = bert_dirs
    store = tmp_path / "adapters"
    store.mkdir()
    shutil.copy(adapter_dir / "a0.safetensors", store / f"{model_dir.name}.safetensors")
    shutil.copy(adapter_dir / "a0.safetensors", store / "a0.safetensors")
    with caplog.at_level(logging.WARNING, logger="verakit.serve.engine"):
        Engine(ServeOptions(model=str(model_dir), adapters=str(store), threads=1)).close()
        shadowed = [r.getMessage() for r in caplog.records if "has the base model's name" in r.getMessage()]
        caplog.clear()
        Engine(ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1)).close()
        assert not [r for r in caplog.records if "has the base model's name" in r.getMessage()]
    assert shadowed == [f"adapter file {model_dir.name}.safetensors has the base model's name '{model_dir.name}': "
                        f"requests naming '{model_dir.name}' are answered by the base model, never by that adapter; "
                        "rename the file to serve it"]


def test_adapters_the_bank_cannot_hold_are_named_at_start_up(bert_dirs, tmp_path, caplog):
    """The start-up warning said only '1 of 3 adapters ... will answer 409': which one was left to guess."""
    import logging
    import shutil

    from transformers import AutoModelForSequenceClassification

    from serve.cases import trained_adapter
    from verakit import VeraConfig
    from verakit.fileformat import write_adapter
    from verakit.serve.engine import Engine
    from verakit.serve.options import ServeOptions

    model_dir, adapter_dir = bert_dirs
    store = tmp_path / "adapters"
    store.mkdir()
    for name in ("a0", "a2"):
        shutil.copy(adapter_dir / f"{name}.safetensors", store / f"{name}.safetensors")
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    write_adapter(trained_adapter(base, VeraConfig(r=8, seed=3), 15), store / "reseeded.safetensors")
    with caplog.at_level(logging.WARNING, logger="verakit.serve.engine"):
        Engine(ServeOptions(model=str(model_dir), adapters=str(store), threads=1)).close()
    assert "1 of 3 adapters do not share the bank's projection/base and will answer 409: reseeded" in caplog.text

"""One adapter directory, several engines (what Ray Serve replicas are): changes by one reach the others.

No Ray here: two Engines in one process over one directory stand for two replicas, so the store's
generation token and the engine's refresh are tested in seconds.
"""

from __future__ import annotations

import shutil

import pytest

from verakit.serve.engine import Engine, UnknownAdapter
from verakit.serve.options import ServeOptions
from verakit.serve.store import AdapterStore

TEXTS = ["a short text", "another one"]


def test_generation_moves_on_every_save_and_delete_and_signature_tracks_the_file(bert_dirs, tmp_path):
    _, adapters = bert_dirs
    store = AdapterStore(tmp_path)
    assert store.generation() == "" and store.signature("a0") is None
    data = (adapters / "a0.safetensors").read_bytes()
    store.save("a0", data, lambda a: None)
    first, sig = store.generation(), store.signature("a0")
    assert first != "" and sig is not None and sig[1] == len(data)
    store.save("a0", data, lambda a: None, overwrite=True)  # same bytes: still a new file and a new token
    assert store.generation() != first and store.signature("a0") != sig
    second = store.generation()
    store.delete("a0")
    assert store.generation() not in ("", first, second) and store.signature("a0") is None
    assert store.names() == []  # the token file is hidden, never an adapter


@pytest.fixture
def two_replicas(bert_dirs, tmp_path):
    model_dir, adapters = bert_dirs
    shared = tmp_path / "adapters"
    shutil.copytree(adapters, shared)
    options = ServeOptions(model=str(model_dir), adapters=str(shared), threads=1, max_wait_ms=0)
    a, b = Engine(options), Engine(options)
    yield a, b, adapters
    a.close()
    b.close()


def probs(engine: Engine, name: str) -> list[list[float]]:
    return engine.classify(engine.adapter_ref(name), engine.encode_inputs(TEXTS)).result(timeout=30).probs


def test_overwrite_by_one_engine_reaches_the_others_resident_copy(two_replicas):
    a, b, originals = two_replicas
    old = probs(b, "a0")
    assert "a0" in b.bank  # the bank, not the `resident` snapshot: that is refreshed after the futures resolve
    a.upload("a0", (originals / "a2.safetensors").read_bytes(), overwrite=True)
    new = probs(a, "a0")
    assert new != old
    assert probs(b, "a0") == new  # without the refresh, b would keep answering with its resident old a0
    assert b.stale_dropped == 1


def test_delete_by_one_engine_is_refused_and_dropped_by_the_other(two_replicas):
    a, b, _ = two_replicas
    probs(b, "a1")
    probs(b, "a3")
    a.delete("a1")
    with pytest.raises(UnknownAdapter, match="'a1' not found"):
        b.adapter_ref("a1")
    probs(b, "a3")  # the next batch refreshes: a1's copy goes, a3 (unchanged) stays
    assert "a1" not in b.bank and "a3" in b.bank and b.stale_dropped == 1


def test_a_request_admitted_before_a_delete_is_not_served_from_the_stale_copy(two_replicas):
    """The window between a request's existence check and its batch: the refresh before the batch sees the
    delete, drops the copy, and the reload finds no file: 404, not an answer from a deleted adapter."""
    a, b, _ = two_replicas
    probs(b, "a2")
    ref, encodings = b.adapter_ref("a2"), b.encode_inputs(TEXTS)  # admitted
    a.delete("a2")
    with pytest.raises(UnknownAdapter, match="'a2' not found"):
        b.classify(ref, encodings).result(timeout=30)

"""Classifying without an adapter: refused (409 naming the untrained head) when the base folder has no trained
classification head, answered when it has one (a merged folder); and the `minilm` alias, resolved by
verakit.models.resolve_model like everywhere else, is such a head-less base."""

from dataclasses import replace

import pytest
import torch

from serve.cases import BERT_LABELS, make_tokenizer, tiny_bert, trained_adapter
from verakit import VeraConfig
from verakit.fileformat import write_adapter


def _client(options):
    """(engine, TestClient) over an in-process Engine; close the engine when done."""
    from fastapi.testclient import TestClient

    from verakit.serve.app import create_app
    from verakit.serve.engine import Engine
    from verakit.serve.metrics import ServeMetrics

    metrics = ServeMetrics(lambda: (0, 0, 0, 0, 0))
    engine = Engine(options, on_batch=metrics.observe_batch)
    return engine, TestClient(create_app(engine, metrics, options))


@pytest.fixture(scope="module")
def headless_dirs(tmp_path_factory):
    """A tiny BertModel folder (encoder + pooler, no classifier weights) and one adapter with a trained head."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("headless")
    tok = make_tokenizer("bert")
    clf = tiny_bert(len(tok))
    clf.bert.save_pretrained(root / "encoder")  # what a sentence-embedding checkpoint such as MiniLM looks like
    tok.save_pretrained(root / "encoder")
    (root / "adapters").mkdir()
    adapter = trained_adapter(clf, VeraConfig(r=4), seed=0)
    write_adapter(replace(adapter, extra={"labels": BERT_LABELS}), root / "adapters" / "a0.safetensors")
    return root / "encoder", root / "adapters"


def test_untrained_base_head_is_refused_but_adapters_answer(headless_dirs):
    from verakit.serve.options import ServeOptions

    model_dir, adapter_dir = headless_dirs
    engine, client = _client(ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1, max_wait_ms=0))
    try:
        with client:
            ok = client.post("/v1/classify", json={"adapter": "a0", "inputs": ["a fine film"]})
            assert ok.status_code == 200 and ok.json()["label_names"] == BERT_LABELS
            for adapter in (None, "encoder"):  # null, or the base model by its name
                r = client.post("/v1/classify", json={"adapter": adapter, "inputs": ["a fine film"]})
                assert r.status_code == 409, r.text
                error = r.json()["error"]
                assert error["type"] == "untrained_head"
                assert "'encoder' has no trained classification head" in error["message"]
                assert "classifier.weight" in error["message"] and "name an adapter" in error["message"]
    finally:
        engine.close()


def test_trained_base_head_answers_with_adapter_null(bert_dirs):
    """A folder whose head is trained (here saved with it, as `verakit merge` writes one) answers as the base model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from verakit.serve.options import ServeOptions

    model_dir, adapter_dir = bert_dirs
    engine, client = _client(ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1, max_wait_ms=0))
    try:
        with client:
            r = client.post("/v1/classify", json={"adapter": None, "inputs": ["meh"]})
        assert r.status_code == 200, r.text
        assert engine.untrained == ()
    finally:
        engine.close()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        expected = AutoModelForSequenceClassification.from_pretrained(model_dir)(**tok("meh", return_tensors="pt"))
    torch.testing.assert_close(torch.tensor(r.json()["probs"][0]), expected.logits[0].softmax(-1), atol=1e-5, rtol=0)


def test_minilm_alias_is_a_classifier_without_a_trained_head(minilm_path, tmp_path):
    from verakit.serve.engine import Engine, UntrainedHead
    from verakit.serve.options import ServeOptions

    engine = Engine(ServeOptions(model="minilm", adapters=str(tmp_path), threads=1, max_wait_ms=0))
    try:
        assert engine.task == "classify" and engine.base_name == "minilm"
        assert engine.model.config._name_or_path == minilm_path  # what resolve_model("minilm", ...) gives
        assert engine.untrained == ("classifier.bias", "classifier.weight")
        with pytest.raises(UntrainedHead, match="'minilm' has no trained classification head"):
            engine.classify(None, engine.encode_inputs(["a fine film"]))
    finally:
        engine.close()

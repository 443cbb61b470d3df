"""Label names on /v1/classify: each adapter answers with the labels it was trained with, and a base folder
with a trained head of its own (a merged folder) with its own, whatever the adapters beside it record."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from serve.cases import BERT_LABELS, make_tokenizer, tiny_bert, trained_adapter
from serve.test_base_head import _client
from verakit import VeraConfig
from verakit.fileformat import write_adapter

OTHER_TASK = ["contradiction", "entailment", "neutral"]  # an adapter of another 3-class task


@pytest.fixture(scope="module")
def merged_base_dirs(tmp_path_factory):
    """A classifier folder with a trained head labelled BERT_LABELS, and adapters recording other labels."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("labels")
    tok = make_tokenizer("bert")
    base = tiny_bert(len(tok))
    base.save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    (root / "adapters").mkdir()
    for i, name in enumerate(("nli", "nli2")):
        adapter = trained_adapter(base, VeraConfig(r=4), seed=i)
        write_adapter(replace(adapter, extra={"labels": OTHER_TASK}), root / "adapters" / f"{name}.safetensors")
    return root / "merged", root / "adapters"


def test_the_base_head_keeps_its_own_label_names(merged_base_dirs):
    """The bank is built with the adapters' label names; the base's own head answered under them too
    ("contradiction" for its "neg"), a relabelled answer with status 200."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from verakit.serve.options import ServeOptions

    model_dir, adapter_dir = merged_base_dirs
    engine, client = _client(ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1, max_wait_ms=0))
    try:
        with client:
            base = client.post("/v1/classify", json={"adapter": None, "inputs": ["meh", "a fine film"]}).json()
            nli = client.post("/v1/classify", json={"adapter": "nli", "inputs": ["meh"]}).json()
    finally:
        engine.close()
    assert base["label_names"] == BERT_LABELS and nli["label_names"] == OTHER_TASK
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(model_dir)(
            **tok(["meh", "a fine film"], padding=True, return_tensors="pt")).logits
    assert base["labels"] == [BERT_LABELS[k] for k in logits.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor(base["probs"]), logits.softmax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("base", ["encoder", "classifier"])
def test_a_regression_adapter_answers_its_scores(tmp_path, base):
    """An STS-B / csv-scores adapter records no label names (`is_regression`): the bank's head was built with
    two outputs, and every regression adapter answered 409 ("the bank's head has (2,)"). Over a base whose
    trained head has three outputs, the start-up was a RuntimeError traceback (mismatched sizes); that head is
    now replaced, and the base alone refused as untrained."""
    from transformers import BertForSequenceClassification

    from verakit.fileformat import load_adapter
    from verakit.serve.options import ServeOptions

    torch.set_num_threads(1)
    tok = make_tokenizer("bert")
    clf = tiny_bert(len(tok))
    clf.bert.save_pretrained(tmp_path / "encoder")  # a head-less base, as MiniLM
    tok.save_pretrained(tmp_path / "encoder")
    if base == "classifier":  # the same encoder with a trained 3-label head
        clf.save_pretrained(tmp_path / "classifier")
        tok.save_pretrained(tmp_path / "classifier")
    torch.manual_seed(1)
    scorer = BertForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=1).eval()
    adapter = trained_adapter(scorer, VeraConfig(r=4), seed=0)
    (tmp_path / "adapters").mkdir()
    write_adapter(replace(adapter, extra={"labels": [], "is_regression": True}), tmp_path / "adapters" / "sts.safetensors")
    engine, client = _client(ServeOptions(model=str(tmp_path / base), adapters=str(tmp_path / "adapters"),
                                          threads=1, max_wait_ms=0))
    try:
        with client:
            r = client.post("/v1/classify", json={"adapter": "sts", "inputs": ["meh", "a fine film"]})
            alone = client.post("/v1/classify", json={"adapter": None, "inputs": ["meh"]})
    finally:
        engine.close()
    assert engine.untrained == ("classifier.bias", "classifier.weight") and alone.status_code == 409
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label_names"] == ["score"] and body["labels"] == [] and body["probs"] == []
    load_adapter(scorer, tmp_path / "adapters" / "sts.safetensors")
    with torch.no_grad():
        expected = scorer(**tok(["meh", "a fine film"], padding=True, return_tensors="pt")).logits[:, 0]
    torch.testing.assert_close(torch.tensor(body["scores"]), expected, atol=1e-5, rtol=0)

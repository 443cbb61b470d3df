"""/v1/classify cuts an input where the adapter was trained and evaluated (its recorded max_length), as
training and `verakit eval` cut it, so the server answers what the adapter was measured on."""

from __future__ import annotations

from dataclasses import replace

import torch

from serve.cases import BERT_LABELS, make_tokenizer, tiny_bert, trained_adapter
from serve.test_base_head import _client
from verakit import VeraConfig, load_adapter
from verakit.fileformat import read_adapter, write_adapter

LONG = "a film that goes on and on, then ends well"  # 42 characters: one token each
PAIR = ["thin plot, slow start", "fine acting"]


def _expected(model_dir, adapter_path, inputs, max_length):
    """Probabilities of the adapter loaded by hand, inputs tokenized as training does (cut at max_length)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_adapter(AutoModelForSequenceClassification.from_pretrained(model_dir), adapter_path).eval()
    rows = []
    for x in inputs:
        a, b = (x, None) if isinstance(x, str) else x
        cut = {"truncation": True, "max_length": max_length} if max_length else {}
        enc = tok(a, b, return_tensors="pt", **cut)
        with torch.no_grad():
            rows.append(model(**enc).logits.softmax(-1)[0])
    return torch.stack(rows)


def _served(tmp_path, extras):
    """(engine, client) over a tiny BERT and one adapter (the same vectors) per {name: run info}."""
    from verakit.serve.options import ServeOptions

    torch.set_num_threads(1)
    tok = make_tokenizer("bert")
    base = tiny_bert(len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "adapters").mkdir()
    adapter = trained_adapter(base, VeraConfig(r=4), seed=0)
    for name, extra in extras.items():
        write_adapter(replace(adapter, extra={"labels": BERT_LABELS, **extra}), tmp_path / "adapters" / f"{name}.safetensors")
    return _client(ServeOptions(model=str(tmp_path / "base"), adapters=str(tmp_path / "adapters"), threads=1,
                                max_wait_ms=0))


def test_inputs_are_cut_at_the_adapters_trained_length(tmp_path):
    inputs = [LONG, PAIR, "ok"]
    engine, client = _served(tmp_path, {"short": {"max_length": 12}, "uncut": {}})
    try:
        with client:
            short = client.post("/v1/classify", json={"adapter": "short", "inputs": inputs}).json()
            uncut = client.post("/v1/classify", json={"adapter": "uncut", "inputs": inputs}).json()
    finally:
        engine.close()
    want_short = _expected(tmp_path / "base", tmp_path / "adapters" / "short.safetensors", inputs, 12)
    want_uncut = _expected(tmp_path / "base", tmp_path / "adapters" / "uncut.safetensors", inputs, None)
    torch.testing.assert_close(torch.tensor(short["probs"]), want_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(uncut["probs"]), want_uncut, atol=1e-5, rtol=0)
    # the same vectors: only the cut differs, and it changes the long answers (so the check above can fail)
    assert (want_short[:2] - want_uncut[:2]).abs().max() > 1e-3
    torch.testing.assert_close(want_short[2], want_uncut[2])


def test_an_input_of_the_other_shape_than_trained_is_refused(tmp_path):
    """A pair adapter (MRPC-like) scored a lone text, and a one-text adapter a joined pair, status 200."""
    engine, client = _served(tmp_path, {"pairs": {"task": "pairs", "text_pair": True},
                                        "single": {"task": "single", "text_pair": False}, "unrecorded": {}})
    try:
        with client:
            def post(name, inputs):
                return client.post("/v1/classify", json={"adapter": name, "inputs": inputs})

            lone = post("pairs", [PAIR, "a lone text"])
            joined = post("single", ["ok", PAIR])
            assert post("pairs", [PAIR]).status_code == post("single", ["ok"]).status_code == 200
            assert post("unrecorded", ["ok", PAIR]).status_code == 200  # files from before the record: as sent
            assert post(None, ["ok", PAIR]).status_code == 200  # the base model: as sent
    finally:
        engine.close()
    assert lone.status_code == joined.status_code == 422
    assert "inputs[1]: adapter 'pairs' was trained on [text, text_pair] pairs (task 'pairs'); send a pair" \
        in lone.text
    assert "inputs[1]: adapter 'single' was trained on single texts (task 'single'); send one text" in joined.text


def test_run_info_is_read_once_per_file_version(tmp_path, monkeypatch):
    """The cut and the pair rule read the adapter's header; per request that was a file open on the event loop."""
    engine, client = _served(tmp_path, {"short": {"max_length": 12}})
    reads = []
    info = engine.store.info
    monkeypatch.setattr(engine.store, "info", lambda name: reads.append(name) or info(name))
    try:
        first = engine.encode_inputs([LONG], "short")
        assert engine.encode_inputs([LONG], "short") == first and reads == ["short"]
        path = tmp_path / "adapters" / "short.safetensors"
        write_adapter(replace(read_adapter(path), extra={"labels": BERT_LABELS, "max_length": 20}), path)
        reads.clear()  # a new file version: read again
        assert len(engine.encode_inputs([LONG], "short")[0]["input_ids"]) == 20 and reads == ["short"]
    finally:
        engine.close()

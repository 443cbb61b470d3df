"""/v1/classify over a GPT-style classifier whose tokenizer has no pad token (GPT-2, many decoder models):
training pads with EOS and tells the head (`config.pad_token_id`), and the server now does the same."""

from __future__ import annotations

from dataclasses import replace

import torch

from lm_helpers import tiny_tokenizer
from serve.cases import trained_adapter
from serve.test_base_head import _client
from verakit import VeraConfig
from verakit.fileformat import load_adapter, write_adapter

TEXTS = ["a fine film", "the plot was dull and the actors were worse than the plot"]  # unequal lengths: padded


def test_a_batch_over_a_tokenizer_without_pad_answers_each_input_as_alone(tmp_path):
    """Every request of two or more inputs was a 500 ("Cannot handle batch sizes > 1 if no padding token is
    defined"); each input's answer now equals the adapter's on that input alone."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

    from verakit.serve.options import ServeOptions

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    tok.pad_token = None
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tok), n_positions=128, initializer_range=0.2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2Model(cfg).save_pretrained(tmp_path / "gpt2")  # a base without a head, as a pretrained checkpoint
    tok.save_pretrained(tmp_path / "gpt2")
    clf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "gpt2", num_labels=2,
                                                        pad_token_id=tok.eos_token_id).eval()
    (tmp_path / "adapters").mkdir()
    adapter = trained_adapter(clf, VeraConfig(r=4), seed=0)
    write_adapter(replace(adapter, extra={"labels": ["neg", "pos"]}), tmp_path / "adapters" / "g.safetensors")
    engine, client = _client(ServeOptions(model=str(tmp_path / "gpt2"), adapters=str(tmp_path / "adapters"),
                                          threads=1, max_wait_ms=0))
    try:
        with client:
            r = client.post("/v1/classify", json={"adapter": "g", "inputs": TEXTS})
    finally:
        engine.close()
    assert r.status_code == 200, r.text
    load_adapter(clf, tmp_path / "adapters" / "g.safetensors")
    with torch.no_grad():
        alone = torch.cat([clf(**tok(t, return_tensors="pt")).logits.softmax(-1) for t in TEXTS])
    torch.testing.assert_close(torch.tensor(r.json()["probs"]), alone, atol=1e-5, rtol=0)

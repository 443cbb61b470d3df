"""Classification heads adapted by VeRA instead of trained in full (`head_hidden_layers`, --head vera):
which parts are adapted and which saved, per architecture; identity at init; files, merge and the bank."""

from __future__ import annotations

import pytest
import torch

import verakit
from helpers import randomize_vectors
from verakit.config import DEFAULT_TARGETS, VeraConfig
from verakit.inject import AttachError, head_hidden_layers, vera_state


def _tiny(kind: str, num_labels: int = 3):
    import transformers as T

    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=99, dim=32, n_layers=1, n_heads=2, hidden_dim=37, num_labels=num_labels)
        return T.DistilBertForSequenceClassification(cfg).eval()
    cls_cfg, cls = {"bert": (T.BertConfig, T.BertForSequenceClassification),
                    "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification)}[kind]
    cfg = cls_cfg(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                  max_position_embeddings=40, num_labels=num_labels)
    return cls(cfg).eval()


# (hidden layers VeRA adapts, modules saved in full) per architecture
EXPECTED = {
    "bert": (("pooler.dense",), ("classifier",)),
    "roberta": (("classifier.dense",), ("classifier.out_proj",)),
    "distilbert": (("pre_classifier",), ("classifier",)),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_head_parts_adapted_and_saved_per_architecture(kind):
    model = _tiny(kind)
    hidden, saved = EXPECTED[kind]
    assert head_hidden_layers(model) == hidden
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    verakit.attach(model, VeraConfig(r=16, target_modules=DEFAULT_TARGETS[model.config.model_type] + hidden))
    state = vera_state(model)
    assert state.config.modules_to_save == saved
    assert state.saved_modules == tuple(n for n, _ in model.named_modules() if n == saved[0] or n.endswith("." + saved[0]))
    assert any(n.endswith(hidden[0]) for n in state.layers)
    # Only d/b and the saved output layer train: the hidden layer's weight stays frozen (it is not in the file).
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "vera_" not in n)
    assert trainable == sorted(n for n in before if n.startswith(state.saved_modules[0] + "."))


def test_full_head_is_unchanged_by_default():
    """Without a head option the pooler and classifier train in full: plain torch layers, not VeRA ones."""
    model = _tiny("bert")
    verakit.attach(model, VeraConfig(r=16))
    state = vera_state(model)
    assert state.config.modules_to_save == ("classifier", "pooler")
    assert state.saved_modules == ("bert.pooler", "classifier")
    vera_kinds = (verakit.VeraLinear, verakit.VeraConv, verakit.VeraEmbedding)
    for head in (model.classifier, model.bert.pooler.dense):
        assert type(head) is torch.nn.Linear and not isinstance(head, vera_kinds)  # not wrapped
        assert head.weight.requires_grad and head.bias.requires_grad
    assert not any(isinstance(m, vera_kinds) for m in model.bert.pooler.modules())
    assert sorted(verakit.vera_layers(model)) == ["bert.encoder.layer.0.attention.self.query",
                                                  "bert.encoder.layer.0.attention.self.value"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "vera_" not in n)
    assert trainable == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]


def test_vera_head_identity_at_init_and_file_round_trip(tmp_path):
    model = _tiny("bert")
    ids = torch.randint(5, 99, (4, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    verakit.attach(model, VeraConfig(r=16, target_modules=("query", "value", "pooler.dense")))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)  # b = 0: the adapted pooler is the base pooler
    randomize_vectors(model, seed=1)
    with torch.no_grad():
        model.classifier.weight.add_(0.3)
        want = model(input_ids=ids).logits
    assert not torch.allclose(want, ref, atol=1e-3)
    path = tmp_path / "a.safetensors"
    verakit.save_adapter(model, path)
    names = set(verakit.read_adapter(path).saved)
    assert names == {"classifier.weight", "classifier.bias"}  # no pooler weight in the file
    fresh = verakit.load_adapter(_tiny("bert"), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        verakit.merge(fresh)
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_bank_serves_vera_heads_per_row_and_refuses_a_full_head(tmp_path):
    from verakit.serve.bank import AdapterBank

    ids = torch.randint(5, 99, (2, 7))
    want = {}
    for i in range(2):
        m = _tiny("bert")
        verakit.attach(m, VeraConfig(r=16, target_modules=("query", "value", "pooler.dense")))
        randomize_vectors(m, seed=10 + i)
        with torch.no_grad():
            m.classifier.weight.mul_(1 + i)
            want[f"a{i}"] = m(input_ids=ids).logits
        verakit.save_adapter(m, tmp_path / f"a{i}.safetensors")
    bank_model = verakit.attach(_tiny("bert"), VeraConfig(r=16, target_modules=("query", "value", "pooler.dense")))
    bank = AdapterBank(bank_model, capacity=2)
    assert set(bank.heads) == {"classifier"} and "bert.pooler.dense" in bank.layers
    for i in range(2):
        bank.add(f"a{i}", tmp_path / f"a{i}.safetensors")
    with torch.no_grad():
        out = bank.forward(["a1", "a0"], input_ids=ids).logits
    torch.testing.assert_close(out[0], want["a1"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], want["a0"][1], rtol=1e-5, atol=1e-5)
    full = verakit.attach(_tiny("bert"), VeraConfig(r=16))
    verakit.save_adapter(full, tmp_path / "full.safetensors")
    with pytest.raises(verakit.AdapterError, match="saved modules differ"):
        bank.add("full", tmp_path / "full.safetensors")
    assert sorted(bank.names()) == ["a0", "a1"]  # the refused adapter changed nothing


def test_per_slot_head_bytes_shrink_with_a_vera_head():
    """The bank's per-slot tables: a full BERT head costs a hidden x hidden pooler per slot, a VeRA head
    only d and b for the pooler (r + hidden floats) next to the classifier."""
    from verakit.serve.bank import AdapterBank

    def per_slot(config: VeraConfig) -> float:
        small = AdapterBank(verakit.attach(_tiny("bert"), config), capacity=1).nbytes()
        large = AdapterBank(verakit.attach(_tiny("bert"), config), capacity=5).nbytes()
        return (large - small) / 4

    full = per_slot(VeraConfig(r=16))
    vera = per_slot(VeraConfig(r=16, target_modules=("query", "value", "pooler.dense")))
    body = 2 * (16 + 32) * 4  # query and value of the one layer: d (r) and b (hidden), fp32
    assert full == body + (32 * 32 + 32 + 3 * 32 + 3) * 4
    assert vera == body + (16 + 32) * 4 + (3 * 32 + 3) * 4


def test_a_target_inside_modules_to_save_is_still_refused():
    with pytest.raises(AttachError, match="both VeRA targets and inside modules_to_save"):
        verakit.attach(_tiny("bert"), VeraConfig(r=16, target_modules=("query", "pooler.dense"),
                                                 modules_to_save=("pooler",)))

import pytest
import torch

from verakit import (
    AttachError,
    VeraConfig,
    VeraLinear,
    attach,
    detach,
    trainable_parameters,
    vera_layers,
    vera_state,
)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def test_attach_defaults_on_minilm(minilm_clf):
    model = minilm_clf
    attach(model, VeraConfig(r=32))
    state = vera_state(model)
    assert state.config.target_modules == ("query", "value")
    assert len(state.layers) == 12
    assert state.saved_modules == ("bert.pooler", "classifier")
    names = [n for n, _ in trainable_parameters(model)]
    assert sum(n.endswith(".vera_d") for n in names) == 12 and sum(n.endswith(".vera_b") for n in names) == 12
    assert {n for n in names if not n.endswith(("vera_d", "vera_b"))} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"
    }
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "bert.encoder.layer.0.attention.self.query.base.weight" in frozen
    # one shared projection object for every layer, never in the state dict
    assert len({id(layer.projection) for layer in state.layers.values()}) == 1
    assert not any("vera_A" in k or "projection" in k for k in model.state_dict())


def test_attach_gpt2_conv1d_and_llama_mixed_shapes(tiny_gpt2, tiny_llama):
    attach(tiny_gpt2, VeraConfig(r=8))
    assert list(vera_layers(tiny_gpt2)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    attach(tiny_llama, VeraConfig(r=8))
    layers = vera_layers(tiny_llama)
    assert (layers["model.layers.0.self_attn.q_proj"].out_features, layers["model.layers.0.self_attn.v_proj"].out_features) == (64, 32)
    proj = vera_state(tiny_llama).projection
    assert (proj.max_out, proj.max_in) == (64, 64)


def test_target_forms(tiny_llama):
    attach(tiny_llama, VeraConfig(r=4, target_modules="all-linear"))
    names = set(vera_layers(tiny_llama))
    assert "lm_head" not in names and len(names) == 2 * 7
    detach(tiny_llama)
    attach(tiny_llama, VeraConfig(r=4, target_modules=r"model\.layers\.1\.mlp\.(gate|up)_proj"))
    assert sorted(vera_layers(tiny_llama)) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    detach(tiny_llama)
    attach(tiny_llama, VeraConfig(r=4, target_modules=("mlp.down_proj",)))
    assert len(vera_layers(tiny_llama)) == 2


def test_adding_targets_never_changes_existing_projection(tiny_llama):
    """Layer slices depend only on the layer's shape, not on which other modules are targeted."""
    x = torch.randint(0, 101, (1, 6))
    attach(tiny_llama, VeraConfig(r=8, target_modules=("v_proj",)))
    a = vera_layers(tiny_llama)["model.layers.0.self_attn.v_proj"].slices(torch.device("cpu"), torch.float32)
    a = [t.clone() for t in a]
    detach(tiny_llama)
    attach(tiny_llama, VeraConfig(r=8, target_modules="all-linear"))  # max_in grows to 96 (down_proj)
    b = vera_layers(tiny_llama)["model.layers.0.self_attn.v_proj"].slices(torch.device("cpu"), torch.float32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    tiny_llama(x)


def test_rank_prefix_property(tiny_llama):
    attach(tiny_llama, VeraConfig(r=16))
    big = [t.clone() for t in vera_layers(tiny_llama)["model.layers.1.self_attn.q_proj"].slices("cpu", torch.float32)]
    detach(tiny_llama)
    attach(tiny_llama, VeraConfig(r=5))
    small = vera_layers(tiny_llama)["model.layers.1.self_attn.q_proj"].slices("cpu", torch.float32)
    assert torch.equal(small[0], big[0][:5]) and torch.equal(small[1], big[1][:, :5])


def test_detach_restores_bit_identical(minilm_clf):
    model = minilm_clf
    sd, rg = _snapshot(model)
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
    attach(model, VeraConfig(r=16))
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.add_(0.1)  # train something, including the head
    detach(model)
    sd2, rg2 = _snapshot(model)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert rg == rg2
    assert not any(isinstance(m, VeraLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    attach(model, VeraConfig(r=16))  # attachable again after detach


def test_attach_twice_and_no_match_errors(tiny_bert_clf):
    attach(tiny_bert_clf, VeraConfig(r=4))
    with pytest.raises(AttachError, match="already has VeRA attached"):
        attach(tiny_bert_clf, VeraConfig(r=4))
    detach(tiny_bert_clf)
    with pytest.raises(AttachError, match=r"matched no linear layer.*bert\.encoder\.layer\.N\.attention\.self\.query"):
        attach(tiny_bert_clf, VeraConfig(r=4, target_modules=("q_proj",)))
    with pytest.raises(AttachError, match="modules_to_save"):
        attach(tiny_bert_clf, VeraConfig(r=4, modules_to_save=("nonexistent_head",)))
    # The refused attaches left nothing behind: no state attribute (detach deletes it), no wrapped layer.
    assert not hasattr(tiny_bert_clf, "verakit_state")
    assert not any(isinstance(m, VeraLinear) for m in tiny_bert_clf.modules())


def test_no_default_targets_for_unknown_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(AttachError, match="no default target_modules"):
        attach(model, VeraConfig(r=2))
    with pytest.raises(AttachError, match="has no VeRA attached"):
        detach(model)


def test_train_flags_and_unique_projections(tiny_llama):
    attach(tiny_llama, VeraConfig(r=4, train_d=False, projection_sharing="unique"))
    names = [n for n, _ in trainable_parameters(tiny_llama)]
    assert names and all(n.endswith("vera_b") for n in names)
    layers = list(vera_layers(tiny_llama).values())
    assert layers[0].projection is not layers[2].projection
    assert not torch.equal(layers[0].projection.A, layers[2].projection.A[:, :64])
    assert vera_state(tiny_llama).projection is None

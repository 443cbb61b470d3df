"""The one model -> slot tables converter (verakit.slot_tables), used by the serving bank and grouped training:
each slot's rows equal the model with that adapter loaded normally; a rank-r adapter folds into rank-R
tables; serving tables start frozen and empty over the pre-attach head, training tables start from the model
as it is and train what its config says; export and restore give back what went in."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import randomize_vectors
from verakit import AdapterError, VeraConfig, attach, load_adapter, vera_layers
from verakit.fileformat import adapter_from_model
from verakit.serve import AdapterBank
from verakit.slot_tables import SlotTables, to_slot_tables
from verakit.slots import SlotHeadLinear, SlotLinear


def _adapter(base, config, seed):
    model = attach(copy.deepcopy(base), config)
    randomize_vectors(model, seed=seed)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return adapter_from_model(model)


def _inputs(n):
    return {"input_ids": torch.randint(0, 99, (n, 7), generator=torch.Generator().manual_seed(n))}


def _alone(base, adapter, inputs):
    model = copy.deepcopy(base)
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.no_grad():
        return model(**inputs).logits


def test_serving_tables_rows_equal_each_adapter_alone_across_ranks(tiny_bert_clf):
    """Frozen, zero tables over the pre-attach head; rank-4 and rank-8 adapters written into rank-8 tables
    give each row the adapter's own model; slot 0 rows are the base model."""
    base = tiny_bert_clf
    full, low = _adapter(base, VeraConfig(r=8), 1), _adapter(base, VeraConfig(r=4), 2)
    model = attach(copy.deepcopy(base), VeraConfig(r=8))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # changed after attach: serving's slot 0 still holds the base's head
    tables = to_slot_tables(model, 3, trainable=False)
    assert isinstance(tables, SlotTables) and all(isinstance(ly, SlotLinear) for ly in tables.layers.values())
    assert sorted(tables.heads) == ["bert.pooler.dense", "classifier"]
    assert not any(t.requires_grad for t in tables.tables()) and all(float(t[1:].abs().max()) == 0 for t in
                                                                    (ly.vera_b for ly in tables.layers.values()))
    torch.testing.assert_close(tables.heads["classifier"].weight[0], base.classifier.weight, atol=0, rtol=0)
    tables.write(1, full)
    tables.write(2, low)
    inputs = _inputs(5)
    with torch.no_grad(), tables.rows.use(torch.tensor([1, 2, 0, 2, 1])):
        got = model(**inputs).logits
    for i, ad in enumerate([full, low, None, low, full]):
        torch.testing.assert_close(got[i], _alone(base, ad, {k: v[i : i + 1] for k, v in inputs.items()})[0],
                                   atol=1e-5, rtol=0)
    # the rank-4 adapter sits in the first 4 entries of d, the rest zero; r == R copies d bit for bit
    name = next(iter(tables.layers))
    assert float(tables.layers[name].vera_d[2, 4:].abs().max()) == 0
    assert torch.equal(tables.layers[name].vera_d[1], full.d[name])


def test_training_tables_start_from_the_model_and_train_what_the_config_says(tiny_bert_clf):
    model = attach(copy.deepcopy(tiny_bert_clf), VeraConfig(r=8, train_b=False))
    randomize_vectors(model, seed=3)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    template = adapter_from_model(model)
    tables = to_slot_tables(model, 4)
    for ly in tables.layers.values():
        assert ly.vera_d.requires_grad and not ly.vera_b.requires_grad
    assert all(p.requires_grad for p in tables.head_params(model))
    assert {id(p) for p in tables.slotted_params()} == {id(p) for p in (*tables.adapter_params(), *tables.head_params(model))}
    for slot in (1, 3):  # every adapter slot starts as the model; export gives it back bit for bit
        out = tables.export(model, slot, {"k": 1})
        assert out.extra == {"k": 1} and out.modules == template.modules
        assert all(torch.equal(out.d[n], template.d[n]) and torch.equal(out.b[n], template.b[n]) for n in out.d)
        assert all(torch.equal(out.saved[k], template.saved[k]) for k in template.saved)
        # the base weights' samples (load_adapter's check) carry over: the tables never change W0
        assert out.samples is not None and out.samples.values.keys() == template.samples.values.keys()
        assert all(torch.equal(v, template.samples.values[k]) for k, v in out.samples.values.items())
    # training's slot 0 head is the head as it is at conversion (serving's is the pre-attach one)
    assert torch.equal(tables.heads["classifier"].weight[0], template.saved["classifier.weight"])


def test_shared_head_keeps_the_model_head_and_ignores_the_adapters(tiny_bert_clf):
    model = attach(copy.deepcopy(tiny_bert_clf), VeraConfig(r=8))
    tables = to_slot_tables(model, 3, per_slot_heads=False)
    assert tables.shared_head and tables.heads == {} and tables.head_tensors == {}
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.requires_grad
    head = model.classifier.weight.detach().clone()
    ad = _adapter(tiny_bert_clf, VeraConfig(r=8), 5)
    tables.write(2, ad)  # its vectors go in slot 2; its head is not written anywhere
    assert torch.equal(model.classifier.weight, head) and not torch.equal(ad.saved["classifier.weight"], head)
    assert not any(isinstance(m, SlotHeadLinear) for m in model.modules())
    assert all(torch.equal(ly.vera_b[2], ad.b[n]) for n, ly in tables.layers.items())


def test_write_refuses_what_does_not_fit_naming_it(tiny_bert_clf):
    model = attach(copy.deepcopy(tiny_bert_clf), VeraConfig(r=4))
    tables = to_slot_tables(model, 3, trainable=False)
    with pytest.raises(ValueError, match="slot 0 is outside 1..2"):
        tables.write(0, adapter_from_model(attach(copy.deepcopy(tiny_bert_clf), VeraConfig(r=4))))
    with pytest.raises(AdapterError, match="adapter rank 8 exceeds"):
        tables.write(1, _adapter(tiny_bert_clf, VeraConfig(r=8), 1))
    with pytest.raises(AdapterError, match="adapter module 'bert.encoder.layer.0.attention.self.key' \\(32, 32\\) is not a bank layer"):
        tables.write(1, _adapter(tiny_bert_clf, VeraConfig(r=4, target_modules="all-linear"), 1))
    with pytest.raises(ValueError, match="needs slot 0"):
        to_slot_tables(attach(copy.deepcopy(tiny_bert_clf), VeraConfig(r=4)), 1)


def test_restore_gives_back_the_plain_model_and_the_bank_uses_the_same_converter(tiny_bert_clf):
    model = attach(copy.deepcopy(tiny_bert_clf), VeraConfig(r=4))
    tables = to_slot_tables(model, 2, trainable=False)
    restored = tables.restore(model)
    inputs = _inputs(3)
    assert not any(isinstance(m, (SlotLinear, SlotHeadLinear)) for m in restored.modules())
    torch.testing.assert_close(_alone(restored, None, inputs), _alone(tiny_bert_clf, None, inputs), atol=0, rtol=0)
    bank = AdapterBank(attach(copy.deepcopy(tiny_bert_clf), VeraConfig(r=4)), 2)
    assert isinstance(bank.tables, SlotTables) and bank.layers is bank.tables.layers and bank.heads is bank.tables.heads


def test_dvora_training_tables_train_m_and_serving_tables_keep_scales(tiny_bert_clf, monkeypatch):
    """Training tables of a DVoRA model keep a trained m per slot (no scale table), start every slot from the
    model's m, give each slot's rows the output of its adapter loaded normally, export m exactly and refuse a
    plain VeRA adapter; serving tables keep no m and start without scales (plain forward)."""
    from serve.cases import dvora_adapter
    from verakit import ops

    vera_delta = ops.vera_delta
    cfg = VeraConfig(r=4, magnitude=True)
    model = attach(copy.deepcopy(tiny_bert_clf), cfg)
    start = adapter_from_model(model)
    tables = to_slot_tables(model, 3)
    for ly in tables.layers.values():
        assert ly.vera_s is None and ly.vera_m.requires_grad and ly.vera_m.shape == (3, ly.out_features)
        assert any(t is ly.vera_m for t in tables.adapter_params())
    n = next(iter(start.m))
    torch.testing.assert_close(tables.layers[n].vera_m[2], start.m[n], atol=0, rtol=0)
    dv = dvora_adapter(tiny_bert_clf, cfg, 1)
    tables.write(1, dv)
    inputs = _inputs(4)
    with torch.no_grad(), tables.rows.use(torch.tensor([1, 0, 1, 2])):
        mixed = model(**inputs).logits
    for i, ad in enumerate([dv, None, dv, start]):
        torch.testing.assert_close(mixed[i : i + 1], _alone(tiny_bert_clf, ad, {k: v[i : i + 1] for k, v in inputs.items()}),
                                   atol=1e-5, rtol=0)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # the adapter changes the answer
    # each slot's norm is formed once while d and b stay (an evaluation pass), again once they change
    calls = []
    monkeypatch.setattr(ops, "vera_delta", lambda *a, **k: calls.append(1) or vera_delta(*a, **k))
    with torch.no_grad(), tables.rows.use(torch.tensor([1, 2])):
        model(**{k: v[:2] for k, v in inputs.items()})
    assert calls == []
    dv2 = dvora_adapter(tiny_bert_clf, cfg, 3)
    tables.write(2, dv2)
    with torch.no_grad(), tables.rows.use(torch.tensor([1, 2])):
        again = model(**{k: v[:2] for k, v in inputs.items()}).logits
    assert len(calls) == 2 * len(tables.layers)  # slots 1 and 2 (both layers' tables changed): no stale norm
    torch.testing.assert_close(again[1:], _alone(tiny_bert_clf, dv2, {k: v[1:2] for k, v in inputs.items()}), atol=1e-5, rtol=0)
    tables.write(2, start)
    got = tables.export(model, 1, {})
    assert got.config.magnitude and set(got.m) == set(dv.m)
    assert all(torch.equal(got.m[k], dv.m[k]) for k in dv.m)
    with pytest.raises(AdapterError, match="train DVoRA magnitudes on 4 layers; the adapter has magnitudes for 0"):
        tables.write(2, dvora_adapter(tiny_bert_clf, VeraConfig(r=4), 2))
    serving = to_slot_tables(attach(copy.deepcopy(tiny_bert_clf), cfg), 3, trainable=False)
    assert all(ly.vera_s is None and ly.vera_m is None for ly in serving.layers.values())


class _EmbConvNet(torch.nn.Module):
    """An embedding (with a padding row), a Conv1d and a linear layer: every kind a DVoRA slot layer has."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6, padding_idx=0)
        self.conv, self.head = torch.nn.Conv1d(6, 4, 3, padding=1), torch.nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(self.conv(self.emb(ids).transpose(1, 2)).mean(-1))


def _dvora_kinds(base, cfg, seed):
    model = attach(copy.deepcopy(base), cfg)
    randomize_vectors(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_m.mul_(1 + 0.3 * torch.randn(layer.vera_m.shape, generator=g))
    return adapter_from_model(model)


def test_training_tables_train_dvora_convolutions_and_embeddings_as_each_layer_alone():
    """Grouped DVoRA training on every kind: in one batch of rows in 3 groups (and slot 0), each group's
    output and its d, b and m gradients equal those of its own DVoRA model (VeraEmbedding, VeraConv,
    VeraLinear), before and after an SGD step (no stale norm); slot 0 rows are the base; export gives m."""
    torch.manual_seed(0)
    base = _EmbConvNet()
    cfg = VeraConfig(r=4, target_modules=("emb", "conv", "head"), magnitude=True)
    adapters = [_dvora_kinds(base, cfg, seed) for seed in (1, 2, 3)]
    model = attach(copy.deepcopy(base), cfg)
    tables = to_slot_tables(model, 4)
    assert {n: type(ly).__name__ for n, ly in tables.layers.items()} == \
        {"emb": "SlotEmbedding", "conv": "SlotConv", "head": "SlotLinear"}
    assert all(ly.vera_m is not None and ly.vera_m.requires_grad for ly in tables.layers.values())
    for slot, ad in enumerate(adapters, 1):
        tables.write(slot, ad)
    alone = [load_adapter(copy.deepcopy(base), ad) for ad in adapters]
    ids = torch.tensor([1, 2, 0, 3, 1, 2])
    x = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(7))
    x[:, -1] = 0  # padded positions: the padding row stays the base's in every slot
    w = torch.randn(6, 2, generator=torch.Generator().manual_seed(8))  # a loss that weighs every output
    opt = torch.optim.SGD(tables.adapter_params(), lr=0.5)
    refs = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in alone]
    for step in range(2):
        opt.zero_grad()
        with tables.rows.use(ids):
            out = model(x)
        (out * w).sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(out[2], base(x[2:3])[0], atol=1e-6, rtol=0)
        for slot, (ref, ref_opt) in enumerate(zip(alone, refs, strict=True), 1):
            rows = (ids == slot).nonzero().squeeze(1)
            ref_opt.zero_grad()
            got = ref(x[rows])
            (got * w[rows]).sum().backward()
            torch.testing.assert_close(out[rows], got, atol=1e-5, rtol=1e-5)
            for n, ly in vera_layers(ref).items():
                table = tables.layers[n]
                for t, r in ((table.vera_d, ly.vera_d), (table.vera_b, ly.vera_b), (table.vera_m, ly.vera_m)):
                    assert r.grad.abs().max() > 1e-4, (step, slot, n)  # every vector learns here
                    torch.testing.assert_close(t.grad[slot], r.grad, atol=1e-5, rtol=1e-4)
        assert all(float(t.grad[0].abs().max()) == 0 for t in tables.adapter_params())  # slot 0 never trains
        opt.step()
        for ref_opt in refs:
            ref_opt.step()
    got = tables.export(model, 2, {})
    assert set(got.m) == {"emb", "conv", "head"}
    for n, ly in vera_layers(alone[1]).items():
        torch.testing.assert_close(got.m[n], ly.vera_m.detach(), atol=1e-6, rtol=0)
    serving = to_slot_tables(attach(copy.deepcopy(base), cfg), 3, trainable=False)
    assert all(ly.vera_m is None for ly in serving.layers.values())

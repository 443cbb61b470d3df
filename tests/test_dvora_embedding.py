"""DVoRA on embeddings (VeraEmbedding with VeraConfig.magnitude): against a by-hand float64 reference and PEFT's DoRA.

Definition (PEFT's DoraEmbeddingLayer): with the table as the linear map W = E^T + delta (D, V), W' = m * W /
||W|| per row of W, i.e. per embedding dimension over the whole vocabulary (m has D entries), the norm a
constant in backward; y[t] = W'[:, i_t]. verakit keeps nn.Embedding's promise for padding_idx: the padding
row is the base's, in the forward and the merged table (its delta is zero and it is not rescaled).
"""

import copy

import pytest
import torch
from torch import nn

from verakit import (
    VeraConfig,
    attach,
    layer_embedding,
    load_adapter,
    merge,
    ops,
    read_adapter,
    save_adapter,
    unmerge,
    vera_layers,
)
from verakit.layer_embedding import VeraEmbedding, table_norms
from verakit.merge import merged_state_dict
from verakit.projection import Projection

R, V, D = 6, 50, 12


def _layer(padding_idx=None, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    base = nn.Embedding(V, D, padding_idx=padding_idx).requires_grad_(False)
    layer = VeraEmbedding(base, Projection(3, "kaiming_uniform", R, V, D), R, 0.1, dropout=dropout, magnitude=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.vera_d.copy_(torch.randn(R, generator=g))
        layer.vera_b.copy_(torch.randn(D, generator=g) * 0.3)
        layer.vera_m.mul_(1 + 0.2 * torch.randn(D, generator=g))
    return layer


def _ids(seed=0, pad=None):
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(seed))
    if pad is not None:
        ids[0, :2] = pad
    return ids


def _delta_t(layer, d, b):
    """delta^T (V, D) in float64 by hand, delta = diag(b) B_sl diag(s d) A_sl, its padding row zero."""
    A, B = (t.double() for t in layer.slices(torch.device("cpu"), torch.float32))
    delta_t = ((b.unsqueeze(1) * B) @ ((d * layer.scale).unsqueeze(1) * A)).t()  # (V, D)
    keep = torch.ones(V, 1, dtype=torch.float64)
    if layer.padding_idx is not None:
        keep[layer.padding_idx] = 0
    return delta_t * keep


def reference(layer, ids, d, b, m, keep=None):
    """float64 by hand: y[t] = (E[i_t] + keep_t delta^T[i_t]) * m / ||E + delta^T||.detach() per column (the
    norm over all V rows; keep: dropout's draw on the one-hot input, 1 without), the padding row E's."""
    delta_t = _delta_t(layer, d, b)
    E = layer.base.weight.double()
    scale = m / (E + delta_t).detach().norm(dim=0)
    y = (E[ids] + (1 if keep is None else keep.unsqueeze(-1)) * delta_t[ids]) * scale
    if layer.padding_idx is not None:
        y = torch.where((ids == layer.padding_idx).unsqueeze(-1), E[ids], y)
    return y


def _ref_vectors(layer):
    return [p.detach().double().clone().requires_grad_(True) for p in (layer.vera_d, layer.vera_b, layer.vera_m)]


@pytest.mark.parametrize("pad", [None, 3])
def test_identity_at_init_and_m_starts_at_column_norms(pad):
    torch.manual_seed(0)
    base = nn.Embedding(V, D, padding_idx=pad).requires_grad_(False)
    layer = VeraEmbedding(base, Projection(3, "kaiming_uniform", R, V, D), R, 0.1, magnitude=True)
    torch.testing.assert_close(layer.vera_m, base.weight.norm(dim=0), rtol=1e-6, atol=0)  # over the vocabulary
    assert layer.vera_m.shape == (D,) and layer.vera_m.dtype == torch.float32
    ids = _ids(pad=pad)
    assert torch.equal(layer(ids), base(ids))
    with torch.no_grad():
        assert torch.equal(layer(ids), base(ids))


@pytest.mark.parametrize("pad", [None, 3])
def test_forward_and_gradients_match_the_reference(pad):
    layer = _layer(pad)
    ids = _ids(1, pad)
    d, b, m = _ref_vectors(layer)
    want = reference(layer, ids, d, b, m)
    got = layer(ids)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    if pad is not None:
        assert torch.equal(got[0, :2], layer.base.weight[pad].expand(2, D))  # the padding row: the base's
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
    got.backward(g)
    want.backward(g.double())
    for ours, theirs in zip((layer.vera_d, layer.vera_b, layer.vera_m), (d, b, m), strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(ids).double(), want.detach(), rtol=0, atol=1e-5)


def test_dropout_drops_looked_up_columns_of_the_delta_only():
    """Dropout acts on the one-hot input (VeraEmbedding's VeRA): a dropped position gets scale * E[i], a kept
    one scale * (E[i] + delta^T[i] / (1 - p)); the norm is the table's, whatever the draw."""
    layer = _layer(3, dropout=0.4).train()
    ids = _ids(8, 3)
    torch.manual_seed(9)
    got = layer(ids)
    torch.manual_seed(9)
    keep = nn.Dropout(0.4)(torch.ones(ids.shape, dtype=torch.float64))  # the draw the layer made
    assert 0 < int((keep == 0).sum()) < keep.numel()
    d, b, m = _ref_vectors(layer)
    torch.testing.assert_close(got.double(), reference(layer, ids, d, b, m, keep), rtol=0, atol=1e-5)


def test_gradient_free_calls_cache_the_scale(monkeypatch):
    """The norm runs over the whole vocabulary: gradient-free calls form it once per change of d, b, m or E."""
    layer = _layer(3)
    calls = []
    real = layer_embedding.table_norms
    monkeypatch.setattr(layer_embedding, "table_norms", lambda *a: calls.append(1) or real(*a))
    ids = _ids(2, 3)
    with torch.no_grad():
        y = layer(ids)
        assert torch.equal(layer(ids), y) and torch.equal(layer(ids[:1]), y[:1])
        assert len(calls) == 1
        layer.vera_b.mul_(0.5)
        layer(ids)
        assert len(calls) == 2
        layer.vera_m.mul_(2.0)
        torch.testing.assert_close(layer(ids).double(), reference(layer, ids, *_ref_vectors(layer)), rtol=0, atol=1e-5)
        assert len(calls) == 3
    layer(ids).sum().backward()  # with gradients: every call (the vectors change every step)
    layer(ids)
    assert len(calls) == 5


def test_blocked_norm_equals_the_full_norm(monkeypatch):
    """table_norms sums the vocabulary in blocks (a bounded float32 temporary): the same norm as one pass."""
    torch.manual_seed(0)
    table, left, right = torch.randn(1000, 8), torch.randn(1000, 3), torch.randn(3, 8)
    want = (table.double() + left.double() @ right.double()).norm(dim=0)
    whole = table_norms(table, left, right)
    monkeypatch.setattr(layer_embedding, "_NORM_ELEMENTS", 8 * 37)  # 37 rows per block, a ragged last one
    blocked = table_norms(table, left, right)
    torch.testing.assert_close(whole.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(blocked.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(table_norms(table.bfloat16(), None, None), table_norms(table.bfloat16().float(), None, None))


@pytest.mark.parametrize("pad", [None, 3])
def test_merge_equals_unmerged_and_unmerge_restores_the_table(pad):
    layer = _layer(pad)
    ids = _ids(4, pad)
    e0 = layer.base.weight.clone()
    with torch.no_grad():
        want = layer(ids)
        layer.merge()
        got = layer(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if pad is not None:
        assert torch.equal(layer.base.weight[pad], e0[pad])  # never touched
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, e0, rtol=0, atol=1e-6)


def test_merge_refusals_zero_scale_and_vectors_changed_while_merged():
    from test_dvora_conv import check_merge_refusals

    check_merge_refusals(_layer(), 5, r"embedding table \(50x12\).*zero at dimensions \[5\]")


def test_parity_with_peft_dora_embedding():
    """PEFT's LoRA+DoRA embedding with lora_embedding_A = diag(s d) A_sl (r, V), lora_embedding_B = diag(b) B_sl
    (D, r), scaling 1, and magnitude m: outputs and m's gradient agree (no padding_idx: PEFT rescales and adapts
    the padding row, verakit keeps it)."""
    peft = pytest.importorskip("peft")
    layer = _layer()
    A, B = layer.slices(torch.device("cpu"), torch.float32)
    F_A, F_B = ops.delta_factors(A, B, layer.vera_d.detach(), layer.vera_b.detach(), layer.scale)
    net = nn.Sequential(nn.Embedding(V, D))
    net[0].load_state_dict(layer.base.state_dict())
    cfg = peft.LoraConfig(r=R, lora_alpha=R, target_modules=["0"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(net, cfg)
    lora = model.base_model.model[0]
    mag = lora.lora_magnitude_vector["default"].weight
    assert mag.shape == (D,)  # PEFT's m: one per embedding dimension, as ours
    with torch.no_grad():
        lora.lora_embedding_A["default"].copy_(F_A)
        lora.lora_embedding_B["default"].copy_(F_B)
        mag.copy_(layer.vera_m)
    ids = _ids(5)
    ours, theirs = layer(ids), model(ids)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(layer.vera_m.grad, mag.grad, rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_attach_save_load_and_merged_state_dict(tmp_path):
    torch.manual_seed(0)
    base = _Net()
    model = attach(copy.deepcopy(base), VeraConfig(r=R, target_modules=("emb", "head"), magnitude=True))
    layers = vera_layers(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ly in layers.values():
            ly.vera_b.copy_(torch.randn(ly.out_features, generator=g) * 0.3)
            ly.vera_m.mul_(1 + 0.3 * torch.randn(ly.out_features, generator=g))
    path = tmp_path / "dvora_emb.safetensors"
    save_adapter(model, path)
    ad = read_adapter(path)
    assert ad.modules["emb"] == (D, V, "embedding:pad=0") and ad.m["emb"].shape == (D,)
    ids = _ids(6, 0)
    with torch.no_grad():
        want = model(ids)
        assert torch.equal(load_adapter(copy.deepcopy(base), path)(ids), want)
        assert (want - base(ids)).abs().max() > 1e-2
    merged = merged_state_dict(base.state_dict(), ad)
    merge(model)
    torch.testing.assert_close(merged["emb.weight"], layers["emb"].base.weight, rtol=0, atol=1e-6)
    assert torch.equal(merged["emb.weight"][0], base.emb.weight[0])  # the padding row, kept
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), want, rtol=0, atol=1e-5)
    unmerge(model)

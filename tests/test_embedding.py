"""VeraEmbedding against a slow reference: E'[i] = E[i] + b * (B_sl (s d A_sl[:, i])), s = scale(1) scale(r)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from test_conv import rewrite_meta
from verakit import VeraConfig, attach, load_adapter, merge, read_adapter, save_adapter, unmerge, vera_layers
from verakit.fileformat import AdapterError
from verakit.inject import AttachError
from verakit.merge import adapter_deltas, merged_state_dict
from verakit.projection import distribution_scale, unit_table


def reference_table(E, d, b, r, padding_idx=None, seed=0, dist="kaiming_uniform"):
    """The adapted table (V, D) in float64, row by row from the formula."""
    V, D = E.shape
    A = unit_table(seed, 0, dist, r, V).double()
    B = unit_table(seed, 1, dist, D, r).double()
    s = distribution_scale(dist, 1) * distribution_scale(dist, r)
    out = E.double().clone()
    for i in range(V):
        if i != padding_idx:
            out[i] += b.double() * (B @ (s * d.double() * A[:, i]))
    return out


class LM(nn.Module):
    def __init__(self, vocab=40, dim=6, padding_idx=None, tied=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.tok(ids))))


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g))
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g))


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_forward_and_merge_match_reference_and_padding_row_stays(padding_idx):
    torch.manual_seed(0)
    model = LM(padding_idx=padding_idx)
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=5, target_modules=("tok",)))
    layer = vera_layers(model)["tok"]
    assert (layer.out_features, layer.in_features) == (6, 40)
    assert layer.kind == ("embedding" if padding_idx is None else "embedding:pad=3")
    assert layer.scale == pytest.approx(math.sqrt(6 / 1) * math.sqrt(6 / 5))
    ids = torch.tensor([[3, 0, 7, 39, 3], [12, 3, 3, 1, 2]])
    with torch.no_grad():
        assert torch.equal(model.tok(ids), base.tok(ids))  # identity at init
    _randomize(model)
    table = reference_table(base.tok.weight, layer.vera_d.detach(), layer.vera_b.detach(), 5, padding_idx).float()
    with torch.no_grad():
        got = model.tok(ids)
        merge(model)
        merged_table = layer.base.weight.clone()
        merged = model.tok(ids)
        unmerge(model)
    torch.testing.assert_close(got, table[ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, table[ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_table, table, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base.weight, base.tok.weight, atol=1e-6, rtol=0)
    if padding_idx is not None:
        assert torch.equal(got[ids == 3], base.tok(ids)[ids == 3])  # the padding row: the base's exactly
        assert torch.equal(merged_table[3], base.tok.weight[3])


def test_gradients_match_reference_and_ignore_padding_tokens():
    torch.manual_seed(0)
    model = LM(padding_idx=0)
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=4, target_modules=("tok",), d_initial=0.5))
    layer = vera_layers(model)["tok"]
    with torch.no_grad():
        layer.vera_b.normal_()
    ids = torch.tensor([[5, 0, 9, 0], [2, 2, 0, 31]])
    model.tok(ids).pow(2).sum().backward()
    d = layer.vera_d.detach().double().requires_grad_(True)
    b = layer.vera_b.detach().double().requires_grad_(True)
    reference_table(base.tok.weight.detach(), d, b, 4, padding_idx=0)[ids].pow(2).sum().backward()
    torch.testing.assert_close(layer.vera_d.grad.double(), d.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.vera_b.grad.double(), b.grad, atol=1e-5, rtol=1e-5)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["tok.vera_d", "tok.vera_b"]


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        inputs = {a.untyped_storage().data_ptr() for a in flat}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new memory, not a view
                self.largest = max(self.largest, t.numel())
        return out


def test_forward_gathers_looked_up_columns_only():
    """With a 20,000-token vocabulary, no tensor of the forward (or backward) is vocabulary-sized."""
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(20000, 8))
    attach(emb, VeraConfig(r=4, target_modules=("0",)))
    vera_layers(emb)["0"].projection.tables(torch.device("cpu"), torch.float32)  # the shared tables exist already
    ids = torch.randint(0, 20000, (3, 5))
    with _Sizes() as sizes:
        emb(ids).sum().backward()
    assert sizes.largest < 20000


def test_dropout_drops_whole_tokens():
    torch.manual_seed(0)
    model = LM()
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=4, target_modules=("tok",), dropout=0.5))
    _randomize(model)
    layer = vera_layers(model)["tok"]
    ids = torch.randint(0, 40, (4, 6))
    model.train()
    torch.manual_seed(3)
    got = model.tok(ids)
    torch.manual_seed(3)
    keep = nn.functional.dropout(torch.ones(ids.shape), 0.5, training=True)  # the one-hot input's mask
    table = reference_table(base.tok.weight, layer.vera_d.detach(), layer.vera_b.detach(), 4).float()
    expected = base.tok(ids) + (table[ids] - base.tok(ids)) * keep.unsqueeze(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_tied_table_refuses_merge_but_runs(tmp_path):
    torch.manual_seed(0)
    model = LM(tied=True)
    attach(model, VeraConfig(r=4, target_modules=("tok", "mix")))
    _randomize(model)
    assert vera_layers(model)["tok"].tied == ("head.weight",)
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        before = model(ids)
    with pytest.raises(RuntimeError, match="head.weight also use"):
        merge(model)
    assert not any(ly.merged for ly in vera_layers(model).values())  # refused before anything merged
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_max_norm_and_oversized_tables_are_refused(monkeypatch):
    with pytest.raises(AttachError, match="max_norm"):
        attach(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), VeraConfig(r=2, target_modules=("0",)))
    monkeypatch.setattr("verakit.inject.MAX_PROJECTION_ELEMENTS", 1000)
    with pytest.raises(AttachError, match=r"r \* \(max_in \+ max_out\) = 8 \* \(200 \+ 4\)"):
        attach(nn.Sequential(nn.Embedding(200, 4)), VeraConfig(r=8, target_modules=("0",)))
    attach(nn.Sequential(nn.Linear(200, 4)), VeraConfig(r=8, target_modules=("0",)))  # linear layers: no limit here


def test_not_picked_by_all_linear_and_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LM(padding_idx=0)
    assert "tok" not in vera_layers(attach(copy.deepcopy(model), VeraConfig(r=4, target_modules="all-linear")))
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=4, target_modules=("tok", "mix")))
    _randomize(model)
    path = tmp_path / "emb.safetensors"
    save_adapter(model, path)
    ad = read_adapter(path)
    assert ad.modules == {"tok": (6, 40, "embedding:pad=0"), "mix": (6, 6, "linear")}
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(load_adapter(copy.deepcopy(base), path)(ids), expected)
        merged = copy.deepcopy(base)
        merged.load_state_dict(merged_state_dict(base.state_dict(), ad))
        torch.testing.assert_close(merged(ids), expected, atol=1e-5, rtol=0)
        assert torch.equal(adapter_deltas(ad)["tok"][0], torch.zeros(6))
    for change, fault in [
        (lambda m: m["base"]["modules"]["tok"].__setitem__(2, "embedding:pad=40"), "padding row 40 is outside"),
        (lambda m: m["base"]["modules"]["tok"].__setitem__(2, "embedding:pad=-1"), "unknown module kind"),
    ]:
        with pytest.raises(AdapterError, match=fault):
            read_adapter(rewrite_meta(path, tmp_path / "bad.safetensors", change))


def test_pure_merge_refuses_a_tied_table(tmp_path):
    torch.manual_seed(0)
    model = LM(tied=True)
    base_sd = copy.deepcopy(model).state_dict()  # deepcopy keeps the tie: both keys share one tensor
    attach(model, VeraConfig(r=4, target_modules=("tok",)))
    _randomize(model)
    save_adapter(model, tmp_path / "t.safetensors")
    with pytest.raises(AdapterError, match=r"weight 'tok.weight' is shared with \['head.weight'\]"):
        merged_state_dict(base_sd, read_adapter(tmp_path / "t.safetensors"))


def test_bf16_table_runs_and_merges_close_to_fp32():
    torch.manual_seed(0)
    model = LM(padding_idx=1)
    attach(model, VeraConfig(r=4, target_modules=("tok",)))
    _randomize(model)
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        expected = model.tok(ids)
        model.tok.base.to(torch.bfloat16)
        got = model.tok(ids)
        merge(model)
        merged = model.tok(ids)
    assert got.dtype == merged.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(merged.float(), expected, atol=0.05, rtol=0.02)


def test_reading_refuses_an_embedding_whose_tables_exceed_the_limit(tmp_path, monkeypatch):
    """docs/format.md: a reader refuses an embedding whose tables, r * (max d_in + max d_out), would exceed
    MAX_PROJECTION_ELEMENTS. Here 4 * (40 + 6) = 184, above every module's own A table (4 * 40 = 160)."""
    torch.manual_seed(0)
    model = attach(LM(), VeraConfig(r=4, target_modules=("tok", "mix")))
    path = tmp_path / "emb.safetensors"
    save_adapter(model, path)
    monkeypatch.setattr("verakit.fileformat.MAX_PROJECTION_ELEMENTS", 183)
    with pytest.raises(AdapterError, match=r"emb\.safetensors: embedding 'tok' needs projection tables of 184 "
                                           r"elements, above the limit of 183"):
        read_adapter(path)
    monkeypatch.setattr("verakit.fileformat.MAX_PROJECTION_ELEMENTS", 184)
    assert read_adapter(path).modules["tok"] == (6, 40, "embedding")
    # The same shapes without the embedding: only each module's A table is capped (160 for `tok`'s 40 columns).
    linear = tmp_path / "lin.safetensors"
    save_adapter(attach(nn.Sequential(nn.Linear(40, 6), nn.Linear(6, 6)), VeraConfig(r=4, target_modules=("0", "1"))),
                 linear)
    monkeypatch.setattr("verakit.fileformat.MAX_PROJECTION_ELEMENTS", 160)
    assert set(read_adapter(linear).modules) == {"0", "1"}

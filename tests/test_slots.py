"""Slot layers against slow references: per row, W0 + diag(b[s]) B diag(d[s]) A built from the spec,
forward and gradients (the tables as trainable Parameters), and per-slot heads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from verakit.projection import Projection, distribution_scale, unit_table
from verakit.slots import RowSlots, SlotHeadLinear, SlotLinear


def reference_weight(w0, d, b, r, seed=0, dist="kaiming_uniform"):
    """The rank-r layer's adapted weight (d_out, d_in) in float64, straight from the docs' formula."""
    d_out, d_in = w0.shape
    A = unit_table(seed, 0, dist, r, d_in).double() * distribution_scale(dist, d_in)
    B = unit_table(seed, 1, dist, d_out, r).double() * distribution_scale(dist, r)
    return w0.double() + torch.diag(b.double()) @ B @ torch.diag(d.double()) @ A


def _layer(slots=4, r=6, d_in=12, d_out=9, dist="kaiming_uniform", seed=3):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).requires_grad_(False)  # frozen, as AdapterBank leaves it
    rows = RowSlots()
    layer = SlotLinear(base, Projection(seed, dist, r, d_in, d_out), r, slots, rows, name="up")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # slot 0 stays zero: it is the base model
        layer.vera_d[1:].copy_(torch.randn(slots - 1, r, generator=g))
        layer.vera_b[1:].copy_(torch.randn(slots - 1, d_out, generator=g))
    return layer, rows


@pytest.mark.parametrize("dist", ["kaiming_uniform", "kaiming_normal", "uniform"])
def test_mixed_rows_match_per_row_reference(dist):
    layer, rows = _layer(dist=dist)
    ids = torch.tensor([2, 0, 1, 3, 2])
    x = torch.randn(5, 7, 12)  # (B, T, d_in)
    with torch.no_grad(), rows.use(ids):
        got = layer(x)
    for i, s in enumerate(ids.tolist()):
        w = reference_weight(layer.base.weight.detach(), layer.vera_d[s].detach(), layer.vera_b[s].detach(), 6, 3, dist)
        expected = F.linear(x[i].double(), w, layer.base.bias.double())
        torch.testing.assert_close(got[i].double(), expected, atol=1e-5, rtol=0)
    # slot-0 rows are exactly the base layer
    assert torch.equal(got[1], layer.base(x[1]))


def test_all_base_rows_skip_the_adapter_path_exactly(monkeypatch):
    """A batch of slot-0 rows never touches the projections (a serving bank's base-model requests cost the
    base forward alone), and gives the base output bit for bit."""
    layer, rows = _layer()
    x = torch.randn(3, 12)
    with rows.use(torch.zeros(3, dtype=torch.int64)):
        assert not rows.active
        monkeypatch.setattr(layer, "slices", lambda *a: pytest.fail("the adapter path ran for slot-0 rows"))
        assert torch.equal(layer(x), layer.base(x))
    with rows.use(torch.tensor([0, 2, 0])):  # one adapter row: the adapter path runs (and so would fail)
        assert rows.active
        with pytest.raises(pytest.fail.Exception, match="the adapter path ran"):
            layer(x)


def test_table_gradients_are_per_slot_sums_of_row_gradients():
    """Training many adapters in one batch: d[s], b[s] get the sum of their rows' gradients."""
    layer, rows = _layer(slots=5)
    layer.vera_d.requires_grad_(True)
    layer.vera_b.requires_grad_(True)
    ids = torch.tensor([1, 3, 1, 0, 3, 3])
    x = torch.randn(6, 4, 12)
    target = torch.randn(6, 4, 9)
    with rows.use(ids):
        loss = (layer(x) - target).pow(2).sum()
    loss.backward()

    w0, bias = layer.base.weight.detach(), layer.base.bias.detach()
    for s in range(5):
        d = layer.vera_d[s].detach().double().requires_grad_(True)
        b = layer.vera_b[s].detach().double().requires_grad_(True)
        picked = (ids == s).nonzero().squeeze(1)
        if picked.numel():
            w = reference_weight(w0, d, b, 6, 3)
            ref = (F.linear(x[picked].double(), w, bias.double()) - target[picked].double()).pow(2).sum()
            ref.backward()
        gd = d.grad if d.grad is not None else torch.zeros_like(d)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        if s in (0, 2, 4):  # slot 0 (d = b = 0) and unused slots get exactly zero
            assert not layer.vera_d.grad[s].any() and not layer.vera_b.grad[s].any()
        torch.testing.assert_close(layer.vera_d.grad[s].double(), gd, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(layer.vera_b.grad[s].double(), gb, atol=1e-4, rtol=1e-5)
    assert layer.base.weight.grad is None


def test_conv1d_base(tiny_gpt2):
    attn = tiny_gpt2.transformer.h[0].attn.c_attn  # Conv1D: weight (32, 96) = (d_in, d_out)
    rows = RowSlots()
    layer = SlotLinear(attn, Projection(0, "kaiming_uniform", 8, 32, 96), 8, 3, rows)
    with torch.no_grad():
        layer.vera_d[2].normal_()
        layer.vera_b[2].normal_()
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), rows.use(torch.tensor([2, 0])):
        got = layer(x)
    w = reference_weight(attn.weight.detach().t(), layer.vera_d[2], layer.vera_b[2], 8)
    torch.testing.assert_close(got[0].double(), F.linear(x[0].double(), w, attn.bias.double()), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], attn(x[1:2])[0], atol=1e-6, rtol=0)


def test_head_rows_use_their_slot_weights_and_train():
    torch.manual_seed(0)
    base = nn.Linear(10, 4)
    rows = RowSlots()
    head = SlotHeadLinear(base, 4, rows, name="classifier")
    assert torch.equal(head.weight[0], base.weight) and torch.equal(head.bias[0], base.bias)
    with torch.no_grad():
        head.weight[1:].normal_()
        head.bias[1:].normal_()
    ids = torch.tensor([3, 0, 1, 3, 1, 2])
    x = torch.randn(6, 10)
    head.weight.requires_grad_(True)
    with rows.use(ids):
        y = head(x)
    for i, s in enumerate(ids.tolist()):
        torch.testing.assert_close(y[i], F.linear(x[i], head.weight[s], head.bias[s]), atol=1e-6, rtol=0)
    y.sum().backward()
    # d(sum)/dW[s] = sum of the slot's rows of x, broadcast over outputs
    for s in range(4):
        expected = x[ids == s].sum(0).expand(4, 10)
        torch.testing.assert_close(head.weight.grad[s], expected, atol=1e-5, rtol=0)


def test_errors_name_the_layer():
    layer, rows = _layer()
    with pytest.raises(RuntimeError, match="SlotLinear 'up': no per-row slots"):
        layer(torch.randn(2, 12))
    with rows.use(torch.tensor([1, 2, 3])):
        with pytest.raises(ValueError, match="SlotLinear 'up': the batch has 2 rows but 3 slots"):
            layer(torch.randn(2, 12))
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with rows.use(torch.tensor([1])):
                pass
    with pytest.raises(ValueError, match="1-D int64"):
        with rows.use(torch.tensor([1.0])):
            pass
    with pytest.raises(ValueError, match="too small"):
        SlotLinear(nn.Linear(12, 9), Projection(0, "kaiming_uniform", 4, 12, 9), 6, 2, RowSlots(), name="x")
    with pytest.raises(TypeError, match="plain nn.Linear"):
        SlotHeadLinear(nn.LayerNorm(4), 2, RowSlots())


def test_dvora_scales_per_row_and_plain_rows_stay_bit_for_bit():
    """DVoRA slots: row i is s[slot] * ((W0 + delta[slot]) x) + bias with the slot's own scale s (d_out);
    plain slots (s = 1, the table's default) and slot 0 give exactly what they gave before the table."""
    layer, rows = _layer(slots=4)
    ids = torch.tensor([2, 0, 1, 3, 2, 1])
    x = torch.randn(6, 5, 12)
    with torch.no_grad(), rows.use(ids):
        plain = layer(x)
    assert layer.vera_s is None
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        table = layer.magnitude_table()
        assert table.shape == (4, 9) and bool((table == 1).all()) and not table.requires_grad
        table[2].copy_(torch.rand(9, generator=g) + 0.5)  # slot 2 is DVoRA; slots 1 and 3 stay plain VeRA
    with torch.no_grad(), rows.use(ids):
        got = layer(x)
    for i, s in enumerate(ids.tolist()):
        w = reference_weight(layer.base.weight.detach(), layer.vera_d[s].detach(), layer.vera_b[s].detach(), 6, 3)
        expected = F.linear(x[i].double(), w) * layer.vera_s[s].double() + layer.base.bias.double()
        torch.testing.assert_close(got[i].double(), expected, atol=1e-5, rtol=0)
    plain_rows = ids != 2
    assert torch.equal(got[plain_rows], plain[plain_rows])
    assert (got[0] - plain[0]).abs().max() > 1e-2  # the scale did change the DVoRA rows


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_every_slot_layer_kind_skips_the_adapter_for_slot_0_batches(kind, monkeypatch):
    """SlotLinear, SlotConv and SlotEmbedding: an all-slot-0 batch is the base forward alone (the projections are
    never sliced) and equal to it bit for bit; one adapter row in the batch changes that row only."""
    from verakit.layer import linear_shape
    from verakit.slots import slot_layer

    torch.manual_seed(0)
    base, x = {
        "linear": (nn.Linear(12, 9), torch.randn(3, 5, 12)),
        "conv": (nn.Conv2d(4, 6, 3, padding=1), torch.randn(3, 4, 7, 7)),
        "embedding": (nn.Embedding(20, 8), torch.randint(0, 20, (3, 5))),
    }[kind]
    base.requires_grad_(False)
    d_out, d_in = linear_shape(base)
    rows = RowSlots()
    layer = slot_layer(base, Projection(3, "kaiming_uniform", 6, d_in, d_out), 6, 3, rows, name=kind)
    with torch.no_grad():  # adapters in slots 1 and 2; slot 0 stays zero
        layer.vera_d[1:].normal_()
        layer.vera_b[1:].normal_()
    calls = []
    real = layer.slices
    monkeypatch.setattr(layer, "slices", lambda *a: calls.append(a) or real(*a))
    with torch.no_grad():
        with rows.use(torch.zeros(3, dtype=torch.int64)):
            assert torch.equal(layer(x), base(x))
        assert calls == []
        with rows.use(torch.tensor([0, 2, 0])):
            got = layer(x)
    assert len(calls) == 1
    assert torch.equal(got[[0, 2]], base(x)[[0, 2]]) and not torch.allclose(got[1], base(x)[1])


@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_dvora_scales_per_row_for_convolutions_and_embeddings(kind):
    """SlotConv (per output channel) and SlotEmbedding (per embedding dimension): a DVoRA row is
    s[slot] * (W0 x + delta x) + bias, from the same rows' plain answers; an embedding's padding positions
    keep the base's row; plain slots (s = 1) and slot 0 are bit for bit what they were before the table."""
    from verakit.layer import linear_shape
    from verakit.slots import slot_layer

    torch.manual_seed(0)
    base, x = {
        "conv": (nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.randn(4, 4, 5, 5)),
        "embedding": (nn.Embedding(20, 8, padding_idx=1), torch.randint(0, 20, (4, 5))),
    }[kind]
    if kind == "embedding":
        x[:, 0] = 1
    base.requires_grad_(False)
    d_out, d_in = linear_shape(base)
    rows = RowSlots()
    layer = slot_layer(base, Projection(3, "kaiming_uniform", 6, d_in, d_out), 6, 3, rows, name=kind)
    with torch.no_grad():
        layer.vera_d[1:].normal_()
        layer.vera_b[1:].normal_()
    ids = torch.tensor([2, 0, 1, 2])
    with torch.no_grad(), rows.use(ids):
        plain = layer(x)
    table = layer.magnitude_table()
    assert table.shape == (3, d_out) and bool((table == 1).all()) and not table.requires_grad
    with torch.no_grad():
        table[2].copy_(torch.rand(d_out, generator=torch.Generator().manual_seed(7)) + 0.5)  # slot 2: DVoRA
        with rows.use(ids):
            got = layer(x)
    s = table[2].double()
    for i in (0, 3):
        if kind == "conv":
            bias = base.bias.double().view(-1, 1, 1)
            want = s.view(-1, 1, 1) * (plain[i].double() - bias) + bias
        else:
            want = torch.where((x[i] == 1).unsqueeze(-1), base(x[i]).double(), s * plain[i].double())
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=1e-5)
        assert (got[i] - plain[i]).abs().max() > 1e-2
    assert torch.equal(got[1:3], plain[1:3])  # slot 0 and plain slot 1

"""VeraConv against a slow reference built from the spec with im2col (F.unfold), group by group.

The reference never reshapes a kernel: it multiplies unfolded input patches by A_sl and B_sl as a linear
layer would, so it checks the documented mapping (d_in = C_in/groups * prod(kernel), im2col order) too.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from verakit import VeraConfig, attach, load_adapter, merge, read_adapter, save_adapter, unmerge, vera_layers
from verakit.fileformat import AdapterError
from verakit.inject import AttachError, find_targets
from verakit.layer_conv import VeraConv, conv_adapter, parse_conv_kind
from verakit.merge import adapter_deltas, merged_state_dict
from verakit.projection import distribution_scale, unit_table


def reference_conv2d(conv, x, d, b, r, seed=0, dist="kaiming_uniform", x_adapter=None):
    """y = conv(x, W0) + per group g: b * (B_g (s d (A_sl patches_g(x)))) with patches from F.unfold."""
    c_out, c_in_g, *k = conv.weight.shape
    d_in = c_in_g * math.prod(k)
    A = unit_table(seed, 0, dist, r, d_in).double()
    B = unit_table(seed, 1, dist, c_out, r).double()
    s = distribution_scale(dist, d_in) * distribution_scale(dist, r)
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                 conv.stride, conv.padding, conv.dilation, conv.groups)
    xa = (x if x_adapter is None else x_adapter).double()
    g, per_out = conv.groups, c_out // conv.groups
    for j in range(g):
        xg = xa[:, j * c_in_g:(j + 1) * c_in_g]
        patches = F.unfold(xg, k, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)  # (N, d_in, L)
        u = A @ patches  # (N, r, L)
        rows = slice(j * per_out, (j + 1) * per_out)
        h = (B[rows] @ (s * d.double().unsqueeze(1) * u)) * b.double()[rows].unsqueeze(1)  # (N, per_out, L)
        y[:, rows] += h.view(*h.shape[:2], *y.shape[2:])
    return y


def rewrite_meta(src, dst, change):
    """Copy adapter file `src` to `dst` with `change(meta)` applied and the fingerprint recomputed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from verakit.fileformat import base_fingerprint

    with safe_open(src, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["verakit"])
    change(inner)
    base = inner["base"]
    base["fingerprint"] = base_fingerprint(base["model_type"], {n: tuple(v) for n, v in base["modules"].items()})
    meta["verakit"] = json.dumps(inner)
    save_file(tensors, dst, metadata=meta)
    return dst


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g))
        layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g))


class Wrap(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


CASES = {
    "plain": dict(in_channels=3, out_channels=8, kernel_size=3),
    "stride-pad-dilation": dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(2, 1), dilation=(1, 2)),
    "groups": dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6, bias=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_merge_and_factored_path_match_reference(case):
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(**CASES[case]))
    base = copy.deepcopy(model.conv)
    attach(model, VeraConfig(r=5, target_modules=("conv",), seed=0))
    layer = vera_layers(model)["conv"]
    c_out, c_in_g, kh, kw = base.weight.shape
    assert (layer.out_features, layer.in_features, layer.kind) == (c_out, c_in_g * kh * kw, f"conv:{kh}x{kw}")
    x = torch.randn(2, base.in_channels, 9, 10)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # identity at init: b = 0
    _randomize(layer)
    expected = reference_conv2d(base, x, layer.vera_d.detach(), layer.vera_b.detach(), 5).float()
    with torch.no_grad():
        cached = model(x)  # gradient-free: W0 + delta kept
        again = model(x)
        factored = base(x) + conv_adapter(base, x, *layer.slices(x.device, x.dtype), layer.vera_d * layer.scale, layer.vera_b)
        merge(model)
        merged = model(x)
        assert torch.allclose(layer.base.weight, base.weight + layer.weight_delta(layer.delta_weight(), layer.kind))
        unmerge(model)
    with_grad = model(x)  # d, b require grad: the delta built through autograd
    for got in (cached, again, factored, merged, with_grad):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(layer.base.weight, base.weight, atol=1e-6, rtol=0)


def test_gradients_of_d_and_b_match_reference():
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(6, 4, 3, padding=1, groups=2))
    base = copy.deepcopy(model.conv)
    attach(model, VeraConfig(r=3, target_modules=("conv",), d_initial=0.4))
    layer = vera_layers(model)["conv"]
    with torch.no_grad():
        layer.vera_b.normal_()
    x = torch.randn(2, 6, 5, 5)
    model(x).pow(2).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["conv.vera_d", "conv.vera_b"]
    d = layer.vera_d.detach().double().requires_grad_(True)
    b = layer.vera_b.detach().double().requires_grad_(True)
    reference_conv2d(base, x, d, b, 3).pow(2).sum().backward()
    torch.testing.assert_close(layer.vera_d.grad.double(), d.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.vera_b.grad.double(), b.grad, atol=1e-4, rtol=1e-5)


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(3, 4, 3))
    base = copy.deepcopy(model.conv)
    attach(model, VeraConfig(r=4, target_modules=("conv",), dropout=0.5))
    layer = vera_layers(model)["conv"]
    _randomize(layer)
    x = torch.randn(2, 3, 6, 6)
    model.train()
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    expected = reference_conv2d(base, x, layer.vera_d.detach(), layer.vera_b.detach(), 4, x_adapter=dropped)
    torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=0)
    model.eval()
    with torch.no_grad():
        ref = reference_conv2d(base, x, layer.vera_d, layer.vera_b, 4).float()
        torch.testing.assert_close(model(x), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 6, 5, padding=2, stride=2),
    nn.Conv1d(4, 6, 3, groups=2, padding="same", padding_mode="reflect"),
    nn.Conv3d(2, 3, (2, 3, 3), padding=1),
    nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"),
])
def test_other_dims_and_padding_modes_merge_exactly_and_factor_the_same(conv):
    """Conv1d/Conv3d and non-zero padding modes: the one-convolution forward, the factored form and the
    merged kernel agree; the kind names the kernel."""
    torch.manual_seed(0)
    model = Wrap(conv)
    base = copy.deepcopy(conv)
    attach(model, VeraConfig(r=4, target_modules=("conv",)))
    layer = vera_layers(model)["conv"]
    assert parse_conv_kind(layer.kind) == tuple(conv.kernel_size)
    assert layer.in_features == conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    _randomize(layer)
    x = torch.randn(2, conv.in_channels, *([7] * (conv.weight.dim() - 2)))
    with torch.no_grad():
        got = model(x)
        factored = base(x) + conv_adapter(base, x, *layer.slices(x.device, x.dtype), layer.vera_d * layer.scale, layer.vera_b)
        unbatched = model(x[0])
        merge(model)
        merged = model(x)
    torch.testing.assert_close(factored, got, atol=2e-5, rtol=0)
    torch.testing.assert_close(merged, got, atol=2e-5, rtol=0)
    torch.testing.assert_close(unbatched, got[0], atol=2e-5, rtol=0)
    assert not torch.allclose(got, base(x), atol=1e-3)  # the adapter does act


def test_scale_follows_the_linear_rule_with_fan_in_d_in():
    layer = VeraConv(nn.Conv2d(8, 4, 3, groups=2), *_proj(r=6, d_in=36, d_out=4), d_initial=0.1)
    assert layer.scale == pytest.approx(math.sqrt(6 / 36) * math.sqrt(6 / 6))


def _proj(r, d_in, d_out):
    from verakit.projection import Projection

    return Projection(0, "kaiming_uniform", r, d_in, d_out), r


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(8, 16, 1))
        self.proj = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        h = self.block(self.stem(x)).mean((2, 3))
        return self.classifier(self.proj(h))


def test_all_conv_picks_every_conv_and_all_linear_none():
    model = CNN()
    cfg = VeraConfig(r=4, target_modules="all-conv", modules_to_save=("classifier",))
    assert list(find_targets(model, cfg)) == ["stem", "block.0", "block.2"]
    assert "stem" not in find_targets(model, VeraConfig(r=4, target_modules="all-linear"))
    assert list(find_targets(model, VeraConfig(r=4, target_modules=("stem", "proj")))) == ["stem", "proj"]
    assert list(find_targets(model, VeraConfig(r=4, target_modules=r"block\.\d"))) == ["block.0", "block.2"]
    assert VeraConfig(target_modules=["all-conv"]).target_modules == "all-conv"  # a CLI's comma list
    with pytest.raises(AttachError, match="'all-conv' matched no convolution"):
        find_targets(nn.Sequential(nn.Linear(2, 2)), VeraConfig(r=4, target_modules="all-conv"))
    with pytest.raises(AttachError, match="both VeRA targets and inside modules_to_save"):
        find_targets(model, VeraConfig(r=4, target_modules=("stem",)), saved=("stem",))


def test_file_round_trip_and_pure_merge_match_the_live_model(tmp_path):
    torch.manual_seed(0)
    model = CNN().eval()
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=6, target_modules="all-conv", modules_to_save=("classifier",)))
    for layer in vera_layers(model).values():
        _randomize(layer)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "cnn.safetensors"
    save_adapter(model, path)
    ad = read_adapter(path)
    assert ad.modules == {"stem": (8, 27, "conv:3x3"), "block.0": (8, 18, "conv:3x3"), "block.2": (16, 8, "conv:1x1")}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert '"format_version":2' in f.metadata()["verakit"]
    with torch.no_grad():
        expected = model(x)
        fresh = load_adapter(copy.deepcopy(base), path)
        assert torch.equal(fresh(x), expected)
        sd = merged_state_dict(base.state_dict(), ad)
        merged = copy.deepcopy(base)
        merged.load_state_dict(sd)
        torch.testing.assert_close(merged(x), expected, atol=2e-5, rtol=0)
        merge(model)
        for name, delta in adapter_deltas(ad).items():
            torch.testing.assert_close(vera_layers(model)[name].base.weight, base.get_submodule(name).weight + delta)


def test_bad_conv_kinds_are_refused(tmp_path):
    torch.manual_seed(0)
    model = attach(CNN(), VeraConfig(r=4, target_modules=("stem",)))
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    for change, fault in [
        (lambda m: m["base"]["modules"]["stem"].__setitem__(2, "conv:4x4"), "d_in 27 is not a multiple of the kernel's 16"),
        (lambda m: m["base"]["modules"]["stem"].__setitem__(2, "conv:3x0"), "unknown module kind 'conv:3x0'"),
        (lambda m: m.__setitem__("format_version", 1), "kind 'conv:3x3', which format version 1 does not have"),
    ]:
        bad = rewrite_meta(path, tmp_path / "bad.safetensors", change)
        with pytest.raises(AdapterError, match=fault):
            read_adapter(bad)


class Mixed(nn.Module):
    """Token embedding -> 1-d convolution over the sequence -> image-like 2-d convolution -> linear head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 6, padding_idx=0)
        self.seq = nn.Conv1d(6, 8, 3, padding=1, groups=2)
        self.img = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Linear(8 + 4, 5)

    def forward(self, ids):
        h = self.seq(self.tok(ids).transpose(1, 2))  # (N, 8, T)
        g = self.img(h.unsqueeze(1)).mean((2, 3))  # (N, 4)
        return self.out(torch.cat([h.mean(2), g], 1))


@pytest.mark.parametrize("bank_rank", [6, 9])
def test_bank_mixed_batch_over_conv_and_embedding_equals_each_adapter_alone(tmp_path, bank_rank):
    from verakit.serve import AdapterBank

    torch.manual_seed(0)
    base = Mixed().eval()
    targets = ("tok", "seq", "img", "out")
    paths = {}
    for i, r in enumerate((6, 3, bank_rank)):
        model = attach(copy.deepcopy(base), VeraConfig(r=r, target_modules=targets))
        for layer in vera_layers(model).values():
            _randomize(layer, seed=10 + i)
        paths[f"a{i}"] = tmp_path / f"a{i}.safetensors"
        save_adapter(model, paths[f"a{i}"])
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=bank_rank, target_modules=targets)), capacity=3)
    assert {n: type(ly).__name__ for n, ly in bank.layers.items()} == {
        "tok": "SlotEmbedding", "seq": "SlotConv", "img": "SlotConv", "out": "SlotLinear"}
    for name, path in paths.items():
        bank.add(name, path)
    names = ["a1", None, "a0", "a2", "a1"]
    ids = torch.randint(0, 30, (5, 7))
    ids[:, -2:] = 0  # padding
    with torch.no_grad():
        got = bank.forward(names, ids)
        for i, name in enumerate(names):
            alone = copy.deepcopy(base) if name is None else load_adapter(copy.deepcopy(base), paths[name])
            torch.testing.assert_close(got[i], alone(ids[i : i + 1])[0], atol=2e-5, rtol=0)
        assert not torch.allclose(got[0], base(ids[:1])[0], atol=1e-3)
    exported = bank.export("a0")
    assert exported.modules["tok"] == (6, 30, "embedding:pad=0") and exported.modules["img"] == (4, 9, "conv:3x3")


def test_bf16_base_runs_and_merges_close_to_fp32():
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    attach(model, VeraConfig(r=4, target_modules=("conv",)))
    _randomize(vera_layers(model)["conv"])
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
        model.conv.base.to(torch.bfloat16)
        got = model(x.bfloat16())
        merge(model)
        merged = model(x.bfloat16())
    assert got.dtype == merged.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.02)
    torch.testing.assert_close(merged.float(), expected, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("case,size,factored", [
    ("plain", (2, 2), True),  # widened below to 24 -> 64 channels, padding 1: 2 x 4 x (216 + 64) < 64 x 216
    ("groups", (2, 2), True),  # 64 -> 64 channels in 2 groups: 2 x 4 x (2 x 288 + 64) < 64 x 288
    ("stride-pad-dilation", (40, 40), False),  # 6 x 24 kernel, 2 x 400 positions: the kernel is cheaper
])
def test_training_paths_match_the_reference(case, size, factored):
    """A training step takes the factored path where it costs less (small feature maps) and builds the delta
    kernel otherwise; both give the reference's outputs and gradients of d and b."""
    torch.manual_seed(0)
    kw = dict(CASES[case], **({"padding": 1} if case == "plain" else {}))
    wide = dict(kw, out_channels=64, in_channels=kw["in_channels"] * 8) if factored else kw
    model = Wrap(nn.Conv2d(**wide))
    base = copy.deepcopy(model.conv)
    attach(model, VeraConfig(r=6, target_modules=("conv",)))
    layer = vera_layers(model)["conv"]
    _randomize(layer)
    x = torch.randn(2, base.in_channels, *size)
    assert layer.factored_for(x) is factored
    model(x).pow(2).sum().backward()
    d = layer.vera_d.detach().double().requires_grad_(True)
    b = layer.vera_b.detach().double().requires_grad_(True)
    want = reference_conv2d(base.double(), x.double(), d, b, 6)
    want.pow(2).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), want.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.vera_d.grad.double(), d.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer.vera_b.grad.double(), b.grad, atol=1e-3, rtol=1e-4)


def test_factored_choice_counts_output_positions():
    """1x1 and 2x2 feature maps of a 512-channel 3x3 convolution (a ResNet's last stage, batch 32) take the
    factored path; 32x32 maps build the kernel."""
    layer = vera_layers(attach(Wrap(nn.Conv2d(512, 512, 3, padding=1)), VeraConfig(r=256, target_modules=("conv",))))["conv"]
    assert layer.factored_for(torch.empty(32, 512, 1, 1)) and layer.factored_for(torch.empty(32, 512, 2, 2))
    assert not layer.factored_for(torch.empty(32, 512, 32, 32))
    strided = vera_layers(attach(Wrap(nn.Conv2d(512, 512, 3, stride=8)), VeraConfig(r=8, target_modules=("conv",))))["conv"]
    assert strided.factored_for(torch.empty(8, 512, 17, 17))  # 2x2 output positions after stride 8, no padding

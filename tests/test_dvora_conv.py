"""DVoRA on convolutions (VeraConv with VeraConfig.magnitude): against a by-hand float64 reference and PEFT's DoRA.

Definition (PEFT's _DoraConvNdLayer): W' = m * W / ||W|| per output channel, W = W0 + delta as a kernel, the
norm over (C_in/groups, *kernel), a constant in backward; y = conv(x, W') + bias (the bias not rescaled).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from verakit import (
    VeraConfig,
    attach,
    load_adapter,
    merge,
    ops,
    read_adapter,
    save_adapter,
    unmerge,
    vera_layers,
)
from verakit.layer_conv import VeraConv
from verakit.merge import merged_state_dict
from verakit.projection import Projection

R = 6
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# Groups, dilation, stride + padding + no bias, Conv1d with groups and stride, a Conv3d.
CONFIGS = {
    "groups": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
    "dilation": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "stride-padding": lambda: nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), bias=False),
    "conv1d": lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2),
    "conv3d": lambda: nn.Conv3d(2, 4, (2, 3, 1), padding=(1, 1, 0)),  # and a Conv3d, VeraConv's third kind
}


def _layer(make, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    base = make().requires_grad_(False)
    layer = VeraConv(base, Projection(3, "kaiming_uniform", R, 64, 64), R, 0.1, dropout=dropout, magnitude=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.vera_d.copy_(torch.randn(R, generator=g))
        layer.vera_b.copy_(torch.randn(layer.out_features, generator=g) * 0.3)
        layer.vera_m.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g))
    return layer


def _input(layer, size, batch=2, seed=0):
    n = len(layer.kernel)
    return torch.randn(batch, layer.base.in_channels, *([size] * n), generator=torch.Generator().manual_seed(seed))


def reference(layer, x, d, b, m, x_adapter=None):
    """float64 by hand: W = W0 + (diag(b) B_sl diag(s d) A_sl).reshape(kernel); W' = m W / ||W||.detach()
    per output channel; y = conv(x, W') + bias; with x_adapter (dropout): scale * (conv(x, W0) +
    conv(x_adapter, delta)) + bias."""
    base = layer.base
    A, B = (t.double() for t in layer.slices(torch.device("cpu"), torch.float32))
    delta = ((b.unsqueeze(1) * B) @ ((d * layer.scale).unsqueeze(1) * A)).reshape(base.weight.shape)
    W = base.weight.double() + delta
    norm = W.detach().flatten(1).norm(dim=1)  # over (C_in/groups, *kernel): the constant of backward
    per_channel = (-1, *([1] * len(layer.kernel)))  # over an output's spatial dims
    scale = m / norm
    conv = _CONV[len(layer.kernel)]
    kw = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
    if x_adapter is None:
        y = conv(x.double(), scale.view(-1, *([1] * (W.dim() - 1))) * W, **kw)
    else:
        y = scale.view(per_channel) * (conv(x.double(), base.weight.double(), **kw) + conv(x_adapter.double(), delta, **kw))
    return y if base.bias is None else y + base.bias.double().view(per_channel)


def _ref_vectors(layer):
    return [p.detach().double().clone().requires_grad_(True) for p in (layer.vera_d, layer.vera_b, layer.vera_m)]


@pytest.mark.parametrize("config", CONFIGS)
def test_identity_at_init_and_m_starts_at_channel_norms(config, monkeypatch):
    torch.manual_seed(0)
    base = CONFIGS[config]().requires_grad_(False)
    layer = VeraConv(base, Projection(3, "kaiming_uniform", R, 64, 64), R, 0.1, magnitude=True)
    torch.testing.assert_close(layer.vera_m, base.weight.flatten(1).norm(dim=1), rtol=1e-6, atol=0)
    assert layer.vera_m.dtype == torch.float32 and layer.vera_m.shape == (base.out_channels,)
    for factored in (True, False):  # both paths with gradients (forced); cached without
        monkeypatch.setattr(layer, "factored_for", lambda x, f=factored: f)
        x = _input(layer, 7)
        assert torch.equal(layer(x), base(x))
        with torch.no_grad():
            assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_and_gradients_match_the_reference_on_every_path(config, monkeypatch):
    """Factored and kernel paths with gradients (each forced, whatever the cost model picks for these
    shapes), the cached path without, and the dropout path (the adapter sees dropout(x)): outputs and the
    gradients of d, b and m equal the float64 formula."""
    layer = _layer(CONFIGS[config])
    for factored, size in ((True, 5), (False, 11)):
        monkeypatch.setattr(layer, "factored_for", lambda x, f=factored: f)
        x = _input(layer, size, seed=size)
        d, b, m = _ref_vectors(layer)
        want = reference(layer, x, d, b, m)
        got = layer(x)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
        g = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
        got.backward(g)
        want.backward(g.double())
        for ours, theirs in zip((layer.vera_d, layer.vera_b, layer.vera_m), (d, b, m), strict=True):
            torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)
            ours.grad = None
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), want.detach(), rtol=0, atol=2e-5)
    drop = _layer(CONFIGS[config], dropout=0.3).train()
    x = _input(drop, 9)
    torch.manual_seed(11)
    got = drop(x)
    torch.manual_seed(11)
    x_adapter = nn.Dropout(0.3)(x)  # the same draw the layer made
    d, b, m = _ref_vectors(drop)
    torch.testing.assert_close(got.double(), reference(drop, x, d, b, m, x_adapter), rtol=0, atol=2e-5)


def test_unbatched_input_and_gradient_free_cache():
    layer = _layer(CONFIGS["groups"])
    x = _input(layer, 8)
    with torch.no_grad():
        y = layer(x)
        assert layer._cache is not None and layer._cache.scale is not None
        cached = layer._cache.weight
        assert torch.equal(layer(x[0]), y[0])  # unbatched (C_in, H, W)
        assert layer._cache.weight is cached  # reused: nothing changed
        layer.vera_m.mul_(2.0)
        y2 = layer(x)
        assert layer._cache.weight is not cached  # m changed: rebuilt
    bias = layer.base.bias.view(-1, 1, 1)
    torch.testing.assert_close(y2 - bias, 2 * (y - bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_merge_equals_unmerged_and_unmerge_restores_w0(config):
    layer = _layer(CONFIGS[config])
    x = _input(layer, 10)
    w0 = layer.base.weight.clone()
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        got = layer(x)
        layer.merge()  # idempotent
    assert layer.merged and not torch.equal(layer.base.weight, w0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)


def check_merge_refusals(layer, at, match):
    """A zero scale at index `at` refuses merge (naming the layer and the index, nothing changed); a vector
    changed while merged refuses unmerge. Shared with tests/test_dvora_embedding.py."""
    w0 = layer.base.weight.clone()
    with torch.no_grad():
        layer.vera_m[at] = 0.0
    with pytest.raises(RuntimeError, match=match):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)
    with torch.no_grad():
        layer.vera_m[at] = 1.0
    layer.merge()
    with torch.no_grad():
        layer.vera_d.add_(0.1)
    with pytest.raises(RuntimeError, match="modified while merged"):
        layer.unmerge()


def test_merge_refusals_zero_scale_and_vectors_changed_while_merged():
    check_merge_refusals(_layer(CONFIGS["dilation"]), 2, r"convolution \(6, 4, 3, 3\).*zero at output channels \[2\]")


def test_parity_with_peft_dora_conv(monkeypatch):
    """PEFT's LoRA+DoRA conv with lora_A = (diag(s d) A_sl).reshape(r, C_in, *kernel), lora_B = diag(b) B_sl as
    a 1x1 convolution (scaling 1) and magnitude m is DVoRA by definition: outputs and m's gradient agree.
    PEFT's lora_A has the base's stride and padding but neither its dilation nor its groups, so the parity
    covers groups=1, dilation=1 convolutions (the others: the by-hand reference above)."""
    peft = pytest.importorskip("peft")
    makers = {"conv2d": lambda: nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0)),
              "conv1d": lambda: nn.Conv1d(5, 7, 3, stride=1, padding=1)}
    for name, make in makers.items():
        layer = _layer(make)
        n = len(layer.kernel)
        A, B = layer.slices(torch.device("cpu"), torch.float32)
        F_A, F_B = ops.delta_factors(A, B, layer.vera_d.detach(), layer.vera_b.detach(), layer.scale)
        net = nn.Sequential(make())
        net[0].load_state_dict(layer.base.state_dict())
        cfg = peft.LoraConfig(r=R, lora_alpha=R, target_modules=["0"], use_dora=True, init_lora_weights=False)
        model = peft.get_peft_model(net, cfg)
        lora = model.base_model.model[0]
        mag = lora.lora_magnitude_vector["default"].weight
        assert mag.numel() == layer.out_features  # PEFT's m: one per output channel, as ours
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(F_A.reshape(R, -1, *layer.kernel))
            lora.lora_B["default"].weight.copy_(F_B.reshape(*F_B.shape, *([1] * n)))
            mag.copy_(layer.vera_m.view(mag.shape))
        for factored in (True, False):  # our factored and kernel paths, forced
            monkeypatch.setattr(layer, "factored_for", lambda x, f=factored: f)
            x = _input(layer, 9, seed=int(factored))
            ours, theirs = layer(x), model(x)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)
            ours.sum().backward()
            theirs.sum().backward()
            torch.testing.assert_close(layer.vera_m.grad, mag.grad.flatten(), rtol=1e-5, atol=1e-4, msg=name)
            layer.vera_m.grad = mag.grad = None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.seq = nn.Conv1d(8, 6, 3, stride=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.dw(self.conv(x).relu()).relu()  # (N, 8, H, W)
        h = self.seq(h.flatten(2)).relu()  # (N, 6, L)
        return self.head(h.mean(-1))


def _trained_net(tmp_path):
    torch.manual_seed(0)
    base = _Net()
    model = attach(copy.deepcopy(base), VeraConfig(r=R, target_modules="all-conv", magnitude=True))
    layers = vera_layers(model)
    assert set(layers) == {"conv", "dw", "seq"} and all(ly.vera_m is not None for ly in layers.values())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ly in layers.values():
            ly.vera_d.copy_(torch.randn(R, generator=g))
            ly.vera_b.copy_(torch.randn(ly.out_features, generator=g) * 0.3)
            ly.vera_m.mul_(1 + 0.3 * torch.randn(ly.out_features, generator=g))
    path = tmp_path / "dvora_conv.safetensors"
    save_adapter(model, path)
    return base, model, path


def test_all_conv_model_trains_saves_loads_and_merges(tmp_path):
    """End to end through attach: m trains (one optimizer step moves the loss), the file carries m per conv
    module (C_out floats), a fresh model loads the same function, and merged_state_dict of the file
    equals the live merge."""
    base, model, path = _trained_net(tmp_path)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    ad = read_adapter(path)
    assert ad.config.magnitude and {n: tuple(t.shape) for n, t in ad.m.items()} == {"conv": (8,), "dw": (8,), "seq": (6,)}
    with torch.no_grad():
        want, plain = model(x), base(x)
        fresh = load_adapter(copy.deepcopy(base), path)
        assert torch.equal(fresh(x), want) and (want - plain).abs().max() > 1e-2
    merged = merged_state_dict(base.state_dict(), ad)
    merge(model)
    live = {n: ly.base.weight for n, ly in vera_layers(model).items()}
    for n, w in live.items():
        torch.testing.assert_close(merged[f"{n}.weight"], w, rtol=0, atol=1e-6)
    plain_net = copy.deepcopy(base)
    plain_net.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain_net(x), want, rtol=0, atol=1e-5)
    unmerge(model)
    opt = torch.optim.SGD([ly.vera_m for ly in vera_layers(model).values()], lr=0.1)
    loss = model(x).pow(2).sum()
    loss.backward()
    opt.step()
    assert model(x).pow(2).sum() < loss


def test_file_with_a_wrong_magnitude_length_is_refused(tmp_path):
    """The reader checks each module's m against its d_out (a convolution's C_out)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from verakit.fileformat import AdapterError

    _, _, path = _trained_net(tmp_path)
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["dw.vera_m"] = tensors["dw.vera_m"][:4].clone()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(AdapterError, match=r"tensor 'dw.vera_m' has shape \(4,\), expected \(8,\)"):
        read_adapter(bad)

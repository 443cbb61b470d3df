"""VeraLinear against a slow reference: W0 + diag(b) B diag(d) A built independently from the spec."""

import copy

import pytest
import torch
from torch import nn

from helpers import randomize_vectors
from verakit import VeraConfig, attach, merge, trainable_parameters, unmerge, vera_layers
from verakit.projection import distribution_scale, unit_table


def reference_weight(w0, d, b, r, seed=0, dist="kaiming_uniform"):
    """Slow reference for an nn.Linear weight (d_out, d_in): the formula straight from the docs."""
    d_out, d_in = w0.shape
    A = unit_table(seed, 0, dist, r, d_in).double() * distribution_scale(dist, d_in)
    B = unit_table(seed, 1, dist, d_out, r).double() * distribution_scale(dist, r)
    return w0.double() + torch.diag(b.double()) @ B @ torch.diag(d.double()) @ A


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.act = nn.GELU()
        self.down = nn.Linear(20, 7)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("dist", ["kaiming_uniform", "kaiming_normal", "uniform"])
def test_wrapper_and_merge_match_reference(dist):
    torch.manual_seed(0)
    model = MLP()
    ref = copy.deepcopy(model)
    attach(model, VeraConfig(r=9, target_modules=("up", "down"), distribution=dist, seed=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g))
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g))
        for name in ("up", "down"):
            layer = vera_layers(model)[name]
            getattr(ref, name).weight.copy_(
                reference_weight(getattr(ref, name).weight, layer.vera_d, layer.vera_b, 9, 3, dist).float()
            )
    x = torch.randn(5, 3, 12)
    with torch.no_grad():
        expected = ref(x)
        got = model(x)
        merge(model)
        merged = model(x)
        unmerge(model)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)


def test_gradients_only_on_vectors_and_match_reference():
    torch.manual_seed(0)
    model = MLP()
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=6, target_modules=("up",), d_initial=0.3))
    layer = vera_layers(model)["up"]
    with torch.no_grad():
        layer.vera_b.normal_()
    x = torch.randn(4, 12)
    model(x).pow(2).sum().backward()
    named = dict(model.named_parameters())
    with_grad = sorted(n for n, p in named.items() if p.grad is not None)
    assert with_grad == ["up.vera_b", "up.vera_d"]
    assert [n for n, _ in trainable_parameters(model)] == ["up.vera_d", "up.vera_b"]

    d = layer.vera_d.detach().clone().double().requires_grad_(True)
    b = layer.vera_b.detach().clone().double().requires_grad_(True)
    w = reference_weight(base.up.weight.detach(), d, b, 6)
    h = torch.nn.functional.linear(x.double(), w, base.up.bias.double())
    out = torch.nn.functional.linear(base.act(h), base.down.weight.double(), base.down.bias.double())
    out.pow(2).sum().backward()
    torch.testing.assert_close(layer.vera_d.grad.double(), d.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.vera_b.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def test_init_is_identity_and_d_initial():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(3, 12)
    before = model(x)
    attach(model, VeraConfig(r=4, target_modules=("up", "down"), d_initial=0.25))
    assert torch.equal(model(x), before)
    layer = vera_layers(model)["down"]
    assert torch.equal(layer.vera_d, torch.full((4,), 0.25)) and torch.equal(layer.vera_b, torch.zeros(7))


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_base(dtype, atol):
    torch.manual_seed(0)
    model = MLP()
    attach(model, VeraConfig(r=8, target_modules=("up", "down")))
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.normal_(std=0.5)
    x = torch.randn(6, 12)
    expected = model(x)
    model.to(dtype)
    # vectors are cast with the model here; they keep their role and values
    out = model(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)


def test_conv1d_matches_reference(tiny_gpt2):
    """GPT-2 stores weights as (d_in, d_out); the wrapper must transpose consistently."""
    model = tiny_gpt2
    x = torch.randint(0, 97, (2, 10))
    w0 = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (32, 96)
    attach(model, VeraConfig(r=8, target_modules=("c_attn", "c_proj")))
    randomize_vectors(model, std=0.3)
    layer = vera_layers(model)["transformer.h.0.attn.c_attn"]
    assert (layer.out_features, layer.in_features) == (96, 32) and layer.transposed
    with torch.no_grad():
        a = model(x).logits
        merge(model)
        b = model(x).logits
        merged_w = layer.base.weight.detach().clone()
        unmerge(model)
    expected = reference_weight(w0.t(), layer.vera_d.detach(), layer.vera_b.detach(), 8).t()
    torch.testing.assert_close(merged_w.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_unmerge_refuses_after_vector_change():
    model = MLP()
    attach(model, VeraConfig(r=4, target_modules=("up",)))
    merge(model)
    with torch.no_grad():
        vera_layers(model)["up"].vera_b.add_(1.0)
    with pytest.raises(RuntimeError, match="modified while merged"):
        unmerge(model)

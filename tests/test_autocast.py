"""VeraLinear under bf16 autocast (`verakit train --mixed-precision bf16`): the same values as a plain
autograd reference run under the same autocast, every matrix product of forward and backward in bf16,
and nothing changed outside autocast."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from verakit import VeraConfig, attach, vera_layers


class _MatmulDtypes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
            self.seen.append(tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def _layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 40))
    for p in model.parameters():
        p.requires_grad_(False)
    attach(model, VeraConfig(r=64, target_modules=("0",), d_initial=0.5))
    with torch.no_grad():
        layer = vera_layers(model)["0"]
        layer.vera_b.normal_()  # a visible delta
    return model


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """h = W0 x + bias + b * (B_sl (scale d * (A_sl x))) by plain autograd, under the caller's autocast."""
    layer = vera_layers(model)["0"]
    A, B = layer.slices(x.device, torch.float32)
    u = nn.functional.linear(x, A)
    h = nn.functional.linear(u * (layer.vera_d * layer.scale), B)
    return nn.functional.linear(x, layer.base.weight, layer.base.bias) + h * layer.vera_b


def test_autocast_matches_the_reference_and_runs_every_product_in_bf16():
    ours, ref = _layer(), _layer()
    x = torch.randn(5, 7, 48)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    log = _MatmulDtypes()
    with log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(xa)
        y.float().square().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = _reference(ref, xb)
    y_ref.float().square().sum().backward()
    assert log.seen
    assert all(set(dtypes) == {"torch.bfloat16"} for dtypes in log.seen), log.seen  # backward included
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    la, lb = vera_layers(ours)["0"], vera_layers(ref)["0"]
    for got, want in ((la.vera_d.grad, lb.vera_d.grad), (la.vera_b.grad, lb.vera_b.grad), (xa.grad, xb.grad)):
        assert got.dtype == want.dtype
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 2e-2, float(rel)


def test_without_autocast_nothing_changes():
    model = _layer()
    x = torch.randn(4, 48, requires_grad=True)
    log = _MatmulDtypes()
    with log:
        model(x).sum().backward()
    assert all(set(dtypes) == {"torch.float32"} for dtypes in log.seen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model, x), rtol=1e-5, atol=1e-5)

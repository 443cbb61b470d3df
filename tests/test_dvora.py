"""DVoRA (VeraConfig.magnitude): VeraLinear against an explicit W' = m * W / ||W|| built in the test.

W = W0 + diag(b) B_sl diag(s d) A_sl in float64 from the layer's tables; the norm is per output row and,
as the DoRA paper recommends (and the layer implements), a constant in backward.
"""

import pytest
import torch
from torch import nn

from verakit import (
    VeraConfig,
    attach,
    load_adapter,
    merge,
    ops,
    read_adapter,
    save_adapter,
    trainable_parameters,
    vera_layers,
)
from verakit.layer import VeraLinear
from verakit.layer_plan import Path, plan_forward
from verakit.merge import merged_state_dict
from verakit.projection import Projection

D_IN, D_OUT, R = 24, 20, 8


def _layer(bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=bias).to(dtype)
    base.requires_grad_(False)
    layer = VeraLinear(base, Projection(3, "kaiming_uniform", R, D_IN, D_OUT), R, 0.1, magnitude=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.vera_d.copy_(torch.randn(R, generator=g))
        layer.vera_b.copy_(torch.randn(D_OUT, generator=g) * 0.3)
        layer.vera_m.mul_(1 + 0.2 * torch.randn(D_OUT, generator=g))
    return layer


def _reference(layer, x, d, b, m):
    """float64 W' x + bias with W' = m * W / ||W||.detach(), W = W0 + diag(b) B diag(s d) A."""
    A, B = (t.double() for t in layer.slices(torch.device("cpu"), torch.float32))
    W = layer.base.weight.double() + (b.unsqueeze(1) * B) @ ((d * layer.scale).unsqueeze(1) * A)
    norm = W.detach().norm(dim=1)  # the constant of backward
    Wp = (m / norm).unsqueeze(1) * W
    y = x.double() @ Wp.t()
    return y if layer.base.bias is None else y + layer.base.bias.double()


def _ref_vectors(layer):
    return [p.detach().double().clone().requires_grad_(True) for p in (layer.vera_d, layer.vera_b, layer.vera_m)]


def test_identity_at_init_and_m_starts_at_row_norms():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = VeraLinear(base, Projection(3, "kaiming_uniform", R, D_IN, D_OUT), R, 0.1, magnitude=True)
    assert layer.vera_m.dtype == torch.float32 and layer.vera_m.shape == (D_OUT,)
    torch.testing.assert_close(layer.vera_m.detach(), base.weight.detach().norm(dim=1), rtol=0, atol=0)
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.vera_d.normal_()  # b is still zero: delta = 0, scale = 1 exactly
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    plain = VeraLinear(nn.Linear(D_IN, D_OUT), Projection(3, "kaiming_uniform", R, D_IN, D_OUT), R, 0.1)
    assert plain.vera_m is None and "vera_m" not in plain.state_dict()
    assert "vera_m" in layer.state_dict()


@pytest.mark.parametrize("tokens,path", [(2, Path.FACTORED), (512, Path.MATERIALIZED)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_explicit_weight(tokens, path, bias):
    layer = _layer(bias)
    x = torch.randn(tokens, D_IN, generator=torch.Generator().manual_seed(7), requires_grad=True)
    assert plan_forward(layer.call_facts(x)).path is path
    y = layer(x)
    d, b, m = _ref_vectors(layer)
    x64 = x.detach().double().requires_grad_(True)
    ref = _reference(layer, x64, d, b, m)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8))
    (y * up).sum().backward()
    (ref * up.double()).sum().backward()
    for got, want in ((layer.vera_d.grad, d.grad), (layer.vera_b.grad, b.grad), (layer.vera_m.grad, m.grad),
                      (x.grad, x64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert layer.base.weight.grad is None


def test_gradient_free_paths_and_cache_follow_the_vectors():
    layer = _layer()
    few, many = torch.randn(2, D_IN), torch.randn(300, D_IN)
    with torch.no_grad():
        for x in (few, many, many):  # factored, then the cached W' once it pays
            ref = _reference(layer, x, *(p.double() for p in (layer.vera_d, layer.vera_b, layer.vera_m)))
            torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=1e-5)
        assert plan_forward(layer.call_facts(many)).path is Path.CACHED
        layer.vera_m.mul_(2.0)  # in place: the cached W' and scale must be rebuilt
        for x in (many, few):  # the cached W', then the factored path with the cached scale
            ref = _reference(layer, x, *(p.double() for p in (layer.vera_d, layer.vera_b, layer.vera_m)))
            torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=1e-5)


def test_conv1d_layout_matches_linear():
    """transformers' Conv1D keeps (d_in, d_out): the norm runs over each output's d_in inputs all the same."""
    lin = _layer()

    class Conv1D(nn.Module):
        def __init__(self, w, bias):
            super().__init__()
            self.nf = w.shape[0]
            self.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
            self.bias = nn.Parameter(bias.clone(), requires_grad=False)

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)

    conv = VeraLinear(Conv1D(lin.base.weight.detach(), lin.base.bias.detach()),
                      Projection(3, "kaiming_uniform", R, D_IN, D_OUT), R, 0.1, magnitude=True)
    assert conv.transposed
    torch.testing.assert_close(conv.vera_m, lin.base.weight.norm(dim=1), rtol=1e-6, atol=0)  # W0's rows, not columns
    conv.load_state_dict({k: v for k, v in lin.state_dict().items() if k.startswith("vera_")}, strict=False)
    for tokens in (2, 512):
        x = torch.randn(tokens, D_IN)
        torch.testing.assert_close(conv(x), lin(x), rtol=0, atol=1e-5)
    x = torch.randn(5, D_IN)
    before = conv(x).detach()
    conv.merge()
    torch.testing.assert_close(conv(x), before, rtol=0, atol=1e-5)
    conv.unmerge()
    torch.testing.assert_close(conv.base.weight.t(), lin.base.weight, rtol=0, atol=1e-6)


def test_merge_is_exact_and_unmerge_restores_w0():
    layer = _layer()
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        want = layer(x)
        ref = _reference(layer, x, *(p.double() for p in (layer.vera_d, layer.vera_b, layer.vera_m)))
        layer.merge()
        assert layer.merged and plan_forward(layer.call_facts(x)).path is Path.MERGED
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=1e-5)
        # The merged rows have norm m: the decomposition's definition.
        torch.testing.assert_close(layer.base.weight.norm(dim=1), layer.vera_m, rtol=1e-5, atol=0)
        layer.merge()  # idempotent
        layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)  # float32 rounding of W'/s - delta
    assert layer._merged_scale is None
    with torch.no_grad():
        layer.merge()
        layer.vera_m.add_(1.0)
    with pytest.raises(RuntimeError, match="modified while merged"):
        layer.unmerge()


def test_merge_refuses_a_zero_scale_row():
    layer = _layer()
    with torch.no_grad():
        layer.vera_m[3] = 0.0
    with pytest.raises(RuntimeError, match=r"zero at output rows \[3\]"):
        layer.merge()
    assert not layer.merged


def test_bf16_compute_dtype_close_to_fp32():
    layer = _layer()
    x = torch.randn(4, D_IN, requires_grad=True)
    layer(x).sum().backward()
    want = [p.grad.clone() for p in (layer.vera_d, layer.vera_b, layer.vera_m)]
    y32 = layer(x).detach()
    for p in (layer.vera_d, layer.vera_b, layer.vera_m):
        p.grad = None
    layer.compute_dtype = torch.bfloat16
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), y32, rtol=0, atol=0.05)
    for p, w in zip((layer.vera_d, layer.vera_b, layer.vera_m), want, strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, w, rtol=0.05, atol=0.05)


def test_bf16_base_close_to_fp32():
    layer32, layer16 = _layer(), _layer(dtype=torch.bfloat16)
    layer16.load_state_dict({k: v for k, v in layer32.state_dict().items() if k.startswith("vera_")}, strict=False)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(layer16(x.bfloat16()).float(), layer32(x), rtol=0, atol=0.05)


def test_magnitude_scale_semantics():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    delta = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    m = torch.tensor([10.0, 0.0], requires_grad=True)  # m starts at 0 on a zero row of W0
    s = ops.magnitude_scale(w, delta, m)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.0]))  # 10 / 5; a zero row gives 0, not NaN
    assert torch.equal(ops.magnitude_scale(w + delta, None, m), s)  # None: `weight` holds W0 + delta already
    s.sum().backward()
    assert m.grad[0].item() == pytest.approx(0.2)  # the norm is a constant: d s / d m = 1 / ||w + delta||
    torch.testing.assert_close(ops.row_norms(w.double()), torch.tensor([5.0, 0.0]))


def test_parity_with_peft_dora_over_the_same_low_rank_factors():
    """PEFT's LoRA+DoRA with lora_A = diag(s d) A_sl, lora_B = diag(b) B_sl (scaling 1) and magnitude m is
    DVoRA by definition: outputs and the gradient of m agree (both detach the norm)."""
    peft = pytest.importorskip("peft")
    layer = _layer()
    A, B = layer.slices(torch.device("cpu"), torch.float32)
    F_A, F_B = ops.delta_factors(A, B, layer.vera_d.detach(), layer.vera_b.detach(), layer.scale)
    base = nn.Sequential(nn.Linear(D_IN, D_OUT))
    base[0].load_state_dict(layer.base.state_dict())
    cfg = peft.LoraConfig(r=R, lora_alpha=R, target_modules=["0"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    lora = model.base_model.model[0]
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(F_A)
        lora.lora_B["default"].weight.copy_(F_B)
        lora.lora_magnitude_vector["default"].weight.copy_(layer.vera_m)
    for tokens in (3, 512):  # the factored and the materialized path
        x = torch.randn(tokens, D_IN, generator=torch.Generator().manual_seed(tokens))
        ours, theirs = layer(x), model(x)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        ours.sum().backward()
        theirs.sum().backward()
        torch.testing.assert_close(layer.vera_m.grad, lora.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-5, atol=1e-5)
        layer.vera_m.grad = None
        lora.lora_magnitude_vector["default"].weight.grad = None


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 7)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def test_attach_train_save_load_and_merge_a_dvora_model(tmp_path):
    """End to end through attach: m is trained, the file carries it, a fresh model loads the same function,
    and the pure merged_state_dict of the file equals the live merge."""
    torch.manual_seed(0)
    model, fresh, plain = _MLP(), _MLP(), _MLP()
    fresh.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    attach(model, VeraConfig(r=8, target_modules=("up", "down"), magnitude=True))
    names = {n for n, _ in trainable_parameters(model)}
    assert names == {f"{m}.vera_{v}" for m in ("up", "down") for v in "dbm"}
    x = torch.randn(16, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)  # identity at init
    opt = torch.optim.Adam([p for _, p in trainable_parameters(model)], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    m0 = {n: ly.vera_m.detach().clone() for n, ly in vera_layers(model).items()}
    assert any((ly.vera_m - plain.get_submodule(n).weight.norm(dim=1)).abs().max() > 1e-3
               for n, ly in vera_layers(model).items())  # m moved
    save_adapter(model, tmp_path / "a.safetensors")
    load_adapter(fresh, tmp_path / "a.safetensors")  # attaches with the file's config (magnitude=True)
    for n, ly in vera_layers(fresh).items():
        assert torch.equal(ly.vera_m, m0[n])
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
        merged_sd = merged_state_dict(plain.state_dict(), read_adapter(tmp_path / "a.safetensors"))
        merge(model)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
    plain.load_state_dict(merged_sd)
    for n, ly in vera_layers(model).items():
        torch.testing.assert_close(plain.get_submodule(n).weight, ly.base.weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-5)

"""The opt-in bf16 compute dtype for the adapter's own products (verakit.set_compute_dtype).

Fast paths with bf16 products on fp32 inputs against autograd through the naive formula in float64, on
both sides of the cost model's switch; the default (None) bit for bit as without the setting; the
setting stays out of the state_dict and the adapter file; a model trained with it saves a normal file.

Tolerances: bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3) and each adapter product rounds
its operands and its result once or twice. Measured on this CPU, as max-abs error over max |reference|:
one op (these shapes, seeds 0-4): worst 6.1e-3 materialized, 7.4e-3 factored; the four-layer Block (q,
k, v, o; seeds 0-8): worst 1.5e-2, a grad_b at 2 tokens, whose 2-term sums partly cancel. Asserted:
BF16_REL = 2e-2 for one op, BF16_REL_BLOCK = 4e-2 for the Block; and, so that the tests cannot pass on
an fp32 path by accident, at least ENGAGED = 1e-4 somewhere (the fp32 path stays near 1e-7).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from helpers import randomize_vectors
from test_ops import Block, _grads, _naive, _operands, _reference_block, _vector_grads_of
from verakit import (
    VeraConfig,
    attach,
    load_adapter,
    ops,
    save_adapter,
    set_compute_dtype,
    vera_layers,
)

torch.set_num_threads(1)

BF16_REL = 2e-2  # allowed max-abs error / max |reference| for one op (measured worst 7.4e-3)
BF16_REL_BLOCK = 4e-2  # the same through the four-layer Block (measured worst 1.5e-2)
ENGAGED = 1e-4  # smallest error showing bf16 was used (fp32 gives ~1e-7)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs().max() / want.detach().double().abs().max())


def _check(pairs: list[tuple[torch.Tensor, torch.Tensor]], bound: float = BF16_REL) -> None:
    errors = [_rel(g, w) for g, w in pairs]
    assert max(errors) < bound, errors
    assert max(errors) > ENGAGED, errors  # the products did run in bf16


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("tokens", [4, 64])  # 4: projected route g^T (x A^T); 64: outer route (g^T x) A^T
@pytest.mark.parametrize("transposed", [False, True])
def test_materialized_bf16_products_match_float64(seed, keep, tokens, transposed):
    n, m, r = 16, 16, 32
    x, w0, bias, A, B, d, b, s, up = _operands(tokens, n, m, r, torch.float32, seed)
    stored = w0.t().contiguous() if transposed else w0
    A_c = A.to(torch.bfloat16)

    def fast(x_, bias_, d_, b_):
        return ops.vera_materialized(x_, stored.t() if transposed else stored, bias_, A, B, d_, b_, s, keep, A_c)

    got, grads = _grads(fast, [x, bias, d, b], up)
    want, wgrads = _grads(lambda *t: _naive(t[0], w0.double(), t[1], A.double(), B.double(), t[2], t[3], s),
                          [x.double(), bias.double(), d.double(), b.double()], up.double())
    assert got.dtype == grads[0].dtype == torch.float32  # the model's dtype in and out
    assert grads[2].dtype == grads[3].dtype == torch.float32
    _check([(got, want), (grads[0], wgrads[0]), (grads[2], wgrads[2]), (grads[3], wgrads[3])])
    torch.testing.assert_close(grads[1].double(), wgrads[1], atol=1e-5, rtol=0)  # bias: no adapter product


@pytest.mark.parametrize("seed", [0, 3])
def test_tail_bf16_products_match_float64(seed):
    x, _, _, A, B, d, b, s, up = _operands(7, 24, 20, 32, torch.float32, seed)
    A_c, B_c = A.to(torch.bfloat16), B.to(torch.bfloat16)
    got, (gx, gd, gb) = _grads(lambda x_, d_, b_: ops.vera_tail(F.linear(x_.to(A_c.dtype), A_c), B_c, d_, b_, s,
                                                                torch.float32), [x, d, b], up)
    x64, d64, b64 = (t.double().requires_grad_(True) for t in (x, d, b))
    want = b64 * ((s * d64 * (x64 @ A.double().t())) @ B.double().t())
    want.backward(up.double())
    assert got.dtype == gx.dtype == gd.dtype == gb.dtype == torch.float32
    _check([(got, want), (gx, x64.grad), (gd, d64.grad), (gb, b64.grad)])


def _block(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = Block()
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=32, target_modules=("q", "k", "v", "o")))
    randomize_vectors(model, seed=1, std=0.3)
    return model, base


@pytest.mark.parametrize("tokens,path", [(2, "factored"), (96, "materialized")])
def test_layer_bf16_paths_match_reference(tokens, path):
    """q, k, v share u = A x on the factored side (the SharedInput path), one matmul on the other."""
    model, base = _block()
    assert set_compute_dtype(model, torch.bfloat16) is model
    assert ops.choose_path(tokens, 24, 20, 32, grad=True)[0] == path
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 24, generator=g, requires_grad=True)
    up = torch.randn(tokens, 24, generator=g)
    out = model(x)
    if path == "factored":
        share = vera_layers(model)["q"].shared_input
        assert share._entry.u.dtype == torch.bfloat16 and len(share._entry.takers) == 3  # computed once for q, k, v
    out.mul(up).sum().backward()
    ref = _reference_block(model, base)
    x64 = x.detach().double().requires_grad_(True)
    want = ref(x64)
    want.mul(up.double()).sum().backward()
    pairs = [(out, want), (x.grad, x64.grad)]
    for name, (gd, gb) in _vector_grads_of(model).items():
        assert gd.dtype == gb.dtype == torch.float32
        pairs += [(gd, getattr(ref, name).vd.grad), (gb, getattr(ref, name).vb.grad)]
    _check(pairs, BF16_REL_BLOCK)


@pytest.mark.parametrize("tokens", [2, 96])
def test_default_and_unset_are_bit_identical(tokens):
    """None after bf16 is the path without the setting, bit for bit; bf16 does differ from it."""
    plain, _ = _block()
    toggled = copy.deepcopy(plain)
    low = copy.deepcopy(plain)
    set_compute_dtype(toggled, torch.bfloat16)
    set_compute_dtype(toggled, None)
    set_compute_dtype(low, torch.bfloat16)
    x = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(5))
    results = []
    for model in (plain, toggled, low):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.pow(2).sum().backward()
        results.append([out.detach(), xi.grad] + [t for pair in _vector_grads_of(model).values() for t in pair])
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max((a - b).abs().max() for a, b in zip(results[0], results[2], strict=True)) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_effect_on_a_low_precision_model_or_without_gradients(dtype):
    plain, _ = _block()
    for layer in vera_layers(plain).values():
        layer.base.to(dtype)
    low = copy.deepcopy(plain)
    set_compute_dtype(low, torch.bfloat16)
    for tokens in (2, 96):
        x = torch.randn(tokens, 24).to(dtype)
        outs = []
        for model in (plain, low):
            model.zero_grad()
            out = model(x)
            out.float().sum().backward()
            outs.append([out.detach()] + [t for pair in _vector_grads_of(model).values() for t in pair])
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    fp32, _ = _block()
    low = copy.deepcopy(fp32)
    set_compute_dtype(low, torch.bfloat16)
    with torch.no_grad():  # evaluation and serving stay exact, so they match what the saved file gives
        for tokens in (2, 96):
            x = torch.randn(tokens, 24)
            torch.testing.assert_close(low(x), fp32(x), rtol=0, atol=0)


def test_setting_is_runtime_only(tmp_path):
    model, _ = _block()
    keys = set(model.state_dict())
    save_adapter(model, tmp_path / "plain.safetensors")
    set_compute_dtype(model, torch.bfloat16)
    assert all(ly.compute_dtype is torch.bfloat16 for ly in vera_layers(model).values())
    assert "compute_dtype=torch.bfloat16" in repr(vera_layers(model)["q"])
    assert set(model.state_dict()) == keys
    save_adapter(model, tmp_path / "low.safetensors")
    files = [safe_open(str(tmp_path / f), "pt") for f in ("plain.safetensors", "low.safetensors")]
    assert files[0].metadata() == files[1].metadata() and "bfloat16" not in str(files[1].metadata())
    assert list(files[0].keys()) == list(files[1].keys())
    for k in files[0].keys():
        assert files[1].get_tensor(k).dtype == torch.float32
        torch.testing.assert_close(files[1].get_tensor(k), files[0].get_tensor(k), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set_compute_dtype: dtype must be None, torch.bfloat16 or torch.float16"):
        set_compute_dtype(model, torch.float64)


def _train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 16) -> list[float]:
    """AdamW steps alternating a 96-token batch (materialized path) and 2 of its rows (factored path);
    returns the loss of each 96-token step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(steps):
        rows = slice(None) if step % 2 == 0 else slice(0, 2)
        loss = F.mse_loss(model(x[rows]), target[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            losses.append(loss.item())
    return losses


def test_training_with_bf16_products_lowers_loss_and_saves_a_normal_adapter(tmp_path):
    model, base = _block()
    teacher = copy.deepcopy(model)
    randomize_vectors(teacher, seed=9, std=0.5)  # a target the adapter can reach
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 24, generator=g)
    with torch.no_grad():
        target = teacher(x)
    reference = copy.deepcopy(model)
    set_compute_dtype(model, torch.bfloat16)
    losses = _train(model, x, target)
    fp32_losses = _train(reference, x, target)
    assert losses[-1] < 0.8 * losses[0], losses
    # Same course as fp32 training: the last losses differ by 1.2e-5 relative (measured).
    assert abs(losses[-1] - fp32_losses[-1]) < 1e-3 * fp32_losses[-1], (losses, fp32_losses)
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert all(ly.compute_dtype is None for ly in vera_layers(fresh).values())
    set_compute_dtype(model, None)
    for rows in (slice(None), slice(0, 2)):
        xi = x[rows].clone().requires_grad_(True)  # with gradients: the training paths, now at the default
        torch.testing.assert_close(fresh(xi), model(xi), rtol=0, atol=0)

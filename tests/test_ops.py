"""verakit.ops and VeraLinear's fast paths against autograd through the naive VeRA formula.

Every fast path (factored tail, materialized with W kept or rebuilt and either gradient route, shared
A x, cached W0 + delta) is checked for forward values and all gradients: float32 at atol 1e-5 against a
float64 reference; float16 / bfloat16 at the tolerances stated beside each case.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from verakit import VeraConfig, attach, merge, ops, unmerge, vera_layers
from verakit.layer import SharedInput
from verakit.projection import Projection

torch.set_num_threads(1)

# (dtype, atol on outputs and input grads, relative tolerance on the vector grads)
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 6e-2, 3e-2), (torch.float16, 1e-2, 5e-3)]


def _operands(T, n, m, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = Projection(seed, "kaiming_uniform", r, n, m)
    A, B = (t.to(dtype) for t in (proj.A, proj.B))
    x = torch.randn(T, n, generator=g).to(dtype)
    w0 = (torch.randn(m, n, generator=g) * 0.2).to(dtype)
    bias = (torch.randn(m, generator=g) * 0.1).to(dtype)
    d = torch.randn(r, generator=g)
    b = torch.randn(m, generator=g)
    up = torch.randn(T, m, generator=g).to(dtype)  # upstream gradient
    return x, w0, bias, A, B, d, b, proj.scale(n, r), up


def _naive(x, w0, bias, A, B, d, b, s):
    """The formula from the paper, float64, plain autograd."""
    return x @ w0.t() + bias + b * ((s * d * (x @ A.t())) @ B.t())


def _grads(fn, leaves, up):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    out.backward(up.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _close(got, want, atol, rtol=0.0):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("input_grad", [True, False])
def test_tail_matches_naive(dtype, atol, rtol, input_grad):
    x, w0, bias, A, B, d, b, s, up = _operands(7, 24, 20, 32, dtype)
    u = x @ A.t()  # (T, r)
    got, (gu, gd, gb) = _grads(lambda u_, d_, b_: ops.vera_tail(u_, B, d_, b_, s), [u, d, b], up)
    u64 = u.double().requires_grad_(input_grad)
    d64, b64 = d.double().requires_grad_(True), b.double().requires_grad_(True)
    want = b64 * ((s * d64 * u64) @ B.double().t())
    want.backward(up.double())
    assert got.dtype == dtype and gd.dtype == gb.dtype == torch.float32
    _close(got, want, atol)
    if input_grad:
        _close(gu, u64.grad, atol)
    vec_atol = 1e-5 if dtype == torch.float32 else rtol * float(d64.grad.abs().max())
    _close(gd, d64.grad, vec_atol, rtol)
    _close(gb, b64.grad, rtol * float(b64.grad.abs().max()) + 1e-6, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("tokens", [4, 64])  # 4: projected route g^T (x A^T); 64: outer route (g^T x) A^T
@pytest.mark.parametrize("transposed", [False, True])
def test_materialized_matches_naive(dtype, atol, rtol, keep, tokens, transposed):
    n, m, r = 16, 16, 32
    assert ops._projected_cheaper(4, n, m, r) and not ops._projected_cheaper(64, n, m, r)
    x, w0, bias, A, B, d, b, s, up = _operands(tokens, n, m, r, dtype)
    stored = w0.t().contiguous() if transposed else w0  # Conv1D keeps W0 as (d_in, d_out)

    def fast(x_, bias_, d_, b_):
        return ops.vera_materialized(x_, stored.t() if transposed else stored, bias_, A, B, d_, b_, s, keep)

    got, grads = _grads(fast, [x, bias, d, b], up)
    want, wgrads = _grads(lambda *t: _naive(t[0], w0.double(), t[1], A.double(), B.double(), t[2], t[3], s),
                          [x.double(), bias.double(), d.double(), b.double()], up.double())
    _close(got, want, atol * 4)  # four sums of products of magnitude ~1 in low precision
    _close(grads[0], wgrads[0], atol * 4)
    _close(grads[1], wgrads[1], atol * 4)
    for g_, w_ in zip(grads[2:], wgrads[2:], strict=True):
        assert g_.dtype == torch.float32
        _close(g_, w_, 1e-4 if dtype == torch.float32 else rtol * float(w_.abs().max()), rtol)


def test_materialized_refuses_trainable_base_weight():
    x, w0, bias, A, B, d, b, s, _ = _operands(3, 8, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="base weight requires grad"):
        ops.vera_materialized(x, w0.requires_grad_(True), bias, A, B, d, b, s)


def test_refs_agree_with_naive():
    x, w0, bias, A, B, d, b, s, _ = _operands(5, 12, 10, 6, torch.float64)
    _close(ops.vera_materialized_ref(x, w0, bias, A, B, d, b, s), _naive(x, w0, bias, A, B, d, b, s), 1e-12)
    delta = b[:, None] * (B @ (s * d[:, None] * A))
    _close(ops.vera_delta(A, B, d, b, s, base=w0), w0 + delta, 1e-12)
    _close(ops.vera_delta(A, B, d, b, s), delta, 1e-12)
    _close(ops.vera_delta(A, B, d, b, s, base=w0, alpha=-1.0), w0 - delta, 1e-12)
    F_A, F_B = ops.delta_factors(A, B, d, b, s)
    assert torch.equal(F_B @ F_A, ops.vera_delta(A, B, d, b, s))
    w = w0.t().contiguous().t()  # a transposed layout (Conv1D's), added into in place
    ops.vera_delta(A, B, d, b, s, base=w, out=w)
    _close(w, w0 + delta, 1e-12)


def test_cost_model_golden_counts_and_switch():
    # Hand-counted for T=10, n=3, m=2, r=4 with gradients for x: factored 2*10*4*5 fwd + (2*10*2*4 + 2*10*4*3)
    # bwd; materialized 2*2*3*4 fwd, Q by the outer route 2*10*2*3 + 2*2*3*4 (projected: 400 > 168).
    c = ops.path_costs(10, 3, 2, 4, grad=True, keep_weight=True)
    assert c["factored"] == ops.PathCost(400 + 160 + 240, 10 * (4 + 2))
    assert c["materialized"] == ops.PathCost(48 + 168, 30 + 6)
    assert ops.path_costs(10, 3, 2, 4, grad=True, keep_weight=False)["materialized"] == ops.PathCost(48 + 168 + 48, 30)
    assert ops.path_costs(10, 3, 2, 4, grad=False)["factored"] == ops.PathCost(400, 0)
    # RoBERTa-base q/v at r=1024: per-token path for a handful of tokens, one matmul for a batch; W kept
    # at 8x128 tokens, rebuilt at 24x128 where the rebuild is < REBUILD_SHARE of the path.
    assert ops.choose_path(64, 768, 768, 1024, grad=True) == ("factored", False)
    assert ops.choose_path(1024, 768, 768, 1024, grad=True) == ("materialized", True)
    assert ops.choose_path(3072, 768, 768, 1024, grad=True) == ("materialized", False)
    assert ops.choose_path(383, 768, 768, 256, grad=False)[0] == "factored"
    assert ops.choose_path(385, 768, 768, 256, grad=False)[0] == "materialized"
    assert not ops.cache_pays(383, 768, 768) and ops.cache_pays(384, 768, 768)


# ---------------------------------------------------------------- VeraLinear on both sides of the switch


class Block(nn.Module):
    """q, k, v read the same input (siblings), o reads their sum: the shared-A x situation."""

    def __init__(self, n=24, m=20):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(n, m), nn.Linear(n, m), nn.Linear(n, m)
        self.o = nn.Linear(m, n)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x) + self.k(x) * self.v(x)))


def _reference_block(model, ref):
    """`ref`'s linear weights set to W0 + delta in float64: the naive formula for every adapted layer."""
    ref = copy.deepcopy(ref).double()
    for name, layer in vera_layers(model).items():
        A, B = layer.slices(torch.device("cpu"), torch.float64)
        lin = getattr(ref, name)
        d = layer.vera_d.detach().double().clone().requires_grad_(True)
        b = layer.vera_b.detach().double().clone().requires_grad_(True)
        lin.register_parameter("vd", nn.Parameter(d))
        lin.register_parameter("vb", nn.Parameter(b))
        w0 = lin.weight.detach().clone()
        del lin.weight
        lin.weight = w0 + lin.vb[:, None] * (B @ (layer.scale * lin.vd[:, None] * A))
    return ref


def _vector_grads_of(model):
    return {n: (ly.vera_d.grad, ly.vera_b.grad) for n, ly in vera_layers(model).items()}


@pytest.mark.parametrize("tokens,path", [(2, "factored"), (96, "materialized")])
def test_layer_paths_match_reference(tokens, path):
    torch.manual_seed(0)
    model = Block()
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=32, target_modules=("q", "k", "v", "o")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g) * 0.3)
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g) * 0.3)
    assert ops.choose_path(tokens, 24, 20, 32, grad=True)[0] == path
    x = torch.randn(tokens, 24, generator=g, requires_grad=True)
    up = torch.randn(tokens, 24, generator=g)
    model(x).mul(up).sum().backward()
    ref = _reference_block(model, base)
    x64 = x.detach().double().requires_grad_(True)
    ref(x64).mul(up.double()).sum().backward()
    _close(x.grad, x64.grad, 1e-5)
    for name, (gd, gb) in _vector_grads_of(model).items():
        lin = getattr(ref, name)
        _close(gd, lin.vd.grad, 1e-5, 1e-5)
        _close(gb, lin.vb.grad, 1e-5, 1e-5)
    with torch.no_grad():
        _close(model(x), ref(x64), 1e-5)
    assert all(ly.base.weight.grad is None for ly in vera_layers(model).values())


def test_siblings_share_projected_input_and_reforward():
    torch.manual_seed(0)
    model = Block()
    attach(model, VeraConfig(r=32, target_modules=("q", "k", "v", "o")))
    layers = vera_layers(model)
    share = layers["q"].shared_input
    assert isinstance(share, SharedInput) and layers["k"].shared_input is share and layers["v"].shared_input is share
    assert layers["o"].shared_input is None  # o has d_in 20: a different A slice
    with torch.no_grad():
        for layer in layers.values():
            layer.vera_b.normal_()
    x = torch.randn(2, 24)  # factored path
    out1 = model(x)
    assert share._entry.x() is x and len(share._entry.takers) == 3  # computed by q, taken by k and v
    u = share._entry.u
    out1.sum().backward()
    first = {n: (a.clone(), b.clone()) for n, (a, b) in _vector_grads_of(model).items()}
    model.zero_grad()
    out2 = model(x)  # same tensor again: q recomputes u for the new graph rather than reuse the freed one
    assert share._entry.u is not u
    out2.sum().backward()
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    for n, (gd, gb) in _vector_grads_of(model).items():
        torch.testing.assert_close(gd, first[n][0], rtol=0, atol=0)
        torch.testing.assert_close(gb, first[n][1], rtol=0, atol=0)
    x.add_(1.0)  # an in-place change of the input is a new input
    assert share.take(x, layers["k"]) is None


def test_cached_weight_matches_reference_and_invalidates_after_step():
    torch.manual_seed(0)
    model = Block()
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=32, target_modules=("q", "k", "v", "o")))
    layers = vera_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.vera_b.normal_()
    x = torch.randn(64, 24)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(x).pow(2).mean().backward()  # a training forward frees the cache
        assert all(ly._cache is None for ly in layers.values())
        with torch.no_grad():
            got = model(x)  # an evaluation between backward and step, as in a training loop
            assert all(ly._cache.weight is not None for ly in layers.values())  # 64 tokens pay off at once
            cached = {n: ly._cache.weight for n, ly in layers.items()}
            again = model(x)
            assert all(ly._cache.weight is cached[n] for n, ly in layers.items())  # reused, not rebuilt
            _close(got, _reference_block(model, base)(x.double()), 1e-5)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
        opt.step()  # d and b change in place: the next gradient-free call must rebuild
        opt.zero_grad()
        with torch.no_grad():
            after = model(x)
            assert all(ly._cache.weight is not cached[n] for n, ly in layers.items())
            _close(after, _reference_block(model, base)(x.double()), 1e-5)
        assert (after - got).abs().max() > 1e-2


def test_cache_waits_until_it_pays_and_follows_merge():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(24, 20))
    attach(lin, VeraConfig(r=32, target_modules=("0",)))
    layer = vera_layers(lin)["0"]
    with torch.no_grad():
        layer.vera_b.normal_()
        x = torch.randn(5, 24)  # 5 * (24 + 20) < 24 * 20: factored until 11 tokens have been seen
        outs = [lin(x) for _ in range(3)]
        assert layer._cache.weight is not None and layer._cache.tokens_seen == 15
        for o in outs[1:]:
            _close(o, outs[0], 1e-5)
        merge(lin)  # the base weight changes: the cache must not add the delta a second time
        _close(lin(x), outs[0], 1e-5)
        unmerge(lin)
        _close(lin(x), outs[0], 1e-5)
        for _ in range(3):
            lin(x)  # pays again after the base weight changed
        assert layer._cache.weight is not None
        layer.vera_b.mul_(2.0)
        _close(lin(x) - layer.base(x), 2 * (outs[0] - layer.base(x)), 1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.1), (torch.float16, 2e-2)])
def test_low_precision_layer_paths(dtype, atol):
    """Half-precision base and inputs, fp32 vectors: each path within atol of the fp32 model.

    `atol` alone is loose beside the adapter's own effect (about 0.17 at 2 tokens), so the output error is
    also bounded by a tenth of that effect (measured: bf16 3% / 1%, fp16 0.4% / 0.1% at 2 / 96 tokens),
    and both vector gradients by 5% of the reference's largest (measured at most 1.4% bf16, 0.1% fp16).
    """
    torch.manual_seed(0)
    model = Block()
    base = copy.deepcopy(model)
    attach(model, VeraConfig(r=32, target_modules=("q", "k", "v", "o")))
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.normal_(std=0.5)
    half = copy.deepcopy(model)
    for layer in vera_layers(half).values():
        layer.base.to(dtype)
    for tokens in (2, 96):
        x = torch.randn(tokens, 24)
        model.zero_grad()
        half.zero_grad()
        want = model(x)
        want.sum().backward()
        got = half(x.to(dtype))
        got.float().sum().backward()
        _close(got, want, atol)
        with torch.no_grad():
            effect = float((want - base(x)).abs().max())  # what the adapter adds to the fp32 output
        assert effect > 0.1
        _close(got, want, 0.1 * effect)
        for n, ly in vera_layers(half).items():
            ref = vera_layers(model)[n]
            assert ly.vera_d.grad.dtype == ly.vera_b.grad.dtype == torch.float32
            _close(ly.vera_d.grad, ref.vera_d.grad, 0.05 * float(ref.vera_d.grad.abs().max()))
            _close(ly.vera_b.grad, ref.vera_b.grad, 0.05 * float(ref.vera_b.grad.abs().max()))


def test_compile_training_step_matches_eager():
    """torch.compile traces both autograd Functions and the cost model (aot_eager: no C++ build)."""
    torch.manual_seed(0)
    model = Block()
    attach(model, VeraConfig(r=32, target_modules=("q", "k", "v", "o")))
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.normal_()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for tokens in (2, 96):
        x = torch.randn(tokens, 24)
        model.zero_grad()
        twin.zero_grad()
        model(x).pow(2).sum().backward()
        compiled(x).pow(2).sum().backward()
        for n, (gd, gb) in _vector_grads_of(model).items():
            ly = vera_layers(twin)[n]
            _close(ly.vera_d.grad, gd, 1e-5, 1e-5)
            _close(ly.vera_b.grad, gb, 1e-5, 1e-5)


def test_dropout_and_trainable_base_fall_back_to_autograd_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    attach(model, VeraConfig(r=32, target_modules=("0",), dropout=0.5))
    layer = vera_layers(model)["0"]
    layer.base.weight.requires_grad_(True)  # a user unfreezing W0: its gradient must still be right
    with torch.no_grad():
        layer.vera_b.normal_()
    x = torch.randn(96, 24)
    torch.manual_seed(3)
    model(x).sum().backward()
    torch.manual_seed(3)
    keep = F.dropout(x, 0.5, training=True)
    A, B = layer.slices(x.device, x.dtype)
    d = layer.vera_d.detach().requires_grad_(True)
    b = layer.vera_b.detach().requires_grad_(True)
    w = layer.base.weight.detach().requires_grad_(True)
    (F.linear(x, w, layer.base.bias) + ops.vera_tail_ref(F.linear(keep, A), B, d, b, layer.scale)).sum().backward()
    _close(layer.base.weight.grad, w.grad, 1e-5)
    _close(layer.vera_d.grad, d.grad, 1e-5, 1e-5)
    _close(layer.vera_b.grad, b.grad, 1e-5, 1e-5)

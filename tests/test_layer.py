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


def test_each_forward_plan_is_chosen_where_it_is_meant_for(monkeypatch):
    """layer_plan.plan_forward on a live layer: the path and cache step of each kind of call, and the body
    runs the planned path (the materialized op is called exactly on MATERIALIZED plans)."""
    from verakit import ops
    from verakit.layer_plan import CacheStep, Path, plan_forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    attach(model, VeraConfig(r=32, target_modules=("0",), dropout=0.1))
    layer = vera_layers(model)["0"]
    calls = []
    real = ops.vera_materialized
    monkeypatch.setattr(ops, "vera_materialized", lambda *a: calls.append(1) or real(*a))

    def plan_of(x):
        p = plan_forward(layer.call_facts(x))
        n = len(calls)
        model(x)
        assert (len(calls) > n) == (p.path is Path.MATERIALIZED)
        return p

    few, many = torch.randn(2, 24), torch.randn(512, 24)
    model.eval()  # dropout off: the one-matmul paths are open
    assert ops.choose_path(2, 24, 20, 32, True)[0] == "factored"
    assert ops.choose_path(512, 24, 20, 32, True)[0] == "materialized"
    p = plan_of(few)
    assert (p.path, p.cache) == (Path.FACTORED, CacheStep.DROP)  # training call, few tokens
    p = plan_of(many)
    assert (p.path, p.cache) == (Path.MATERIALIZED, CacheStep.DROP)  # training call, many tokens
    with torch.no_grad():
        p = plan_of(few)  # 2 tokens: the cache does not pay yet (needs 11), counted
        assert (p.path, p.cache, p.tokens_seen) == (Path.FACTORED, CacheStep.COUNT, 2) and layer._cache.weight is None
        while layer._cache.tokens_seen + 2 < 11:
            plan_of(few)
        p = plan_of(few)
        assert (p.path, p.cache) == (Path.CACHED, CacheStep.USE) and layer._cache.weight is not None
        assert plan_forward(layer.call_facts(few)).path is Path.CACHED  # kept while d, b, W0 are unchanged
        merge(model)
        assert plan_of(few).path is Path.MERGED
        unmerge(model)
    model.train()  # dropout on: the adapter reads dropout(x), the base x, so only the factored path is exact
    p = plan_of(many)
    assert (p.path, p.cache) == (Path.FACTORED, CacheStep.DROP)
    with torch.no_grad():
        assert plan_of(many).path is Path.FACTORED and plan_of(many).cache is CacheStep.KEEP
    layer.base.weight.requires_grad_(True)  # a trainable base keeps its own forward
    model.eval()
    assert plan_of(many).path is Path.FACTORED


def test_plan_under_compile_never_touches_the_cache():
    from verakit.layer_plan import CacheStep, CallFacts, Path, plan_forward

    f = CallFacts(merged=False, grad=False, input_grad=False, one_matmul=True, compiling=True, tokens=512, n=24,
                  m=20, r=32, cached=False, tokens_seen=0)
    assert plan_forward(f)[:2] == (Path.MATERIALIZED, CacheStep.KEEP)
    assert plan_forward(f.__class__(**{**f.__dict__, "tokens": 2}))[:2] == (Path.FACTORED, CacheStep.KEEP)


def test_core_math_imports_point_down():
    """config <- projection <- layer: the layer modules and what they use import nothing above them (inject,
    fileformat, merge, slots, train, serve, interop, cli), so `vera_delta` stays usable from every caller."""
    import ast
    from pathlib import Path

    import verakit

    src = Path(verakit.__file__).resolve().parent
    below = {"config", "projection", "quant", "recompute", "ops", "leaves", "layer_plan", "layer", "layer_conv",
             "layer_embedding", "_version"}
    wrong = []
    for name in sorted(below):
        tree = ast.parse((src / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                wrong += [f"{name} imports {t}" for t in targets if t.split(".")[0] not in below]
    assert wrong == []


def _compiled_no_grad(module, xs):
    """Uncompiled and torch.compile(aot_eager, fullgraph) outputs for each x, both gradient-free, on the same
    module: the eager calls come first and leave the layers' caches behind, whose keys (data pointers) the
    compiled calls must not compare (dynamo cannot: a graph break, which fullgraph=True refuses)."""
    torch._dynamo.reset()
    with torch.no_grad():
        eager = [module(x) for x in xs]
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        return list(zip(eager, [compiled(x) for x in xs], strict=True))


@pytest.mark.parametrize("magnitude", [False, True], ids=["vera", "dvora"])
def test_compiled_gradient_free_forward_matches_reference(magnitude):
    """Under torch.compile a gradient-free call skips the cache and, at many tokens, multiplies by W0 + delta
    built in the graph (the materialized path; DVoRA: scale * (W0 x + delta x), the scale computed in the
    graph too). Both token counts against the uncompiled forward and a float64 reference from the spec:
    W = W0 + diag(b) B diag(d) A (reference_weight); DVoRA: W' = m * W / ||W|| per output row."""
    from dataclasses import replace

    from verakit.layer_plan import Path, plan_forward

    torch.manual_seed(0)
    model = MLP()
    base = copy.deepcopy(model)
    ref = copy.deepcopy(model).double()
    attach(model, VeraConfig(r=9, target_modules=("up", "down"), seed=3, magnitude=magnitude))
    randomize_vectors(model, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in vera_layers(model).items():
            w = reference_weight(layer.base.weight, layer.vera_d, layer.vera_b, 9, 3)
            if magnitude:
                layer.vera_m.mul_(1 + 0.2 * torch.randn(layer.vera_m.shape, generator=g))
                w = (layer.vera_m.double() / w.norm(dim=1)).unsqueeze(1) * w
            getattr(ref, name).weight.copy_(w)
    few, many = torch.randn(2, 12), torch.randn(4, 16, 12)
    for x, (eager, compiled) in zip((few, many), _compiled_no_grad(model, (few, many)), strict=True):
        with torch.no_grad():
            want = ref(x.double())
            assert (want - base(x).double()).abs().max() > 0.05  # the adapter's effect is far above atol
        torch.testing.assert_close(compiled.double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    with torch.no_grad():  # the paths those compiled calls took (call_facts reads is_compiling() as False here)
        for x, path in ((few, Path.FACTORED), (many, Path.MATERIALIZED)):
            for layer, xin in ((model.up, x), (model.down, model.act(model.up(x)))):
                assert plan_forward(replace(layer.call_facts(xin), compiling=True)).path is path


def test_compiled_gradient_free_conv_matches_reference():
    """VeraConv under torch.compile builds W0 + delta as a kernel in the graph for every gradient-free call
    (no cache): a small and a large batch against the uncompiled forward and the im2col reference."""
    from test_conv import Wrap, _randomize, reference_conv2d

    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(3, 8, 3, padding=1))
    base = copy.deepcopy(model.conv)
    attach(model, VeraConfig(r=5, target_modules=("conv",), seed=0))
    layer = vera_layers(model)["conv"]
    _randomize(layer)
    d, b = layer.vera_d.detach(), layer.vera_b.detach()
    xs = (torch.randn(1, 3, 4, 4), torch.randn(4, 3, 12, 12))
    for x, (eager, compiled) in zip(xs, _compiled_no_grad(model, xs), strict=True):
        with torch.no_grad():
            want = reference_conv2d(base, x, d, b, 5)
            assert (want - base(x).double()).abs().max() > 0.05
        torch.testing.assert_close(compiled.double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)

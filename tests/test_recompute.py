"""Recomputing an adapted layer's input from its norm's input (verakit.recompute) instead of saving it.

The recompute path must give bit-identical outputs and gradients to the path that saves x (itself
tested against the naive formula in test_ops), must actually save less (measured with saved-tensor
hooks), and must fall back to saving x whenever x is not a norm's untouched output.
"""

import copy
import gc

import pytest
import torch
from torch import nn

from helpers import randomize_vectors
from verakit import AttachError, VeraConfig, attach, detach, ops, recompute, set_input_recompute, vera_layers

torch.set_num_threads(1)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn()` runs forward."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _grads(model, loss_fn, recompute_on: bool):
    model = copy.deepcopy(model)
    set_input_recompute(model, recompute_on)
    out, saved = _saved_bytes(lambda: loss_fn(model))
    out.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, saved


def _check_materialized(model, tokens):
    for layer in vera_layers(model).values():
        path, _ = ops.choose_path(tokens, layer.in_features, layer.out_features, layer.r, grad=True)
        assert path == "materialized"  # else this test would not reach the recompute path


def _compare(model, loss_fn, tokens, width, min_norm_outputs):
    _check_materialized(model, tokens)
    out_keep, g_keep, saved_keep = _grads(model, loss_fn, False)
    out_re, g_re, saved_re = _grads(model, loss_fn, True)
    assert torch.equal(out_keep, out_re)
    assert g_keep.keys() == g_re.keys() and len(g_re) > 0
    for name in g_keep:
        assert torch.equal(g_keep[name], g_re[name]), name
    x_bytes = tokens * width * 4  # one fp32 (T, d_in) input no longer kept
    assert saved_keep - saved_re >= min_norm_outputs * x_bytes, (saved_keep, saved_re, x_bytes)
    assert (saved_keep - saved_re) % x_bytes == 0


def test_bert_recompute_is_exact_and_keeps_less(tiny_bert_clf):
    model = attach(tiny_bert_clf, VeraConfig(r=64, target_modules=("query", "key", "value")))
    randomize_vectors(model)
    ids = torch.randint(0, 99, (4, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    # layer 1's q/k/v read layer 0's output LayerNorm: that x (4 * 32, 32) is recomputed (layer 0's
    # embedding LayerNorm reads frozen embeddings and keeps nothing, so recomputing there saves nothing)
    _compare(model, lambda m: m(input_ids=ids, labels=labels).loss, 128, 32, min_norm_outputs=1)


def test_llama_all_linear_recompute_is_exact_and_keeps_less(tiny_llama):
    cfg = VeraConfig(r=128, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    model = attach(tiny_llama.train(), cfg)
    randomize_vectors(model, std=0.1)
    ids = torch.randint(0, 101, (4, 48), generator=torch.Generator().manual_seed(0))
    # per decoder layer: input_layernorm (q, k, v) and post_attention_layernorm (gate, up); o_proj and
    # down_proj read non-norm tensors and still keep theirs. Layer 0's input_layernorm reads the frozen
    # embeddings, which need no gradient, so that norm keeps nothing and its input costs what x did: 3.
    _compare(model, lambda m: m(input_ids=ids, labels=ids).loss, 192, 64, min_norm_outputs=3)


def test_gradient_checkpointing_with_recompute_gives_the_same_gradients(tiny_llama):
    from verakit.train.causal import enable_gradient_checkpointing

    model = attach(tiny_llama.train(), VeraConfig(r=128, target_modules=("q_proj", "v_proj", "up_proj")))
    randomize_vectors(model, std=0.1)
    ids = torch.randint(0, 101, (4, 48), generator=torch.Generator().manual_seed(1))
    ckpt = copy.deepcopy(model)
    enable_gradient_checkpointing(ckpt)
    _, plain, _ = _grads(model, lambda m: m(input_ids=ids, labels=ids).loss, False)
    _, both, _ = _grads(ckpt, lambda m: m(input_ids=ids, labels=ids).loss, True)
    for name in plain:
        torch.testing.assert_close(both[name], plain[name], atol=1e-6, rtol=1e-5)


class NormThenLinear(nn.Module):
    def __init__(self, n=16, m=12):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(n), nn.Linear(n, m)
        self.edit = None  # optional callable applied to the norm's output before the linear

    def forward(self, x):
        h = self.norm(x)
        if self.edit is not None:
            h = self.edit(h)
        return self.lin(h)


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = attach(NormThenLinear(), VeraConfig(r=64, target_modules=("lin",)))
    randomize_vectors(model)
    return model


def _kept_input(model, x):
    """Whether the VeRA layer's forward found a norm source for its input."""
    found = []
    layer = vera_layers(model)["lin"]
    hook = layer.register_forward_pre_hook(lambda m, a: found.append(recompute.source_of(a[0]) is not None))
    model(x).sum().backward()
    hook.remove()
    return found[0]


@pytest.mark.parametrize("edit,expect_source", [
    (None, True),
    (lambda h: h.view(h.shape), False),  # a view is another tensor: not tagged
    (lambda h: h.mul_(1.0), False),  # in place after the norm: version changed
    (lambda h: h * 1.0, False),
])
def test_source_only_for_the_untouched_norm_output(edit, expect_source):
    model = _tiny()
    model.edit = edit
    x = torch.randn(40, 16, requires_grad=True)  # as from trained layers below: the norm keeps it
    assert _kept_input(model, x) is expect_source


def test_no_tag_without_grad_and_hooks_follow_attach_detach():
    model = _tiny()
    with torch.no_grad():
        out = model.norm(torch.randn(3, 16))
    assert recompute.source_of(out) is None
    # grad mode, but nothing in the norm needs a gradient: the norm keeps nothing, so no tag
    model.norm.requires_grad_(False)
    assert recompute.source_of(model.norm(torch.randn(3, 16))) is None
    assert recompute.source_of(model.norm(torch.randn(3, 16, requires_grad=True))) is not None
    assert recompute.enabled(model)
    set_input_recompute(model, True)  # idempotent: still one hook
    assert sum(fn is recompute._tag for fn in model.norm._forward_hooks.values()) == 1
    set_input_recompute(model, False)
    assert not recompute.enabled(model)
    assert recompute.source_of(model.norm(torch.randn(3, 16, requires_grad=True))) is None
    set_input_recompute(model, True)
    detach(model)
    assert not recompute.enabled(model) and len(model.norm._forward_hooks) == 0
    with pytest.raises(AttachError, match="no VeRA attached"):
        set_input_recompute(model, True)


def test_norm_weight_changed_between_forward_and_backward_raises():
    model = _tiny()
    loss = model(torch.randn(40, 16, requires_grad=True)).sum()
    with torch.no_grad():
        model.norm.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()


def test_is_norm_by_class_and_name():
    class T5LayerNorm(nn.Module):
        def forward(self, x):
            return x

    assert recompute.is_norm(nn.LayerNorm(4)) and recompute.is_norm(nn.RMSNorm(4))
    assert recompute.is_norm(T5LayerNorm())
    assert not recompute.is_norm(nn.Linear(4, 4)) and not recompute.is_norm(nn.BatchNorm1d(4))


def test_compiled_model_with_norms_matches_eager():
    """Under torch.compile the tag steps aside (the layer saves x); gradients match eager's."""
    model = _tiny()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(40, 16, requires_grad=True)
    model(x).pow(2).sum().backward()
    compiled(x).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_tag_never_keeps_the_norm_input_alive():
    model = _tiny()
    x = torch.randn(40, 16, requires_grad=True)
    h = model.norm(x * 1.0)  # the norm's input is a temporary kept only by the norm's autograd node
    ref = recompute.source_of(h).input_ref
    assert ref() is not None
    h.sum().backward()  # frees the graph
    gc.collect()
    assert ref() is None and recompute.source_of(h) is None  # h is still held; its input is not


class ReluRMSNorm(nn.Module):
    """Named like a norm, but its autograd graph does not keep its input (relu keeps its output)."""

    def __init__(self, n=16):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return torch.relu(x) * self.w


class TempThenNorm(NormThenLinear):
    def forward(self, x):
        return self.lin(self.norm(x * 1.0))  # the norm's input: a temporary nothing else holds


def test_norm_that_does_not_keep_its_input_falls_back_to_saving_x():
    torch.manual_seed(0)
    plain = TempThenNorm()
    plain.norm = ReluRMSNorm()
    model = attach(copy.deepcopy(plain), VeraConfig(r=64, target_modules=("lin",), modules_to_save=("norm",)))
    randomize_vectors(model)
    twin = copy.deepcopy(model)
    set_input_recompute(twin, False)
    x = torch.randn(40, 16)
    assert not _kept_input(model, x)  # the temporary relu input died with the norm's forward
    twin(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name

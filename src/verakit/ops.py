"""VeRA adapter-path operations: two fast paths with hand-written backward, a cost model, slow references.

Notation (one adapted layer): x (T, n) tokens in, A = A_sl (r, n), B = B_sl (m, r) frozen views of the
shared tables, c = s * d (r), b (m). The adapter adds  b * (B (c * (A x)))  to the frozen  W0 x + bias.

* factored:     u = A x per token (computed by the caller, so sibling layers reading the same x can
                share it), then `vera_tail`. Cost ~ T * r * (n + m) per pass; saves u (T, r), shared
                by siblings, and h (T, m).
* materialized: W = W0 + diag(b) B diag(c) A once per call, then one matmul: `vera_materialized`.
                Cost ~ m * n * r per call plus, when training, the weight-gradient-shaped G = g^T x
                (T * m * n) or the projected P = g^T (x A^T) (T * r * (n + m)), whichever is cheaper.
                Saves x (T, n), shared with sibling layers, or, when x is a norm's output, the norm's
                input, which the norm keeps anyway (`recompute`); and optionally W (m, n).

Neither path ever forms a gradient for A, B or W0; d and b get theirs in float32 whatever the compute
dtype. Both take an optional lower compute dtype for the adapter's own products
(`VeraLinear.compute_dtype`, e.g. bf16 in an fp32 model): the caller hands A (and B) already cast to
it; the frozen layer's own work (W0 x, and dx = g W on the materialized path) stays in the model's
dtype. `choose_path` picks per layer and per call from the actual shapes and token count
(docs/performance.md derives the counts). Every fast op has a `*_ref` beside it: plain autograd through
the naive formula, used by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .recompute import NormSource

__all__ = [
    "PathCost",
    "REBUILD_SHARE",
    "path_costs",
    "choose_path",
    "cache_pays",
    "delta_factors",
    "vera_delta",
    "row_norms",
    "magnitude_scale",
    "vera_tail",
    "vera_tail_ref",
    "vera_materialized",
    "vera_materialized_ref",
]


@dataclass(frozen=True)
class PathCost:
    """Adapter-path cost of one call on top of the frozen layer's own work (which both paths keep)."""

    flops: int  # multiply-adds counted as 2
    saved: int  # floats held for backward beyond the frozen layer's own (0 without grad)


def _projected_cheaper(tokens: int, n: int, m: int, r: int) -> bool:
    """Whether P = g^T (x A^T) (2T r (n + m)) beats Q = (g^T x) A^T (2T m n + 2 m n r) for the (m, r) Q."""
    return tokens * r * (n + m) < tokens * m * n + m * n * r


def path_costs(
    tokens: int, n: int, m: int, r: int, grad: bool, input_grad: bool = True, keep_weight: bool = True
) -> dict[str, PathCost]:
    """FLOPs and saved floats of both paths for T=`tokens` rows through an (m, n) layer at rank r.

    grad: d or b need gradients; input_grad: x needs one too (any adapted layer below this one);
    keep_weight: the materialized path keeps W (m, n) for backward instead of rebuilding it.
    """
    T = tokens
    fwd_f = 2 * T * r * (n + m)  # u = A x, then B (c * u)
    fwd_m = 2 * m * n * r  # W = W0 + b B c A; the matmul with W replaces the frozen one
    if not grad:
        return {"factored": PathCost(fwd_f, 0), "materialized": PathCost(fwd_m, 0)}
    # factored backward: z = (b g) B for grad_d (and dx += (c z) A when x needs a gradient); grad_b
    # = colsum(g * h) from the saved h
    bwd_f = 2 * T * m * r + (2 * T * r * n if input_grad else 0)
    q = 2 * T * r * (n + m) if _projected_cheaper(T, n, m, r) else 2 * T * m * n + 2 * m * n * r
    bwd_m = q + (0 if keep_weight else fwd_m)  # dx = g W replaces the frozen layer's dx
    return {
        "factored": PathCost(fwd_f + bwd_f, T * (r + m)),
        "materialized": PathCost(fwd_m + bwd_m, T * n + (m * n if keep_weight else 0)),
    }


# The materialized path rebuilds W in backward, holding only x like LoRA does, when the rebuild adds at
# most this share to its FLOPs: at large token counts activations dominate peak memory and the rebuild is
# cheap relative to G; at small ones the rebuild is a large part of the step and W is small next to x.
REBUILD_SHARE = 0.25


def choose_path(tokens: int, n: int, m: int, r: int, grad: bool, input_grad: bool = True) -> tuple[str, bool]:
    """(path, keep_weight): the path with the fewest FLOPs (`path_costs`); for the materialized path
    with gradients, whether W is kept for backward (see REBUILD_SHARE) rather than rebuilt."""
    keep = path_costs(tokens, n, m, r, grad, input_grad, keep_weight=True)
    rebuild = path_costs(tokens, n, m, r, grad, input_grad, keep_weight=False)
    extra = rebuild["materialized"].flops - keep["materialized"].flops
    keep_weight = grad and extra > REBUILD_SHARE * keep["materialized"].flops
    costs = keep if keep_weight else rebuild
    path = "materialized" if costs["materialized"].flops < costs["factored"].flops else "factored"
    return path, keep_weight and path == "materialized"


def cache_pays(tokens_seen: int, n: int, m: int) -> bool:
    """Whether a cached W = W0 + delta (cost 2 m n r once) has paid off against the factored path
    (2 r (n + m) per token) over `tokens_seen` tokens: the ski-rental rule, never more than 2x optimal."""
    return tokens_seen * (n + m) >= m * n


def delta_factors(A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: (F_A, F_B) = (diag(scale * d) A (r, n), diag(b) B (m, r)), so delta = F_B @ F_A.

    A rank-r LoRA pair with scaling 1 (`interop`), and the factors `vera_delta` multiplies. In A's and B's
    dtype as d and b broadcast into them (float32 vectors with float32 tables: float32)."""
    return (d * scale).unsqueeze(1) * A, b.unsqueeze(1) * B


def vera_delta(A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor, scale: float,
               base: torch.Tensor | None = None, *, alpha: float = 1.0, A_c: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: delta = diag(b) B diag(scale * d) A (m, n); with `base`: base + alpha * delta.

    The one spelling of VeRA's weight delta: layers, merge, export and the slot tables call this.
    A (r, n), B (m, r), d (r,), b (m,); scale is the fan-in factor s. No autograd Function: it is
    differentiable in d and b wherever they require grad (conv layers rely on that).

    Without `base`: (diag(b) B) @ (diag(s d) A) from `delta_factors`, in A's dtype, so exported LoRA
    factors multiply to exactly this.
    With `base` (m, n), any strides (a transposed view is fine): W0 + alpha * delta in base's dtype (the
    vectors cast to it once) as one addmm of the (m, r) product B * (b c^T), c = s d: one rounding of the
    sum. `out`: where to write it (e.g. `base` itself: an in-place merge). `A_c`: A in a lower compute
    dtype; then B * (b c^T) is rounded to it once, the (m, r, n) product runs in it, and the delta is
    added to base in base's dtype.
    """
    if base is None:
        F_A, F_B = delta_factors(A, B, d, b, scale)
        return F_B @ F_A  # (m, n)
    dt = base.dtype
    left = B * (b.to(dt).unsqueeze(1) * (d * scale).to(dt))  # (m, r): B times the outer product b c^T
    if A_c is None:
        return torch.addmm(base, left, A, alpha=alpha, out=out)  # (m, n)
    # (m, r) @ (r, n) in the compute dtype, summed in base's dtype
    return torch.add(base, left.to(A_c.dtype) @ A_c, alpha=alpha, out=out)


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Semantics: ||weight[i, :]||_2 per output row, float32 (d_out,); DVoRA's magnitude at init."""
    return torch.linalg.vector_norm(weight.float(), dim=1)


def magnitude_scale(weight: torch.Tensor, delta: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """Semantics: m / ||weight + delta|| per output row (d_out,): DVoRA's W' = scale * (W0 + delta).

    weight (d_out, d_in) any dtype and strides (dequantized for a quantized base), delta (d_out, d_in) or
    None when `weight` already holds W0 + delta (one (d_out, d_in) temporary less), m (d_out,) float32.
    The norm is computed in float32 without gradients: DoRA (Liu et al. 2024, section 4.3) treats
    ||W0 + delta|| as a constant in backward, which keeps the (d_out, d_in) weight out of the autograd
    graph; gradients reach m through this quotient and d, b through the delta's own path (scale * delta x).
    A zero row (norm 0) divides by the smallest normal float instead, so its output stays zero, not NaN.
    """
    with torch.no_grad():
        full = weight.float() if delta is None else weight.float() + delta.float()
        norm = row_norms(full).clamp_min(torch.finfo(torch.float32).tiny)
    return m / norm


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _vector_grads(Q: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor, scale: float,
                  need_d: bool, need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_d, grad_b (float32) from Q = g^T (x A^T) (m, r): dL/db_i = sum_k B_ik c_k Q_ik,
    dL/dd_k = scale * sum_i b_i B_ik Q_ik."""
    BQ = B.float() * Q.float()  # (m, r)
    grad_d = BQ.t().mv(b.float()) * scale if need_d else None
    grad_b = BQ.mv(d.float() * scale) if need_b else None
    return grad_d, grad_b


class _Tail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, B, d, b, scale, out_dtype):
        h = F.linear(u * (d * scale).to(u.dtype), B)  # (..., m) in u's (compute) dtype
        ctx.save_for_backward(u, B, d, b, h)
        ctx.scale = scale
        return h.to(out_dtype) * b.to(out_dtype)  # b applied in the output dtype: one rounding less

    @staticmethod
    def backward(ctx, g):
        u, B, d, b, h = ctx.saved_tensors
        need_u, need_d, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        g2, u2 = _flat(g), _flat(u)  # (T, m), (T, r)
        grad_u = grad_d = grad_b = None
        if need_u or need_d:
            z = (g2 * b.to(g.dtype)).to(B.dtype) @ B  # (T, r), in the compute dtype
            if need_u:
                grad_u = (z * (d * ctx.scale).to(z.dtype)).view(u.shape)
            if need_d:
                grad_d = (z.float() * u2.float()).sum(0) * ctx.scale
        if need_b:
            grad_b = (g2.float() * _flat(h).float()).sum(0)
        return grad_u, None, grad_d, grad_b, None, None


def vera_tail(u: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor, scale: float,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Semantics: out = b * (B (scale * d * u)), the factored adapter path after u = A x.

    u (..., r) in the compute dtype, B (m, r) compute dtype, d (r,), b (m,) float32. Returns (..., m) in
    `out_dtype` (default u's). Saves u (shared with sibling layers that were handed the same u) and
    h = B (c u) (..., m) in the compute dtype, which makes grad_b elementwise; no gradient for B.
    """
    return _Tail.apply(u, B, d, b, scale, u.dtype if out_dtype is None else out_dtype)


def vera_tail_ref(u: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Slow reference of `vera_tail`: the PEFT-style formula through plain autograd."""
    return F.linear(u * (d * scale).to(u.dtype), B) * b.to(u.dtype)


class _Materialized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, bias, A, B, d, b, scale, keep_weight, A_c, source):
        W = vera_delta(A, B, d, b, scale, base=w0, A_c=A_c)  # (m, n) in x's dtype
        # With a source, keep what the norm keeps anyway (its input) and rebuild x from it in backward.
        kept = x if source is None else source.input
        ctx.save_for_backward(kept, w0, A, B, d, b, W if keep_weight else None, A_c)
        ctx.scale, ctx.source = scale, source
        return F.linear(x, W, bias)

    @staticmethod
    def backward(ctx, g):
        x, w0, A, B, d, b, W, A_c = ctx.saved_tensors
        if ctx.source is not None:
            x = ctx.source.recompute(x)  # (..., n): bit for bit the forward's x
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_d, need_b = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        g2, x2 = _flat(g), _flat(x)  # (T, m), (T, n)
        grad_x = grad_bias = grad_d = grad_b = None
        if need_x:  # the frozen layer's own dx: in x's dtype, with the very W of forward
            W = vera_delta(A, B, d, b, ctx.scale, base=w0, A_c=A_c) if W is None else W
            grad_x = (g2 @ W).view(x.shape)  # (T, n)
        if need_d or need_b:
            (m, n), r = w0.shape, A.shape[0]
            Ac = A if A_c is None else A_c
            g_c, x_c = g2.to(Ac.dtype), x2.to(Ac.dtype)  # no copies without a compute dtype
            if _projected_cheaper(g2.shape[0], n, m, r):
                Q = g_c.t() @ (x_c @ Ac.t())  # (m, T) @ (T, r)
            else:
                Q = (g_c.t() @ x_c) @ Ac.t()  # (m, n) @ (n, r)
            grad_d, grad_b = _vector_grads(Q, B, d, b, ctx.scale, need_d, need_b)
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, None, None, grad_d, grad_b, None, None, None, None


def vera_materialized(
    x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
    d: torch.Tensor, b: torch.Tensor, scale: float, keep_weight: bool = True, A_c: torch.Tensor | None = None,
    source: NormSource | None = None,
) -> torch.Tensor:
    """Semantics: y = (W0 + diag(b) B diag(scale * d) A) x + bias, the whole adapted layer in one matmul.

    x (..., n), w0 (m, n) frozen (a transposed view is fine), bias (m,) or None, A (r, n), B (m, r) in
    x's dtype; d (r,), b (m,) float32. Returns (..., m). Saves x and, if keep_weight, W (m, n); backward
    rebuilds W otherwise. No gradient for w0, A or B (w0 must not require one).
    A_c: A (r, n) in a lower compute dtype for the adapter's products: the delta (m, r, n), G = g^T x
    (or x A^T) and Q = G A^T run in it, W and dx = g W stay in x's dtype, grad_d and grad_b in float32.
    source: x's `recompute.NormSource` (from `recompute.source_of`, so its input is alive): save the
    norm's input instead of x and recompute x in backward.
    """
    if w0.requires_grad:
        raise ValueError("vera_materialized: the base weight requires grad; use the factored path")
    return _Materialized.apply(x, w0, bias, A, B, d, b, scale, keep_weight, A_c, source)


def vera_materialized_ref(
    x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
    d: torch.Tensor, b: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Slow reference of `vera_materialized`: frozen layer plus the factored formula, plain autograd."""
    return F.linear(x, w0, bias) + vera_tail_ref(F.linear(x, A), B, d, b, scale)

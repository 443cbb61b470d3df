"""The VeRA wrapper around one frozen linear layer.

Semantics: h = W0 x + b * (B_sl (s * d * (A_sl dropout(x))))
  A_sl = A[:r, :d_in], B_sl = B[:d_out, :r] are views of the model's shared unit tables, s is the
  distribution's fan-in scale (a constant scalar, folded into d), d (r) and b (d_out) are trained.

The forward picks per call, by the cost model in `ops`, between the factored path (per token) and the
materialized one (W0 + delta once per call); without gradients it reuses a cached W0 + delta until the
vectors or the base weight change. That choice is one pure function, `layer_plan.plan_forward`; the
forward only dispatches on the plan it returns. A quantized base (bitsandbytes 4-bit or 8-bit, `quant`)
always takes the factored path and runs its own forward: a plain W0 would cost the memory quantizing saves.
With a magnitude (DVoRA, VeraConfig.magnitude) every path's output is rescaled per row: docs/dvora.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, recompute
from .layer_plan import (
    CacheStep,
    CallFacts,
    Path,
    Plan,
    SharedInput,
    WeightCache,
    WeightKey,
    plan_forward,
    share_inputs,
)
from .leaves import is_conv1d_leaf, is_conv_leaf, is_embedding_leaf, is_linear_leaf, linear_shape
from .projection import Projection
from .quant import dequantized_weight, quant_kind

__all__ = [
    "VeraLinear", "SharedInput", "share_inputs", "is_linear_leaf", "is_conv_leaf", "is_embedding_leaf", "linear_shape",
    "check_fits", "new_vectors", "merge_layer", "unmerge_layer", "check_merge_scale",
]

def check_fits(projection: Projection, r: int, d_out: int, d_in: int) -> None:
    """Raise ValueError unless the projection's tables hold a rank-r (d_out, d_in) layer's slices."""
    if r > projection.rank or d_in > projection.max_in or d_out > projection.max_out:
        raise ValueError(
            f"projection ({projection.rank}, {projection.max_in}, {projection.max_out}) is too small for "
            f"a rank-{r} layer of shape ({d_out}, {d_in})"
        )


def new_vectors(r: int, d_out: int, d_initial: float, train_d: bool, train_b: bool,
                device: torch.device) -> tuple[nn.Parameter, nn.Parameter]:
    """(d (r,), b (d_out,)), float32 whatever the base dtype: they are tiny and carry the whole adaptation.

    b starts at zero when trained (the adapted model equals the base at init). A frozen b is the paper's
    "only d" ablation, which omits b: ones, since a frozen zero b would silence d forever.
    """
    d = nn.Parameter(torch.full((r,), float(d_initial), device=device), requires_grad=train_d)
    b0 = torch.zeros if train_b else torch.ones
    return d, nn.Parameter(b0(d_out, device=device), requires_grad=train_b)


def merge_layer(layer: nn.Module) -> None:
    """Fold `layer`'s delta into its base (`layer._fold(+1)`) and remember the vectors' versions. Idempotent."""
    if layer.merged:
        return
    layer._fold(1.0)
    layer._merged_versions = _vector_versions(layer)
    layer.merged = True


def unmerge_layer(layer: nn.Module) -> None:
    """Subtract the delta merged earlier. Idempotent; refuses if d or b changed while merged."""
    if not layer.merged:
        return
    if layer._merged_versions != _vector_versions(layer):
        raise RuntimeError(
            "VeRA vectors were modified while merged, so the merged delta can no longer be removed "
            "exactly; unmerge before training or loading new vectors"
        )
    layer._fold(-1.0)
    layer.merged = False
    layer._merged_versions = None


def check_merge_scale(scale: torch.Tensor, what: str, units: str) -> None:
    """DVoRA: refuse to merge when m / ||W0 + delta|| is zero somewhere (RuntimeError naming the layer `what`
    and the `units`, e.g. "output rows"): merging would erase those parts of W0 and unmerge could not
    restore them."""
    zero = (scale == 0).nonzero().flatten().tolist()
    if zero:
        raise RuntimeError(
            f"cannot merge DVoRA into {what}: its scale m / ||W0 + delta|| is zero at {units} {zero[:5]}, so "
            "merging would erase them from W0 and unmerge could not restore them"
        )


def _vector_versions(layer: nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in (layer.vera_d, layer.vera_b, layer.vera_m) if p is not None)


class VeraLinear(nn.Module):
    """The VeRA wrapper around one frozen linear layer; with `magnitude`, DVoRA (see `_magnitude`)."""

    def __init__(
        self,
        base: nn.Module,
        projection: Projection,
        r: int,
        d_initial: float,
        dropout: float = 0.0,
        train_d: bool = True,
        train_b: bool = True,
        magnitude: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        if not is_linear_leaf(base) and quant_kind(base) is None:
            raise TypeError(f"VeraLinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")
        self.out_features, self.in_features = linear_shape(base)
        check_fits(projection, r, self.out_features, self.in_features)
        self.r = r
        self.transposed = is_conv1d_leaf(base)
        self.quantized = quant_kind(base)  # "4bit" / "8bit" (bitsandbytes) or None: fixed at wrap time
        self.projection = projection  # plain attribute: shared, never in state_dict
        self.scale = projection.scale(self.in_features, r)
        self.vera_d, self.vera_b = new_vectors(r, self.out_features, d_initial, train_d, train_b, base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_versions: tuple[int, ...] | None = None
        # DVoRA: the magnitude m (d_out,) float32, trained, starting at W0's row norms (identity at init:
        # the dequantized weight's for a quantized base); None (and not in state_dict) for plain VeRA.
        m = ops.row_norms(self._plain_weight()).to(self.vera_b.device) if magnitude else None
        self.vera_m = None if m is None else nn.Parameter(m)
        self._merged_scale: torch.Tensor | None = None  # DVoRA while merged: the scale folded into W0
        self.shared_input: SharedInput | None = None  # set by share_inputs for sibling layers
        # Runtime only (never saved): a lower dtype for the adapter's own products in training calls; see
        # `compute_dtype_for` and verakit.set_compute_dtype. None: everything in the input's dtype.
        self.compute_dtype: torch.dtype | None = None
        self._cache: WeightCache | None = None  # inference cache of W0 + delta (`layer_plan`)

    # The layer-kind protocol (shared by VeraConv, VeraEmbedding; dispatched by `inject.layer_class`): the
    # kind string a file records, the fan-in of the A-side scale, and the delta in the weight's layout.
    @property
    def kind(self) -> str:
        return "conv1d" if self.transposed else "linear"

    @staticmethod
    def kind_error(kind: str, d_out: int, d_in: int) -> str | None:
        """None when `kind` names this class's layout for a (d_out, d_in) layer; "" when the kind is another
        class's; else what is wrong with it."""
        return None if kind in ("linear", "conv1d") else ""

    @staticmethod
    def fan_in(kind: str, d_in: int) -> int:
        return d_in

    @staticmethod
    def weight_delta(delta: torch.Tensor, kind: str) -> torch.Tensor:
        """The (d_out, d_in) delta in the weight's layout: transposed for Conv1D."""
        return delta.t() if kind == "conv1d" else delta

    def slices(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_sl (r, d_in), B_sl (d_out, r)): views of the shared tables, no copy."""
        A, B = self.projection.tables(device, dtype)
        return A[: self.r, : self.in_features], B[: self.out_features, : self.r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        facts = self.call_facts(x)
        plan = plan_forward(facts)
        if plan.path is Path.MERGED:
            return self.base(x)
        if plan.path is Path.CACHED and facts.cached:  # built and current: nothing to slice, count or rebuild
            return F.linear(x, self._cache.weight, self.base.bias)
        A, B = self.slices(x.device, x.dtype)  # (r, d_in), (d_out, r) views
        if plan.cache is CacheStep.DROP:
            self._cache = None  # training: the vectors change every step, free the weight
        elif plan.cache is not CacheStep.KEEP:
            self._cache = self._cache_step(plan, A, B)
        if plan.path is Path.CACHED:
            return F.linear(x, self._cache.weight, self.base.bias)
        d, b, grad = self.vera_d, self.vera_b, facts.grad
        low = self.compute_dtype_for(x, grad)
        mag = None if self.vera_m is None else self._magnitude(x.device, grad)  # (d_out,) float32
        bias = self.base.bias if mag is None else None  # DVoRA scales W' x only: bias added after
        if plan.path is Path.MATERIALIZED:
            A_c = None if low is None else self.slices(x.device, low)[0]
            src = recompute.source_of(x) if grad else None  # x rebuilt from its norm's input in backward
            y = ops.vera_materialized(x, self._base_weight(), bias, A, B, d, b, self.scale, plan.keep_weight, A_c, src)
            return y if mag is None else self._rescaled(y, mag)
        if low is not None:
            A, B = self.slices(x.device, low)  # cached per dtype by the projection, not cast per call
        u = self._projected(x, A)  # (..., r) in A's dtype
        tail = ops.vera_tail(u, B, d, b, self.scale, None if low is None else x.dtype)  # (..., d_out)
        if mag is None:
            return self.base(x) + tail
        return self._rescaled(self._base_no_bias(x) + tail, mag)

    def call_facts(self, x: torch.Tensor) -> CallFacts:
        """What `layer_plan.plan_forward` decides this call's path from."""
        d, b, m, w0 = self.vera_d, self.vera_b, self.vera_m, self.base.weight
        needs = x.requires_grad or d.requires_grad or b.requires_grad or (m is not None and m.requires_grad)
        grad = torch.is_grad_enabled() and needs
        # One-matmul paths need W0 x to be a plain matmul we may replace, and the same x on both paths.
        one_matmul = (
            self.quantized is None and not w0.requires_grad and w0.dtype == x.dtype
            and (type(self.base) is nn.Linear or self.transposed)
            and not (self.training and isinstance(self.dropout, nn.Dropout))
            and not torch.is_autocast_enabled(x.device.type)
        )
        c, compiling = self._cache, torch.compiler.is_compiling()
        # Under compile the plan never reads the cache, and its key (data pointers) would break the graph.
        current = not compiling and c is not None and c.key == self._weight_key(x.device, x.dtype)
        return CallFacts(
            merged=self.merged, grad=grad, input_grad=x.requires_grad, one_matmul=one_matmul,
            compiling=compiling, tokens=x.numel() // self.in_features, n=self.in_features,
            m=self.out_features, r=self.r, cached=current and c.weight is not None,
            tokens_seen=c.tokens_seen if current else 0,
        )

    def compute_dtype_for(self, x: torch.Tensor, grad: bool) -> torch.dtype | None:
        """The dtype of the adapter's products for this call, or None for x's own dtype: `compute_dtype`
        only applies to calls with gradients (gradient-free calls stay exact, so evaluation matches the
        saved file), only when it is narrower than x's dtype (a bf16 or fp16 model is low precision
        already). Under autocast it is autocast's dtype: autocast casts A and B to it inside each forward
        product anyway (the rounding of these cached tables), and handing them over in it also keeps the
        custom backward's (T, m) @ (m, r) product out of fp32 (MiniLM r=1024: 21 of ~45 ms per layer at
        3,072 tokens)."""
        device = x.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.compute_dtype
        if low is None or not grad or low.itemsize >= x.dtype.itemsize:
            return None
        return low

    def _projected(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """u = A_sl dropout(x) (..., r) in A's dtype, shared with siblings unless dropout draws a mask per
        layer (or a sibling computed u in another compute dtype)."""
        share = self.shared_input
        if share is None or (self.training and isinstance(self.dropout, nn.Dropout)) or torch.compiler.is_compiling():
            return F.linear(self.dropout(x).to(A.dtype), A)
        u = share.take(x, self)
        if u is None or u.dtype != A.dtype:
            u = F.linear(x.to(A.dtype), A)
            share.put(x, self, u)
        return u

    def _base_weight(self) -> torch.Tensor:
        """W0 as (d_out, d_in); a transposed view for Conv1D."""
        return self.base.weight.t() if self.transposed else self.base.weight

    def _weight_key(self, device: torch.device, dtype: torch.dtype) -> WeightKey:
        d, b, m, w = self.vera_d, self.vera_b, self.vera_m, self.base.weight
        mk = None if m is None else (m._version, m.data_ptr())
        return WeightKey((d._version, d.data_ptr()), (b._version, b.data_ptr()), mk, (w._version, w.data_ptr()),
                         device, dtype)

    def _cache_step(self, plan: Plan, A: torch.Tensor, B: torch.Tensor) -> WeightCache:
        """The cache after a gradient-free one-matmul call: W0 + delta built once it pays (CacheStep.USE),
        kept until d, b or W0 change (then the key differs and counting restarts)."""
        key = self._weight_key(A.device, A.dtype)
        c = self._cache
        weight = c.weight if c is not None and c.key == key else None
        scale = c.scale if c is not None and c.key[:5] == key[:5] else None  # DVoRA's, for any input dtype
        if plan.cache is CacheStep.USE and weight is None:
            if self.vera_m is None:
                weight = ops.vera_delta(A, B, self.vera_d, self.vera_b, self.scale, base=self._base_weight())
            else:  # W' = scale * (W0 + delta), built in float32 and rounded once
                scale = self._magnitude_now(A.device) if scale is None else scale
                weight = self._scaled_weight(scale).to(A.dtype)
        return WeightCache(key, weight, plan.tokens_seen, scale)

    # DVoRA (VeraConfig.magnitude): W' = m * (W0 + delta) / ||W0 + delta|| per output row. The forward never
    # forms W' per call: with scale = m / ||W0 + delta|| (the norm detached, `ops.magnitude_scale`),
    # W' x + bias = scale * (W0 x + delta x) + bias, so every path above runs as for VeRA and its output
    # (without the bias) is multiplied by scale. The norm itself needs W0 + delta once per call with
    # gradients (the vectors change every step), once per change of d, b, m or W0 without.
    def _magnitude(self, device: torch.device, grad: bool) -> torch.Tensor:
        """scale = m / ||W0 + delta|| (d_out,) float32, with m's gradient; cached for gradient-free calls."""
        if grad or torch.compiler.is_compiling():  # no Python-side cache under torch.compile
            return self._magnitude_now(device)
        key = self._weight_key(device, torch.float32)
        c = self._cache
        current = c is not None and c.key[:5] == key[:5]  # same d, b, m, W0 and device
        if current and c.scale is not None:
            return c.scale
        scale = self._magnitude_now(device)
        if current:
            c.scale = scale
        else:
            self._cache = WeightCache(key, None, 0, scale)
        return scale

    def _magnitude_now(self, device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            weight = self._adapted_weight(device)  # W0 + delta (d_out, d_in) float32: the one temporary
        return ops.magnitude_scale(weight, None, self.vera_m)

    def _adapted_weight(self, device: torch.device) -> torch.Tensor:
        """W0 + delta (d_out, d_in) float32, a new tensor (W0 dequantized for a quantized base)."""
        A, B = self.slices(device, torch.float32)
        d, b = self.vera_d.detach(), self.vera_b.detach()
        return ops.vera_delta(A, B, d, b, self.scale, base=self._plain_weight().float())

    def _scaled_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """W' = scale * (W0 + delta) (d_out, d_in) float32, no gradients."""
        return self._adapted_weight(scale.device).mul_(scale.detach().unsqueeze(1))

    def _rescaled(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """scale * y + bias: y is W0 x + delta x (..., d_out) without the base's bias."""
        y = y * scale.to(y.dtype)
        return y if self.base.bias is None else y + self.base.bias.to(y.dtype)

    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x without the bias: the plain matmul where the base is one, else (quantized) base(x) - bias, as
        PEFT's DoRA does."""
        if self.quantized is None and (type(self.base) is nn.Linear or self.transposed):
            return F.linear(x, self._base_weight())
        y = self.base(x)
        return y if self.base.bias is None else y - self.base.bias.to(y.dtype)

    def _plain_weight(self) -> torch.Tensor:
        """W0 (d_out, d_in) as the layer multiplies by it: dequantized (float32) for a quantized base."""
        return dequantized_weight(self.base) if self.quantized is not None else self._base_weight()

    def delta_weight(self) -> torch.Tensor:
        """Semantics: diag(b) B_sl diag(s d) A_sl, float32, shape (d_out, d_in)."""
        A, B = self.slices(self.vera_b.device, torch.float32)
        return ops.vera_delta(A, B, self.vera_d.detach(), self.vera_b.detach(), self.scale)

    def _weight_delta(self) -> torch.Tensor:
        delta = self.delta_weight()
        return delta.t() if self.transposed else delta

    def merge(self) -> None:
        """Add the delta into the base weight (computed in fp32, cast once). Idempotent."""
        if self.merged:
            return
        if self.quantized is not None:
            raise RuntimeError(
                f"cannot merge VeRA into a {self.quantized} quantized base ({type(self.base).__name__} "
                f"{self.out_features}x{self.in_features}); merge into a full-precision base instead: load the "
                "model unquantized, load_adapter, then export_merged"
            )
        merge_layer(self)

    def unmerge(self) -> None:
        """Subtract the delta merged earlier. Idempotent; refuses if d or b changed while merged."""
        unmerge_layer(self)

    def _fold(self, sign: float) -> None:
        """W0 += sign * delta: in place in one addmm for fp32 weights, else in fp32 and cast once."""
        w = self.base.weight
        self._cache = None
        with torch.no_grad():
            if self.vera_m is not None:
                self._fold_magnitude(sign)
                return
            if w.dtype != torch.float32:
                w.copy_((w.float() + sign * self._weight_delta().to(w.device)).to(w.dtype))
                return
            A, B = self.slices(w.device, torch.float32)
            d, b = self.vera_d.detach().float(), self.vera_b.detach().float()
            w0 = self._base_weight()  # (d_out, d_in), a view of the stored weight: added into in place
            ops.vera_delta(A, B, d, b, self.scale, base=w0, alpha=sign, out=w0)

    def _fold_magnitude(self, sign: float) -> None:
        """DVoRA: merge W0 <- scale * (W0 + delta) and keep scale (d_out,), so unmerge can restore
        W0 = W' / scale - delta (float32 arithmetic, cast once; within float rounding of the original)."""
        w0 = self._base_weight()  # (d_out, d_in) view of the stored weight
        A, B = self.slices(w0.device, torch.float32)
        d, b = self.vera_d.detach(), self.vera_b.detach()
        if sign > 0:
            scale = self._magnitude_now(w0.device).detach()
            check_merge_scale(scale, f"a {self.out_features}x{self.in_features} layer", "output rows")
            w0.copy_(self._scaled_weight(scale))
            self._merged_scale = scale
            return
        restored = ops.vera_delta(A, B, d, b, self.scale, base=w0.float() / self._merged_scale.unsqueeze(1), alpha=-1.0)
        w0.copy_(restored)
        self._merged_scale = None

    def extra_repr(self) -> str:
        low = "" if self.compute_dtype is None else f", compute_dtype={self.compute_dtype}"
        low += "" if self.quantized is None else f", base={self.quantized}"
        low += "" if self.vera_m is None else ", magnitude=True"
        return f"r={self.r}, in={self.in_features}, out={self.out_features}, merged={self.merged}{low}"

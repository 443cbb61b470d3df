"""VeRA on torch's convolutions (nn.Conv1d, nn.Conv2d, nn.Conv3d): the linear layer's math on the kernel.

Semantics: y = conv(x, W0) + b * conv1x1(B_sl, s * d * conv(dropout(x), A_k))
  The kernel viewed as a linear map is W0.reshape(C_out, d_in), d_in = C_in/groups * prod(kernel) (im2col
  order: input channel, then kernel positions), so a convolution takes A_sl = A[:r, :d_in],
  B_sl = B[:C_out, :r] and s = scale(d_in, r) exactly as a linear layer of shape (C_out, d_in) would.
  A_k = A_sl.reshape(r, C_in/groups, *kernel) is a convolution into r channels with the base's stride,
  padding, dilation and padding mode; d scales those r channels; B_sl is a 1x1 convolution to C_out
  channels; b scales them. With groups g, every group convolves its own C_in/g input channels with the
  same A_k into its own r channels, and the output channels of group j read group j's r channels through
  their rows of B_sl. Either way the delta kernel is diag(b) B_sl diag(s d) A_sl reshaped to W0's shape,
  which is what `merge` adds, exactly.
  DVoRA (VeraConfig.magnitude): W' = m * (W0 + delta) / ||W0 + delta|| per output channel, the norm over
  (C_in/groups, *kernel) as PEFT's DoRA takes it (`_magnitude_forward`, docs/dvora.md).

The forward adds the delta to the kernel and runs one convolution: building it costs C_out * d_in * r
multiply-adds, a fraction of the convolution's own at any useful spatial size, and autograd then keeps x
for the kernel's gradient as LoRA does. Gradient-free calls reuse W0 + delta until d, b or W0 change (one
kernel-sized copy per layer). The factored form above runs only where the adapter's input differs from the
base's (dropout while training) or d and b differ per batch row (the serving bank, `slots`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .layer import (
    check_fits,
    check_merge_scale,
    is_conv_leaf,
    linear_shape,
    merge_layer,
    new_vectors,
    unmerge_layer,
)
from .layer_plan import WeightCache, WeightKey
from .projection import Projection

__all__ = ["VeraConv", "conv_kind", "parse_conv_kind", "conv_adapter"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_kind(kernel: tuple[int, ...]) -> str:
    """The file's kind of a convolution: "conv:" and the kernel size, e.g. "conv:3x3" (Conv2d), "conv:5"."""
    return "conv:" + "x".join(str(k) for k in kernel)


def parse_conv_kind(kind: str) -> tuple[int, ...] | None:
    """The kernel size of a "conv:KxK..." kind (1 to 3 positive sizes), or None for any other string."""
    if not kind.startswith("conv:"):
        return None
    parts = kind[5:].split("x")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and p == str(int(p)) and int(p) > 0 for p in parts):
        return None
    return tuple(int(p) for p in parts)


def conv_adapter(base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, c: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """Semantics: b * conv1x1(B, c * conv(x, A_k)), the factored adapter path of a convolution `base`.

    x (N, C_in, *spatial) or unbatched (C_in, *spatial); A (r, d_in), B (C_out, r) in x's dtype; c = s * d
    as (r,) or per batch row (N, r); b (C_out,) or per row (N, C_out). Returns (N, C_out, *spatial_out):
    what the base's own convolution outputs, without its bias.
    """
    unbatched = x.dim() == len(base.kernel_size) + 1
    if unbatched:
        x = x.unsqueeze(0)
    g, r = base.groups, A.shape[0]
    A_k = A.reshape(r, -1, *base.kernel_size)  # (r, C_in/g, *kernel)
    if g > 1:
        A_k = A_k.repeat(g, *([1] * (A_k.dim() - 1)))  # (g r, C_in/g, *kernel): one copy of A_k per group
    # The base's own forward with another kernel: its stride, padding, padding mode, dilation and groups.
    u = base._conv_forward(x, A_k, None)  # (N, g r, *spatial)
    n, spatial = u.shape[0], u.shape[2:]
    ones = [1] * len(spatial)
    c = c.to(u.dtype).view(-1 if c.dim() == 2 else 1, 1, r, *ones)  # (N or 1, 1, r, 1, ...)
    u = (u.view(n, g, r, *spatial) * c).view(n, g * r, *spatial)
    h = _CONV[len(spatial)](u, B.reshape(*B.shape, *ones), groups=g)  # (N, C_out, *spatial)
    h = h * b.to(h.dtype).view(-1 if b.dim() == 2 else 1, B.shape[0], *ones)
    return h.squeeze(0) if unbatched else h


class VeraConv(nn.Module):
    """The VeRA wrapper around one frozen nn.Conv1d / Conv2d / Conv3d (any groups, stride, padding)."""

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
        if not is_conv_leaf(base):
            raise TypeError(f"VeraConv wraps nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base).__name__}")
        self.base = base
        self.out_features, self.in_features = linear_shape(base)  # (C_out, C_in/groups * prod(kernel))
        check_fits(projection, r, self.out_features, self.in_features)
        self.r = r
        self.kernel: tuple[int, ...] = tuple(base.kernel_size)
        self.quantized = None  # no quantized convolutions exist to wrap; `merge` asks every layer
        self.projection = projection  # plain attribute: shared, never in state_dict
        self.scale = projection.scale(self.in_features, r)
        self.vera_d, self.vera_b = new_vectors(r, self.out_features, d_initial, train_d, train_b, base.weight.device)
        # DVoRA: m (C_out,) float32, trained, starting at W0's norm per output channel (identity at init);
        # None (and not in state_dict) for plain VeRA. See `_magnitude_forward`.
        m = ops.row_norms(self._plain_weight()).to(self.vera_b.device) if magnitude else None
        self.vera_m = None if m is None else nn.Parameter(m)
        self._merged_scale: torch.Tensor | None = None  # DVoRA while merged: the scale folded into W0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_versions: tuple[int, ...] | None = None
        # verakit.set_compute_dtype sets this on every layer; convolutions always compute in the base's dtype.
        self.compute_dtype: torch.dtype | None = None
        self._cache: WeightCache | None = None  # W0 + delta for gradient-free calls, built at once

    @property
    def kind(self) -> str:
        return conv_kind(self.kernel)

    @staticmethod
    def kind_error(kind: str, d_out: int, d_in: int) -> str | None:
        """As VeraLinear.kind_error: None (ours and consistent), "" (not ours) or the fault."""
        kernel = parse_conv_kind(kind)
        if kernel is None:
            return ""
        if d_in % math.prod(kernel):
            return f"kind {kind!r}: d_in {d_in} is not a multiple of the kernel's {math.prod(kernel)} positions"
        return None

    @staticmethod
    def fan_in(kind: str, d_in: int) -> int:
        return d_in

    @staticmethod
    def weight_delta(delta: torch.Tensor, kind: str) -> torch.Tensor:
        """The (C_out, d_in) delta as a kernel (C_out, d_in / prod(kernel), *kernel)."""
        kernel = parse_conv_kind(kind)
        assert kernel is not None, kind
        return delta.reshape(delta.shape[0], -1, *kernel)

    def slices(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_sl (r, d_in), B_sl (C_out, r)): views of the shared tables, no copy."""
        A, B = self.projection.tables(device, dtype)
        return A[: self.r, : self.in_features], B[: self.out_features, : self.r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.vera_m is not None:
            return self._magnitude_forward(x)
        w0, d, b = self.base.weight, self.vera_d, self.vera_b
        A, B = self.slices(x.device, w0.dtype)  # (r, d_in), (C_out, r)
        if self.training and isinstance(self.dropout, nn.Dropout):  # the base sees x, the adapter dropout(x)
            return self.base(x) + conv_adapter(self.base, self.dropout(x), A, B, d * self.scale, b)
        grad = torch.is_grad_enabled() and (d.requires_grad or b.requires_grad or w0.requires_grad)
        if grad and self.factored_for(x):  # small feature maps: cheaper than building the delta kernel
            self._cache = None
            return self.base(x) + conv_adapter(self.base, x, A, B, d * self.scale, b)
        if grad or torch.compiler.is_compiling():
            self._cache = None
            W = self._weight(A, B)
        else:
            key = WeightKey((d._version, d.data_ptr()), (b._version, b.data_ptr()), None,
                            (w0._version, w0.data_ptr()), A.device, A.dtype)
            if self._cache is None or self._cache.key != key:
                self._cache = WeightCache(key, self._weight(A, B))
            W = self._cache.weight
        return self.base._conv_forward(x, W, self.base.bias)

    def factored_for(self, x: torch.Tensor) -> bool:
        """Whether a training step on input `x` costs less factored (a k x k convolution into r channels per
        group, then a grouped 1x1: N P r (g d_in + C_out) multiply-adds over P output positions) than with
        the delta kernel built (C_out r d_in, whatever the batch). Small feature maps (a ResNet's deep
        stages) take the factored path; wide ones the kernel. Forward and backward scale alike."""
        base, n_k = self.base, len(self.kernel)
        batch = x.shape[0] if x.dim() == n_k + 2 else 1
        if base.padding == "same":
            positions = math.prod(x.shape[-n_k:])
        else:
            pad = (0,) * n_k if base.padding == "valid" else base.padding
            positions = math.prod((size + 2 * p - dil * (k - 1) - 1) // s + 1 for size, p, dil, k, s in
                                  zip(x.shape[-n_k:], pad, base.dilation, self.kernel, base.stride, strict=True))
        return batch * positions * (base.groups * self.in_features + self.out_features) < self.out_features * self.in_features

    def _weight(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """W0 + delta as a kernel, in W0's dtype (differentiable in d and b)."""
        w0 = self.base.weight
        W = ops.vera_delta(A, B, self.vera_d, self.vera_b, self.scale, base=w0.reshape(self.out_features, self.in_features))
        return W.view_as(w0)

    def delta_weight(self) -> torch.Tensor:
        """Semantics: diag(b) B_sl diag(s d) A_sl, float32, shape (C_out, d_in); `weight_delta` makes it a kernel."""
        A, B = self.slices(self.vera_b.device, torch.float32)
        return ops.vera_delta(A, B, self.vera_d.detach(), self.vera_b.detach(), self.scale)

    def merge(self) -> None:
        """Add the delta into the kernel (computed in fp32, cast once). Idempotent."""
        merge_layer(self)

    def unmerge(self) -> None:
        """Subtract the delta merged earlier. Idempotent; refuses if d or b changed while merged."""
        unmerge_layer(self)

    def _plain_weight(self) -> torch.Tensor:
        """W0 as the (C_out, d_in) linear map (a view for a contiguous kernel, else a copy)."""
        return self.base.weight.reshape(self.out_features, self.in_features)

    def _fold(self, sign: float) -> None:
        w = self.base.weight
        self._cache = None
        if self.vera_m is not None:
            self._fold_magnitude(sign)
            return
        with torch.no_grad():
            delta = self.weight_delta(self.delta_weight(), self.kind).to(w.device)
            if w.dtype == torch.float32:
                w.add_(delta, alpha=sign)
            else:
                w.copy_((w.float() + sign * delta).to(w.dtype))

    # DVoRA (VeraConfig.magnitude): W' = m * (W0 + delta) / ||W0 + delta|| per output channel, the norm over
    # (C_in/groups, *kernel) as PEFT's DoRA for convolutions takes it, detached in backward as VeraLinear's.
    # With scale = m / ||W0 + delta|| (C_out,), conv(x, W') + bias = scale * (conv(x, W0) + conv(x, delta))
    # + bias, so each path of `forward` runs as for VeRA, without the bias, and is rescaled per channel. The
    # norm needs W0 + delta (C_out, d_in) in float32 once per call with gradients (the kernel-building path
    # builds it anyway), once per change of d, b, m or W0 without (then W' itself is cached).
    def _magnitude_forward(self, x: torch.Tensor) -> torch.Tensor:
        w0, d, b, m = self.base.weight, self.vera_d, self.vera_b, self.vera_m
        assert m is not None
        A, B = self.slices(x.device, w0.dtype)  # (r, d_in), (C_out, r)
        dropout = self.training and isinstance(self.dropout, nn.Dropout)
        grad = torch.is_grad_enabled() and (d.requires_grad or b.requires_grad or m.requires_grad or w0.requires_grad)
        if dropout or (grad and self.factored_for(x)):  # the base sees x, the adapter dropout(x)
            self._cache = None
            h = conv_adapter(self.base, self.dropout(x) if dropout else x, A, B, d * self.scale, b)
            return self._rescaled(self.base._conv_forward(x, w0, None) + h, self._magnitude_now(x.device))
        if grad or torch.compiler.is_compiling():
            self._cache = None
            W = self._weight(A, B)  # W0 + delta as a kernel, differentiable in d and b
            if W.dtype == torch.float32:  # this very kernel is `_adapted_weight`'s (same addmm): no second one
                scale = ops.magnitude_scale(W.detach().reshape(self.out_features, self.in_features), None, m)
            else:
                scale = self._magnitude_now(x.device)
            return self._rescaled(self.base._conv_forward(x, W, None), scale)
        key = WeightKey((d._version, d.data_ptr()), (b._version, b.data_ptr()), (m._version, m.data_ptr()),
                        (w0._version, w0.data_ptr()), A.device, A.dtype)
        if self._cache is None or self._cache.key != key:
            scale = self._magnitude_now(x.device)
            self._cache = WeightCache(key, self._scaled_weight(scale).to(w0.dtype).view(w0.shape), 0, scale)
        return self.base._conv_forward(x, self._cache.weight, self.base.bias)

    def _adapted_weight(self, device: torch.device) -> torch.Tensor:
        """W0 + delta (C_out, d_in) float32, a new tensor without gradients."""
        A, B = self.slices(device, torch.float32)
        d, b = self.vera_d.detach(), self.vera_b.detach()
        return ops.vera_delta(A, B, d, b, self.scale, base=self._plain_weight().float())

    def _magnitude_now(self, device: torch.device) -> torch.Tensor:
        """scale = m / ||W0 + delta|| (C_out,) float32, with m's gradient (the norm a constant)."""
        with torch.no_grad():
            full = self._adapted_weight(device)
        return ops.magnitude_scale(full, None, self.vera_m)

    def _scaled_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """W' = scale * (W0 + delta) (C_out, d_in) float32, no gradients."""
        return self._adapted_weight(scale.device).mul_(scale.detach().unsqueeze(1))

    def _rescaled(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """scale * y + bias per output channel: y (N, C_out, *spatial) or unbatched, without the bias."""
        shape = (-1,) + (1,) * len(self.kernel)  # the channel dim, then the spatial dims
        y = y * scale.to(y.dtype).view(shape)
        return y if self.base.bias is None else y + self.base.bias.to(y.dtype).view(shape)

    def _fold_magnitude(self, sign: float) -> None:
        """DVoRA: merge W0 <- scale * (W0 + delta) and keep scale (C_out,), so unmerge can restore
        W0 = W' / scale - delta (float32 arithmetic, cast once), as VeraLinear does."""
        w = self.base.weight
        with torch.no_grad():
            if sign > 0:
                scale = self._magnitude_now(w.device).detach()
                check_merge_scale(scale, f"a convolution {tuple(w.shape)}", "output channels")
                w.copy_(self._scaled_weight(scale).view(w.shape))
                self._merged_scale = scale
                return
            A, B = self.slices(w.device, torch.float32)
            d, b = self.vera_d.detach(), self.vera_b.detach()
            base = self._plain_weight().float() / self._merged_scale.unsqueeze(1)
            w.copy_(ops.vera_delta(A, B, d, b, self.scale, base=base, alpha=-1.0).view(w.shape))
            self._merged_scale = None

    def extra_repr(self) -> str:
        mag = "" if self.vera_m is None else ", magnitude=True"
        return f"r={self.r}, in={self.in_features}, out={self.out_features}, kernel={self.kernel}, merged={self.merged}{mag}"

"""The VeRA wrapper around one frozen linear layer.

Semantics: h = W0 x + b * (B_sl (s * d * (A_sl dropout(x))))
  A_sl = A[:r, :d_in], B_sl = B[:d_out, :r] are views of the model's shared unit tables, s is the
  distribution's fan-in scale (a constant scalar, folded into d), d (r) and b (d_out) are trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .projection import Projection

__all__ = ["VeraLinear", "is_linear_leaf", "linear_shape"]


def is_linear_leaf(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: weight stored transposed as (d_in, d_out))."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    # Checked by name so the core never imports transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear leaf."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(module) else (w.shape[0], w.shape[1])


class VeraLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        projection: Projection,
        r: int,
        d_initial: float,
        dropout: float = 0.0,
        train_d: bool = True,
        train_b: bool = True,
    ) -> None:
        super().__init__()
        self.base = base
        self.out_features, self.in_features = linear_shape(base)
        if r > projection.rank or self.in_features > projection.max_in or self.out_features > projection.max_out:
            raise ValueError(
                f"projection ({projection.rank}, {projection.max_in}, {projection.max_out}) is too small for "
                f"a rank-{r} layer of shape ({self.out_features}, {self.in_features})"
            )
        self.r = r
        self.transposed = _is_conv1d(base)
        self.projection = projection  # plain attribute: shared, never in state_dict
        self.scale = projection.scale(self.in_features, r)
        dev = base.weight.device
        # Vectors stay fp32 whatever the base dtype: they are tiny and carry the whole adaptation.
        self.vera_d = nn.Parameter(torch.full((r,), float(d_initial), device=dev), requires_grad=train_d)
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, device=dev), requires_grad=train_b)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_versions: tuple[int, int] | None = None

    def slices(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_sl (r, d_in), B_sl (d_out, r)): views of the shared tables, no copy."""
        A, B = self.projection.tables(device, dtype)
        return A[: self.r, : self.in_features], B[: self.out_features, : self.r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        A, B = self.slices(x.device, x.dtype)
        h = F.linear(self.dropout(x), A)  # (..., r)
        h = h * (self.vera_d * self.scale).to(x.dtype)
        h = F.linear(h, B)  # (..., d_out)
        return y + h * self.vera_b.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Semantics: diag(b) B_sl diag(s d) A_sl, float32, shape (d_out, d_in)."""
        A, B = self.slices(self.vera_b.device, torch.float32)
        return (self.vera_b.detach().unsqueeze(1) * B) @ ((self.vera_d.detach() * self.scale).unsqueeze(1) * A)

    def _weight_delta(self) -> torch.Tensor:
        delta = self.delta_weight()
        return delta.t() if self.transposed else delta

    def merge(self) -> None:
        """Add the delta into the base weight (computed in fp32, cast once). Idempotent."""
        if self.merged:
            return
        w = self.base.weight
        with torch.no_grad():
            w.copy_((w.float() + self._weight_delta().to(w.device)).to(w.dtype))
        self._merged_versions = (self.vera_d._version, self.vera_b._version)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the delta merged earlier. Idempotent; refuses if d or b changed while merged."""
        if not self.merged:
            return
        if self._merged_versions != (self.vera_d._version, self.vera_b._version):
            raise RuntimeError(
                "VeRA vectors were modified while merged, so the merged delta can no longer be removed "
                "exactly; unmerge before training or loading new vectors"
            )
        w = self.base.weight
        with torch.no_grad():
            w.copy_((w.float() - self._weight_delta().to(w.device)).to(w.dtype))
        self.merged = False
        self._merged_versions = None

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}, merged={self.merged}"

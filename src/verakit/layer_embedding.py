"""VeRA on an nn.Embedding: the table as a linear map from one-hot token ids, never materialized per call.

Semantics: y[t] = E[i_t] + b * (B_sl (s * d * A_sl[:, i_t]))      (zero adapter term where i_t = padding_idx)
  The table E (V, D) is the transposed weight of the linear map one_hot(i) -> E[i], so an embedding is a
  layer of shape (d_out, d_in) = (D, V): it takes A_sl = A[:r, :V] (one column per token) and
  B_sl = B[:D, :r] from the shared tables, and the merged table is E + delta^T with
  delta = diag(b) B_sl diag(s d) A_sl, the padding row excepted.

The forward gathers only the looked-up columns A_sl[:, ids] (T x r) and runs the linear layer's factored
tail on them, so its cost is T * r * (1 + D) whatever the vocabulary; the tables must still hold V columns
of A, r * V floats (e.g. r=256 and a 50k vocabulary: 12.8M floats, 51 MB in fp32), limited by
`projection.MAX_PROJECTION_ELEMENTS`.

Scale: a linear layer's A-side scale is Kaiming's for its fan-in, which keeps A x at unit variance for
unit-variance inputs. A one-hot input has one non-zero entry, so the same rule gives fan-in 1:
s = scale(1, r), and A_sl[:, i] has the values a linear layer's A x has. (Fan-in V would shrink the
adapter's reach by sqrt(V), 220x for a 50k vocabulary, and b would have to grow as much to act.)

padding_idx: nn.Embedding promises that the padding row is never updated, so the adapter leaves it as
is: padded positions get the base's row in the forward and in the merged table.
Dropout (VeraConfig.dropout) acts on the one-hot input: each looked-up column is dropped whole, or kept
and scaled by 1 / (1 - p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .layer import check_fits, is_embedding_leaf, linear_shape, merge_layer, new_vectors, unmerge_layer
from .projection import Projection

__all__ = ["VeraEmbedding", "embedding_kind", "parse_embedding_kind", "looked_up"]

_MERGE_ROWS = 1 << 16  # rows of the table merged per step: bounds the fp32 temporary for a bf16 table


def embedding_kind(padding_idx: int | None) -> str:
    """The file's kind of an embedding: "embedding", or "embedding:pad=<i>" with a padding row."""
    return "embedding" if padding_idx is None else f"embedding:pad={padding_idx}"


def parse_embedding_kind(kind: str) -> tuple[bool, int | None]:
    """(is an embedding kind, its padding row or None)."""
    if kind == "embedding":
        return True, None
    digits = kind[len("embedding:pad="):]
    if kind.startswith("embedding:pad=") and digits.isdigit() and digits == str(int(digits)):
        return True, int(digits)
    return False, None


def looked_up(ids: torch.Tensor, A: torch.Tensor, padding_idx: int | None, dropout: nn.Module) -> torch.Tensor:
    """Semantics: u = A_sl one_hot(ids) = A_sl[:, ids] (..., r), zero at padding_idx, dropout on the one-hot
    input (a whole column dropped, or kept and scaled by 1 / (1 - p)). Gathers the looked-up columns only."""
    u = F.embedding(ids, A.t())  # (..., r)
    if padding_idx is None and not isinstance(dropout, nn.Dropout):
        return u
    keep = dropout(u.new_ones(ids.shape))  # (...)
    if padding_idx is not None:
        keep = keep.masked_fill(ids == padding_idx, 0)
    return u * keep.unsqueeze(-1)


class VeraEmbedding(nn.Module):
    """The VeRA wrapper around one frozen nn.Embedding (max_norm refused: it rewrites rows on lookup)."""

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
        if magnitude:
            raise ValueError(
                f"VeraConfig.magnitude (DVoRA) adapts linear layers only, got a {type(base).__name__} (embedding); "
                "leave it out of target_modules or use magnitude=False"
            )
        if not is_embedding_leaf(base):
            raise TypeError(f"VeraEmbedding wraps nn.Embedding, got {type(base).__name__}")
        if base.max_norm is not None:
            raise ValueError(
                f"nn.Embedding with max_norm={base.max_norm} renormalizes the rows it looks up in place, so a "
                "delta on the table would be rescaled by the base; VeRA adapts embeddings without max_norm only"
            )
        self.base = base
        self.out_features, self.in_features = linear_shape(base)  # (embedding_dim, num_embeddings)
        check_fits(projection, r, self.out_features, self.in_features)
        self.r = r
        self.padding_idx: int | None = base.padding_idx
        self.quantized = None
        self.projection = projection  # plain attribute: shared, never in state_dict
        self.scale = projection.scale(self.fan_in(self.kind, self.in_features), r)
        self.vera_d, self.vera_b = new_vectors(r, self.out_features, d_initial, train_d, train_b, base.weight.device)
        self.vera_m: nn.Parameter | None = None  # DVoRA's magnitude: linear layers only (refused above)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_versions: tuple[int, int] | None = None
        self.compute_dtype: torch.dtype | None = None  # set by verakit.set_compute_dtype; unused (always exact)
        # Other parameter names holding this very table (an output layer tied to it); set by `attach`.
        # Merging would change them too, so `merge` refuses.
        self.tied: tuple[str, ...] = ()

    @property
    def weight(self) -> torch.Tensor:
        """The base table (V, D), for code that reads `embed_tokens.weight` (dtype, device, weight tying)."""
        return self.base.weight

    @property
    def kind(self) -> str:
        return embedding_kind(self.padding_idx)

    @staticmethod
    def kind_error(kind: str, d_out: int, d_in: int) -> str | None:
        """As VeraLinear.kind_error: None (ours and consistent), "" (not ours) or the fault."""
        ok, pad = parse_embedding_kind(kind)
        if not ok:
            return ""
        if pad is not None and pad >= d_in:
            return f"kind {kind!r}: padding row {pad} is outside the vocabulary of {d_in}"
        return None

    @staticmethod
    def fan_in(kind: str, d_in: int) -> int:
        return 1  # one-hot input: see the module docstring

    @staticmethod
    def weight_delta(delta: torch.Tensor, kind: str) -> torch.Tensor:
        """The (D, V) delta as a table delta (V, D), the padding row zero."""
        out = delta.t().clone()
        pad = parse_embedding_kind(kind)[1]
        if pad is not None:
            out[pad] = 0
        return out

    def slices(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_sl (r, V), B_sl (D, r)): views of the shared tables, no copy."""
        A, B = self.projection.tables(device, dtype)
        return A[: self.r, : self.in_features], B[: self.out_features, : self.r]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # (..., D)
        if self.merged:
            return y
        A, B = self.slices(y.device, y.dtype)
        u = looked_up(ids, A, self.padding_idx, self.dropout)  # (..., r)
        return y + ops.vera_tail(u, B, self.vera_d, self.vera_b, self.scale)

    def delta_weight(self) -> torch.Tensor:
        """Semantics: diag(b) B_sl diag(s d) A_sl, float32, shape (D, V), the padding column included;
        `weight_delta` makes it the table's delta."""
        A, B = self.slices(self.vera_b.device, torch.float32)
        return ops.vera_delta(A, B, self.vera_d.detach(), self.vera_b.detach(), self.scale)

    def merge(self) -> None:
        """Add the delta into the table (in fp32, cast once per row). Idempotent; refused for a tied table."""
        if self.tied and not self.merged:
            raise RuntimeError(
                f"cannot merge VeRA into an embedding table ({self.in_features}x{self.out_features}) that "
                f"{', '.join(self.tied[:3])} also use(s): the merged delta would change those layers too. "
                "Use the adapted model unmerged, or untie the weights (a copy of the table) before attaching"
            )
        merge_layer(self)

    def unmerge(self) -> None:
        """Subtract the delta merged earlier. Idempotent; refuses if d or b changed while merged."""
        unmerge_layer(self)

    def _fold(self, sign: float) -> None:
        """E += sign * delta^T, in blocks of rows so a bf16 table never needs a full fp32 copy."""
        w = self.base.weight  # (V, D)
        with torch.no_grad():
            A, B = self.slices(w.device, torch.float32)
            d, b = self.vera_d.detach().float().to(w.device), self.vera_b.detach().float().to(w.device)
            F_A, F_B = ops.delta_factors(A, B, d, b, self.scale)  # (r, V), (D, r): delta = F_B @ F_A
            left, right = F_A.t(), F_B.t()  # (V, r), (r, D): E^T's delta, transposed
            if self.padding_idx is not None:
                left[self.padding_idx] = 0
            for i in range(0, w.shape[0], _MERGE_ROWS):
                rows = w[i : i + _MERGE_ROWS]
                if w.dtype == torch.float32:
                    rows.addmm_(left[i : i + _MERGE_ROWS], right, alpha=sign)
                else:
                    rows.copy_(torch.addmm(rows.float(), left[i : i + _MERGE_ROWS], right, alpha=sign).to(w.dtype))

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"r={self.r}, vocab={self.in_features}, dim={self.out_features}{pad}, merged={self.merged}"

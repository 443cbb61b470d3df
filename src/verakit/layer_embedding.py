"""VeRA on an nn.Embedding: the table as a linear map from one-hot token ids, never materialized per call.

Semantics: y[t] = E[i_t] + b * (B_sl (s * d * A_sl[:, i_t]))      (zero adapter term where i_t = padding_idx)
  The table E (V, D) is the transposed weight of the linear map one_hot(i) -> E[i], so an embedding is a
  layer of shape (d_out, d_in) = (D, V): it takes A_sl = A[:r, :V] (one column per token) and
  B_sl = B[:D, :r] from the shared tables, and the merged table is E + delta^T with
  delta = diag(b) B_sl diag(s d) A_sl, the padding row excepted.
  DVoRA (VeraConfig.magnitude): y[t] = scale * (E[i_t] + delta^T[i_t]) with scale = m / ||E + delta^T|| per
  embedding dimension, the norm over the whole vocabulary as PEFT's DoRA takes it (`_magnitude`,
  docs/dvora.md); padded positions keep the base's row.

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
from .layer import (
    check_fits,
    check_merge_scale,
    is_embedding_leaf,
    linear_shape,
    merge_layer,
    new_vectors,
    unmerge_layer,
)
from .projection import Projection

__all__ = ["VeraEmbedding", "embedding_kind", "parse_embedding_kind", "looked_up", "table_norms"]

_MERGE_ROWS = 1 << 16  # rows of the table merged per step: bounds the fp32 temporary for a bf16 table
_NORM_ELEMENTS = 1 << 22  # floats per block of DVoRA's table norm (16 MiB): bounds its fp32 temporary


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
        # DVoRA: m (D,) float32, trained, starting at the table's norm per embedding dimension over the whole
        # vocabulary (PEFT's DoRA for embeddings; identity at init); None (not in state_dict) for plain VeRA.
        m = table_norms(base.weight.detach(), None, None) if magnitude else None
        self.vera_m = None if m is None else nn.Parameter(m.to(self.vera_b.device))
        self._merged_scale: torch.Tensor | None = None  # DVoRA while merged: the scale folded into E
        self._scale_cache: tuple[tuple[int, ...], torch.Tensor] | None = None  # (key, scale) for no-grad calls
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_versions: tuple[int, ...] | None = None
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
        if self.vera_m is None:
            return y + ops.vera_tail(u, B, self.vera_d, self.vera_b, self.scale)
        # DVoRA: scale * (E[i] + delta^T[i]) per embedding dimension; the padding row stays the base's
        out = (y + ops.vera_tail(u, B, self.vera_d, self.vera_b, self.scale)) * self._magnitude(y.device).to(y.dtype)
        return out if self.padding_idx is None else torch.where((ids == self.padding_idx).unsqueeze(-1), y, out)

    # DVoRA (VeraConfig.magnitude): E' = (E + delta^T) * m / ||E + delta^T|| per column, the norm of each
    # embedding dimension over the whole vocabulary, as PEFT's DoRA for embeddings takes it (its norm over
    # dim 1 of the (D, V) weight), detached in backward as VeraLinear's; the padding row is left as is.
    # The norm needs every row of E + delta^T: V * D * r multiply-adds per call with gradients (`table_norms`,
    # in blocks of rows, so the float32 temporary is one block, not V x D), once per change of d, b, m or E
    # without (then the scale is cached).
    def _magnitude(self, device: torch.device) -> torch.Tensor:
        """scale = m / ||E + delta^T|| (D,) float32, with m's gradient; cached for gradient-free calls."""
        d, b, m, w = self.vera_d, self.vera_b, self.vera_m, self.base.weight
        assert m is not None
        grad = torch.is_grad_enabled() and (d.requires_grad or b.requires_grad or m.requires_grad)
        if grad or torch.compiler.is_compiling():
            self._scale_cache = None
            return self._magnitude_now(device)
        key = tuple(v for t in (d, b, m, w) for v in (t._version, t.data_ptr())) + (str(device),)
        if self._scale_cache is None or self._scale_cache[0] != key:
            self._scale_cache = (key, self._magnitude_now(device))
        return self._scale_cache[1]

    def _factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (V, r), right (r, D)) float32 with delta^T = left @ right, the padding row of left zero."""
        A, B = self.slices(device, torch.float32)
        d, b = self.vera_d.detach().float().to(device), self.vera_b.detach().float().to(device)
        F_A, F_B = ops.delta_factors(A, B, d, b, self.scale)  # (r, V), (D, r): delta = F_B @ F_A
        left = F_A.t()  # F_A is a new tensor: zeroing its padding column touches nothing shared
        if self.padding_idx is not None:
            left[self.padding_idx] = 0
        return left, F_B.t()

    def _magnitude_now(self, device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            norms = table_norms(self.base.weight, *self._factors(device))
        return self.vera_m / norms.clamp_min(torch.finfo(torch.float32).tiny)  # as ops.magnitude_scale

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
        self._scale_cache = None
        if self.vera_m is not None:
            self._fold_magnitude(sign)
            return
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

    def _fold_magnitude(self, sign: float) -> None:
        """DVoRA: merge E <- (E + delta^T) * scale and keep scale (D,), so unmerge restores E = E' / scale -
        delta^T (float32 per block of rows, cast once); the padding row is never touched."""
        w = self.base.weight  # (V, D)
        with torch.no_grad():
            left, right = self._factors(w.device)
            if sign > 0:
                scale = self._magnitude_now(w.device).detach()
                check_merge_scale(scale, f"an embedding table ({self.in_features}x{self.out_features})", "dimensions")
            else:
                scale = self._merged_scale
            pad = None if self.padding_idx is None else w[self.padding_idx].clone()
            for i in range(0, w.shape[0], _MERGE_ROWS):
                rows, part = w[i : i + _MERGE_ROWS], left[i : i + _MERGE_ROWS]
                if sign > 0:
                    rows.copy_(torch.addmm(rows.float(), part, right).mul_(scale))
                else:
                    rows.copy_(torch.addmm(rows.float() / scale, part, right, alpha=-1.0))
            if pad is not None:
                w[self.padding_idx] = pad
            self._merged_scale = scale if sign > 0 else None

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        pad += "" if self.vera_m is None else ", magnitude=True"
        return f"r={self.r}, vocab={self.in_features}, dim={self.out_features}{pad}, merged={self.merged}"


def table_norms(table: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """Semantics: ||(table + left @ right)[:, j]||_2 per column j (D,), float32: DVoRA's embedding norm.

    table (V, D) any dtype; left (V, r), right (r, D) float32 (the table's delta^T), or both None. Summed
    in blocks of _NORM_ELEMENTS / D rows, so the float32 temporary is one block, never a V x D copy. The
    one spelling of this norm: the layer (m at init, forward, merge), the file merge and the bank call it,
    so at init (a zero delta) the scale is exactly 1."""
    V, D = table.shape
    step = max(1, _NORM_ELEMENTS // D)
    sq = torch.zeros(D, dtype=torch.float32, device=table.device)
    for i in range(0, V, step):
        block = table[i : i + step].float()  # (step, D)
        if left is not None:
            block = torch.addmm(block, left[i : i + step], right)
        sq += block.square().sum(0)
    return sq.sqrt()

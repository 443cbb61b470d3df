"""Many adapters in one forward: per-row integer slots into tables of VeRA vectors.

Semantics: y[i] = W0 x[i] + b[s_i] * (B_sl (scale * d[s_i] * (A_sl x[i])))   for batch row i in slot s_i.
  `SlotConv` and `SlotEmbedding` apply the same per-row d and b to the factored forms of `layer_conv`
  (A_sl as a convolution into r channels, B_sl as a 1x1 one) and `layer_embedding` (the looked-up columns
  of A_sl). DVoRA slots of every kind rescale each row's output by their slot's scale (vera_s, or in
  grouped training m / ||W0 + delta|| from the trained vera_m: `slot_magnitude`).

A and B are shared by every adapter, so a batch whose rows use different adapters costs the same two
shared matmuls as a batch that uses one adapter, plus a gather of one d row and one b row per batch row.
Slot 0 is "no adapter": its rows are zero and never written, so slot-0 rows get exactly the base output.

The tables are `nn.Parameter`s (frozen by default): with `requires_grad_(True)` the per-row gather
backpropagates as an index-add into the rows of the slots used, so one batch can train many adapters.

The slots of the batch in flight live in one `RowSlots` object shared by every slot layer of a model (the
vLLM/punica pattern: integer index tensors set once per batch, never adapter names inside layers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .layer import VeraLinear, check_fits, is_conv_leaf, is_embedding_leaf, is_linear_leaf, linear_shape
from .layer_conv import conv_adapter
from .layer_embedding import VeraEmbedding, looked_up
from .leaves import is_conv1d_leaf
from .projection import Projection
from .quant import quant_kind
from .slot_magnitude import init_magnitude, trained_scale

__all__ = ["RowSlots", "SlotLinear", "SlotConv", "SlotEmbedding", "SlotHeadLinear", "slot_layer"]


class RowSlots:
    """The slot of every batch row for the forward in flight, shared by all slot layers of one model."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # [B] int64, on the model's device
        self.active = False  # False when every row is in slot 0: layers skip the adapter path

    @contextmanager
    def use(self, ids: torch.Tensor) -> Iterator[None]:
        """Set the per-row slots `ids` [B] for the duration of the block (not reentrant)."""
        if self.ids is not None:
            raise RuntimeError("per-row slots are already set: RowSlots.use() blocks cannot be nested")
        if ids.dim() != 1 or ids.dtype != torch.int64:
            raise ValueError(f"per-row slots must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
        self.ids, self.active = ids, bool((ids != 0).any())
        try:
            yield
        finally:
            self.ids, self.active = None, False

    def current(self, batch: int, where: str) -> torch.Tensor:
        ids = self.ids
        if ids is None:
            raise RuntimeError(f"{where}: no per-row slots are set; run the model inside AdapterBank.rows(...)")
        if ids.shape[0] != batch:
            raise ValueError(f"{where}: the batch has {batch} rows but {ids.shape[0]} slots were given")
        return ids


def _per_row(table: torch.Tensor, ids: torch.Tensor, ndim: int) -> torch.Tensor:
    """Semantics: table[ids] reshaped to (B, 1, ..., n) so it broadcasts over an ndim-D input's middle dims."""
    rows = table[ids]  # (B, n)
    return rows.view(rows.shape[0], *([1] * (ndim - 2)), rows.shape[1])


def _row_tail(layer: nn.Module, u: torch.Tensor, B: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Semantics: b[ids] * (B_sl (scale * d[ids] * u)) per batch row: the VeRA tail (`ops.vera_tail_ref`) with
    each row's own vectors. u (B, ..., r), B (d_out, r) in u's dtype; returns (B, ..., d_out)."""
    h = F.linear(u * (_per_row(layer.vera_d, ids, u.dim()) * layer.scale).to(u.dtype), B)
    return h * _per_row(layer.vera_b, ids, u.dim()).to(u.dtype)


def _init_slot_tables(layer: nn.Module, kind: str, base: nn.Module, projection: Projection, r: int, slots: int,
                      rows: RowSlots, dropout: float, name: str, fan_in: int | None = None) -> None:
    """What every slot layer holds: the base, the shared projection and rows, and the (S, r), (S, d_out) tables."""
    layer.base = base
    layer.out_features, layer.in_features = linear_shape(base)
    try:
        check_fits(projection, r, layer.out_features, layer.in_features)
    except ValueError as e:
        raise ValueError(f"{kind} {name!r}: {e}") from None
    if slots < 1:
        raise ValueError(f"{kind} {name!r}: needs at least one slot (slot 0, the base model), got {slots}")
    layer.r, layer.name = r, name
    layer.projection = projection  # plain attribute: shared, never in state_dict
    layer.rows = rows  # plain attribute: shared by every slot layer of the model
    layer.fan_in = layer.in_features if fan_in is None else fan_in  # of the A-side scale, as the VeRA layer's
    layer.scale = projection.scale(layer.fan_in, r)
    dev = base.weight.device
    layer.vera_d = nn.Parameter(torch.zeros(slots, r, device=dev), requires_grad=False)  # (S, r)
    layer.vera_b = nn.Parameter(torch.zeros(slots, layer.out_features, device=dev), requires_grad=False)  # (S, d_out)
    layer.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    layer.register_parameter("vera_s", None)  # (S, d_out) DVoRA scale per slot (`magnitude_table`); None: none yet
    layer.register_parameter("vera_m", None)  # (S, d_out) DVoRA magnitude per slot (grouped training), or None
    layer._norms_key, layer._norms = None, {}  # slot_magnitude's cache: ||W0 + delta|| per slot at these d, b


def _magnitude_table(layer: nn.Module) -> nn.Parameter:
    """layer.vera_s (S, d_out), allocated on first use with every slot at s = 1 (plain VeRA), frozen."""
    if layer.vera_s is None:
        layer.vera_s = nn.Parameter(torch.ones_like(layer.vera_b), requires_grad=False)
    return layer.vera_s


class SlotLinear(nn.Module):
    """A frozen linear layer with VeRA vectors for `slots` adapters; each batch row picks its slot.

    Wraps the same base layer and shared projection a `VeraLinear` would (composition, no subclassing).
    The base runs its own forward, so a bitsandbytes-quantized base (`quant`) stays packed: the adapter
    part never needs W0 (tested in tests/serve/test_bank_quantized.py).
    Tables: vera_d (S, r) in units of this layer's rank-r scale, vera_b (S, d_out); both float32.

    DVoRA (weight-decomposed) slots: y = s * (W0 x + delta x) + bias with s = m / ||W0 + delta|| per output
    row, which depends only on the slot's adapter, so it is computed once when the adapter is written
    (`slot_tables`) and kept in vera_s (S, d_out), float32; a plain VeRA slot (and slot 0) has s = 1. The
    table exists only once a DVoRA adapter was written (`magnitude_table`): until then the forward is the
    plain one. With it, a batch still costs the two shared matmuls plus per-row scaling, and s = 1 rows get
    bit for bit the plain answer ((s - 1) * W0x is exactly zero).

    Grouped DVoRA training keeps m instead (vera_m (S, d_out), trained; `train_magnitude`): each step
    computes s = m / ||W0 + delta|| for every slot in the batch from that slot's current d and b (the norm
    detached, as VeraLinear), so a group's gradients equal those of its DVoRA layer alone (`slot_magnitude`;
    the same for SlotConv and SlotEmbedding, each with its kind's norm).
    """

    def __init__(
        self, base: nn.Module, projection: Projection, r: int, slots: int, rows: RowSlots,
        dropout: float = 0.0, name: str = "",
    ) -> None:
        super().__init__()
        if not is_linear_leaf(base):
            raise TypeError(f"SlotLinear {name!r}: base must be nn.Linear or transformers Conv1D, got {type(base).__name__}")
        _init_slot_tables(self, "SlotLinear", base, projection, r, slots, rows, dropout, name)
        self.transposed, self.quantized = is_conv1d_leaf(base), quant_kind(base)  # as VeraLinear's, for plain_weight

    @property
    def slots(self) -> int:
        return self.vera_d.shape[0]

    magnitude_table = _magnitude_table

    train_magnitude = init_magnitude

    # (A_sl (r, d_in), B_sl (d_out, r)) views of the shared tables: the VeRA layer's own slicing, not a copy of it;
    # W0 (d_out, d_in) as the layer multiplies by it (dequantized, Conv1D transposed): the VeRA layer's own too.
    slices = VeraLinear.slices
    _base_weight = VeraLinear._base_weight
    plain_weight = VeraLinear._plain_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ids = self.rows.current(x.shape[0], f"SlotLinear {self.name!r}")
        if not self.rows.active:
            return y  # every row is in slot 0, whose vectors are zero (and get zero gradient: d = b = 0)
        A, B = self.slices(x.device, x.dtype)
        h = _row_tail(self, F.linear(self.dropout(x), A), B, ids)  # (B, ..., d_out)
        if self.vera_m is not None:
            s = trained_scale(self, ids).view(ids.shape[0], *([1] * (x.dim() - 2)), -1).to(x.dtype)
        elif self.vera_s is not None:
            s = _per_row(self.vera_s, ids, x.dim()).to(x.dtype)  # (B, 1, ..., d_out)
        else:
            return y + h
        w0x = y if self.base.bias is None else y - self.base.bias  # the bias is outside the decomposed weight
        return y + (s - 1) * w0x + s * h  # = s * (W0 x + delta x) + bias

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}, slots={self.slots}"


class SlotConv(nn.Module):
    """A frozen nn.Conv1d/2d/3d with VeRA vectors for `slots` adapters; each batch row (the input's first
    dimension: batched inputs only) picks its slot. Tables as SlotLinear's, d_in = C_in/groups * prod(kernel);
    DVoRA slots keep their scale per output channel in vera_s (S, C_out), as SlotLinear's per output row."""

    def __init__(self, base: nn.Module, projection: Projection, r: int, slots: int, rows: RowSlots,
                 dropout: float = 0.0, name: str = "") -> None:
        super().__init__()
        if not is_conv_leaf(base):
            raise TypeError(f"SlotConv {name!r}: base must be nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base).__name__}")
        _init_slot_tables(self, "SlotConv", base, projection, r, slots, rows, dropout, name)

    @property
    def slots(self) -> int:
        return self.vera_d.shape[0]

    slices = VeraLinear.slices  # as SlotLinear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if x.dim() != len(self.base.kernel_size) + 2:
            raise ValueError(f"SlotConv {self.name!r}: per-row slots need a batched input, got shape {tuple(x.shape)}")
        ids = self.rows.current(x.shape[0], f"SlotConv {self.name!r}")
        if not self.rows.active:
            return y
        A, B = self.slices(x.device, x.dtype)
        h = conv_adapter(self.base, self.dropout(x), A, B, self.vera_d[ids] * self.scale, self.vera_b[ids])
        if self.vera_m is not None:
            s = trained_scale(self, ids)  # (N, C_out), with m's gradient
        elif self.vera_s is not None:
            s = self.vera_s[ids]
        else:
            return y + h
        s = s.to(y.dtype).view(*ids.shape, -1, *([1] * (x.dim() - 2)))  # (N, C_out, 1, ...)
        bias = self.base.bias
        w0x = y if bias is None else y - bias.to(y.dtype).view(-1, *([1] * (x.dim() - 2)))
        return y + (s - 1) * w0x + s * h  # = s * (conv(x, W0) + conv(x, delta)) + bias, as SlotLinear

    magnitude_table = _magnitude_table
    train_magnitude = init_magnitude

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}, slots={self.slots}"


class SlotEmbedding(nn.Module):
    """A frozen nn.Embedding with VeRA vectors for `slots` adapters; each batch row of ids picks its slot.
    Only the looked-up columns of A_sl are gathered; the padding row stays the base's (as VeraEmbedding).
    DVoRA slots keep their scale per embedding dimension in vera_s (S, D), as SlotLinear's per output row."""

    def __init__(self, base: nn.Module, projection: Projection, r: int, slots: int, rows: RowSlots,
                 dropout: float = 0.0, name: str = "") -> None:
        super().__init__()
        if not is_embedding_leaf(base):
            raise TypeError(f"SlotEmbedding {name!r}: base must be nn.Embedding, got {type(base).__name__}")
        fan_in = VeraEmbedding.fan_in("embedding", 0)
        _init_slot_tables(self, "SlotEmbedding", base, projection, r, slots, rows, dropout, name, fan_in)

    @property
    def slots(self) -> int:
        return self.vera_d.shape[0]

    slices = VeraLinear.slices  # as SlotLinear's

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # (B, ..., D)
        rows = self.rows.current(ids.shape[0], f"SlotEmbedding {self.name!r}")
        if not self.rows.active:
            return y
        A, B = self.slices(y.device, y.dtype)
        u = looked_up(ids, A, self.base.padding_idx, self.dropout)  # (B, ..., r)
        h = _row_tail(self, u, B, rows)
        if self.vera_m is not None:
            s = trained_scale(self, rows)  # (B, D), with m's gradient
        elif self.vera_s is not None:
            s = self.vera_s[rows]
        else:
            return y + h
        out = (y + h) * s.view(s.shape[0], *([1] * (y.dim() - 2)), -1).to(y.dtype)  # as VeraEmbedding: exact for s = 1
        pad = self.base.padding_idx
        return out if pad is None else torch.where((ids == pad).unsqueeze(-1), y, out)

    magnitude_table = _magnitude_table
    train_magnitude = init_magnitude

    def extra_repr(self) -> str:
        return f"r={self.r}, vocab={self.in_features}, dim={self.out_features}, slots={self.slots}"


def slot_layer(base: nn.Module, projection: Projection, r: int, slots: int, rows: RowSlots,
               dropout: float = 0.0, name: str = "") -> SlotLinear | SlotConv | SlotEmbedding:
    """The slot layer for `base`'s kind: SlotConv, SlotEmbedding or SlotLinear."""
    cls = SlotConv if is_conv_leaf(base) else SlotEmbedding if is_embedding_leaf(base) else SlotLinear
    return cls(base, projection, r, slots, rows, dropout, name)


class SlotHeadLinear(nn.Module):
    """An nn.Linear with its own full weight and bias per slot, e.g. each adapter's classifier head.

    Semantics: y[i] = W[s_i] x[i] + c[s_i]. Slot 0 holds the base layer's weights. Rows are grouped by
    slot and each group is one matmul, so the cost grows with the distinct slots in the batch, not with
    copies of W per row. Tables are in the base layer's dtype: weight (S, d_out, d_in), bias (S, d_out).
    """

    def __init__(self, base: nn.Linear, slots: int, rows: RowSlots, name: str = "") -> None:
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"SlotHeadLinear {name!r}: per-slot heads support plain nn.Linear only, got {type(base).__name__}")
        self.in_features, self.out_features, self.name, self.rows = base.in_features, base.out_features, name, rows
        w = base.weight.detach()
        weight = torch.zeros(slots, *w.shape, dtype=w.dtype, device=w.device)  # (S, d_out, d_in)
        weight[0] = w
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias: nn.Parameter | None = None
        if base.bias is not None:
            bias = torch.zeros(slots, self.out_features, dtype=w.dtype, device=w.device)  # (S, d_out)
            bias[0] = base.bias.detach()
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.rows.current(x.shape[0], f"SlotHeadLinear {self.name!r}")
        order = torch.argsort(ids, stable=True)  # rows grouped by slot
        uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)
        # One gather of the U slots in use, then unbind: in backward that is one stack and one index-add
        # into the (S, ...) gradient, where indexing weight[slot] per slot would build a zero-filled
        # (S, d_out, d_in) gradient for every slot in the batch (28x slower with 100 trainable slots).
        weights = self.weight.index_select(0, uniq).unbind(0)  # U x (d_out, d_in)
        biases = (None,) * len(weights) if self.bias is None else self.bias.index_select(0, uniq).unbind(0)
        groups = x[order].split(counts.tolist())
        outs = [F.linear(g, w, c) for g, w, c in zip(groups, weights, biases, strict=True)]
        y = torch.cat(outs)  # (B, ..., d_out), rows in slot order
        return y[torch.argsort(order)]  # back to batch order

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.weight.shape[0]}"

"""Grouped DVoRA training: a trained magnitude m per slot, and each batch row's scale m / ||W0 + delta||.

Semantics, for a slot layer (`slots.SlotLinear`, `SlotConv`, `SlotEmbedding`) whose vera_m (S, d_out) trains:
a batch row in slot u is rescaled by s[u] = m[u] / ||W0 + delta[u]|| per output row (linear), output channel
(convolution) or embedding dimension (embedding), each kind's norm as its own DVoRA layer takes it
(docs/dvora.md), formed from slot u's current d and b and detached (a constant in backward, as DoRA
prescribes), so a group's gradients equal those of its DVoRA layer alone; slot 0 (the base model) gets 1.

The price is one W0 + delta per distinct slot in the batch and layer (for an embedding, one pass over the
vocabulary in blocks, `table_norms`), where a single DVoRA layer forms one. The norms are kept per slot
until d or b change (an optimizer step, a write), so an evaluation pass forms each group's norm once.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .layer import is_conv_leaf, is_embedding_leaf
from .layer_embedding import table_norms

__all__ = ["init_magnitude", "trained_scale"]

_TINY = torch.finfo(torch.float32).tiny  # as ops.magnitude_scale: a zero norm never divides


def init_magnitude(layer: nn.Module) -> nn.Parameter:
    """layer.vera_m (S, d_out), trained, allocated on first use at W0's norms (every slot the identity); the
    caller writes each slot's m. Not beside a vera_s table: a layer either keeps scales (serving) or trains m."""
    if layer.vera_s is not None:
        raise RuntimeError(f"{type(layer).__name__} {layer.name!r}: holds serving scales (vera_s); cannot also train m")
    if layer.vera_m is None:
        # (1, r): b = 0 gives delta = 0, so this is W0's norm, formed by the code that forms every later one
        zero = torch.zeros_like(layer.vera_d[:1])
        norms = _norms(layer, zero, torch.zeros_like(layer.vera_b[:1]))  # (1, d_out)
        layer.vera_m = nn.Parameter(norms.expand_as(layer.vera_b).clone())
    return layer.vera_m


def trained_scale(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Semantics: m[ids] / ||W0 + delta[ids]|| per batch row (B, d_out) float32, with m's gradient; 1 for slot 0."""
    m = layer.vera_m
    assert m is not None
    uniq, inverse = torch.unique(ids, return_inverse=True)  # (U,), (B,)
    s = m.index_select(0, uniq) / _slot_norms(layer, uniq.tolist())  # ops.magnitude_scale's quotient
    s = torch.where((uniq == 0).unsqueeze(1), torch.ones_like(s), s)  # slot 0 is the base model: never rescaled
    return s.index_select(0, inverse)  # (B, d_out)


def _slot_norms(layer: nn.Module, slots: list[int]) -> torch.Tensor:
    """||W0 + delta|| (U, d_out) float32 of `slots`, no gradient, kept per slot until d or b change."""
    d, b = layer.vera_d, layer.vera_b
    key = (d._version, b._version, d.data_ptr(), b.data_ptr())
    if layer._norms_key != key:
        layer._norms_key, layer._norms = key, {}
    missing = [u for u in slots if u not in layer._norms]
    if missing:
        norms = _norms(layer, d[missing], b[missing])  # (M, d_out)
        layer._norms.update(zip(missing, norms.clamp_min(_TINY).unbind(0), strict=True))
    return torch.stack([layer._norms[u] for u in slots])


@torch.no_grad()
def _norms(layer: nn.Module, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||W0 + delta|| (M, d_out) float32 of the layer's kind for M slots' vectors d (M, r), b (M, d_out), each
    formed as the kind's DVoRA layer forms it: VeraLinear (dequantized, Conv1D transposed W0), VeraConv (the
    kernel as (C_out, C_in/groups * prod(kernel))), VeraEmbedding (per column of E + delta^T, the padding row
    as E's). W0 is read (dequantized) once; one (d_out, d_in) temporary at a time."""
    A, B = layer.slices(b.device, torch.float32)
    d, b = d.detach().float(), b.detach().float()
    if is_embedding_leaf(layer.base):
        out = []
        for du, bu in zip(d, b, strict=True):
            F_A, F_B = ops.delta_factors(A, B, du, bu, layer.scale)  # (r, V), (D, r), as VeraEmbedding._factors
            left = F_A.t()  # a new tensor: zeroing its padding row touches nothing shared
            if layer.base.padding_idx is not None:
                left[layer.base.padding_idx] = 0
            out.append(table_norms(layer.base.weight, left, F_B.t()))
        return torch.stack(out)
    if is_conv_leaf(layer.base):
        w0 = layer.base.weight.reshape(layer.out_features, layer.in_features).float()
    else:
        w0 = layer.plain_weight().float()
    return torch.stack([ops.row_norms(ops.vera_delta(A, B, du, bu, layer.scale, base=w0))
                        for du, bu in zip(d, b, strict=True)])

"""Quantized base layers: bitsandbytes `Linear4bit` (nf4, fp4) and `Linear8bitLt` under VeRA (QVeRA).

A quantized layer is recognised by its class names, so the core never imports bitsandbytes; only
`dequantized_weight` and `quantize_linears` do, lazily. Both classes subclass `nn.Linear` and keep
`in_features` / `out_features`, which give the logical (d_out, d_in) shape: Linear4bit stores its weight
packed as (d_out * d_in / 2, 1) uint8, so the weight's own shape is not the layer's.

What VeRA does with such a base (see `VeraLinear`): the base stays quantized and frozen and runs its
own forward; the vectors stay float32; the adapter always takes the factored path (the materialized
one would hold a full-precision W0, which is what quantizing avoids); merging is refused.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

__all__ = ["QUANT_KINDS", "quant_kind", "dequantized_weight", "quantize_linears"]

# bitsandbytes class name -> our name for the kind (subclasses such as LinearNF4 are found via the MRO).
_CLASSES = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}
QUANT_KINDS = tuple(_CLASSES.values())


def quant_kind(module: nn.Module) -> str | None:
    """"4bit" or "8bit" for a bitsandbytes quantized linear layer, else None."""
    for cls in type(module).__mro__:
        kind = _CLASSES.get(cls.__name__)
        if kind is not None and cls.__module__.startswith("bitsandbytes"):
            return kind
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """Semantics: the float32 (d_out, d_in) weight the quantized layer multiplies by: dequantize_4bit of
    the packed nf4/fp4 blocks, or the int8 rows times their absmax scale / 127 (bitsandbytes' own
    formulas, so `F.linear(x, W)` equals the layer's output up to float rounding)."""
    import bitsandbytes.functional as bnbf

    kind, w = quant_kind(module), module.weight
    if kind == "4bit" and getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(f"{type(module).__name__}: the weight is in bitsandbytes' CPU inference packing; "
                         "set support_avx512bf16_for_cpu = False before its first gradient-free call")
    if kind == "4bit" and getattr(w, "quant_state", None) is not None:
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "8bit" and w.dtype == torch.int8:
        # The row scales sit on the weight until the first forward moves them to the layer's state.
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(w.data, scb).float()
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear layer")
    return w.detach().float()  # not quantized yet (the weight is still the float one it was built from)


def quantize_linears(model: nn.Module, kind: str, skip: Collection[str] = ("lm_head",)) -> nn.Module:
    """Replace every plain `nn.Linear` in `model` (in place) by a bitsandbytes layer holding its weight
    quantized: "4bit" (nf4 Linear4bit, compute in the weight's dtype) or "8bit" (Linear8bitLt, int8
    weights, no outlier threshold). Modules whose last name part is in `skip` stay as they are (the
    output head, as transformers' BitsAndBytesConfig does). Returns the model."""
    import bitsandbytes as bnb

    if kind not in QUANT_KINDS:
        raise ValueError(f"quantize_linears: kind {kind!r} is not one of {', '.join(QUANT_KINDS)}")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] not in skip]
    for name in names:
        lin = model.get_submodule(name)
        w, dev, has_bias = lin.weight.detach(), lin.weight.device, lin.bias is not None
        if kind == "4bit":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=w.dtype,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(w.cpu().clone(), requires_grad=False, quant_type="nf4")
            # On AVX512-BF16 CPUs bitsandbytes repacks the weight at the first gradient-free eval call (absmax
            # rounded to bf16, and it fails for d_in not a multiple of 64): evaluation would then differ
            # from training. Keep the one standard format.
            q.support_avx512bf16_for_cpu = False
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=0.0)
            q.weight = bnb.nn.Int8Params(w.cpu().clone(), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        q = q.to(dev)  # bitsandbytes quantizes when the parameter moves to its device
        q.train(lin.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
    return model

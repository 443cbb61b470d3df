"""Recompute an adapted layer's input from the norm that produced it, instead of keeping it for backward.

Why: with frozen weights the base model never keeps a linear layer's input (PyTorch saves `x` only when
the weight needs a gradient), so on the materialized path the VeRA layer's own saved `x` (T, d_in) is
the whole adapter's activation memory: what LoRA keeps too. But q, k, v (and gate, up) read the output
of a LayerNorm / RMSNorm, whose backward already keeps that norm's *input*. Saving the norm input
instead of `x` (the same storage the norm holds anyway) and re-running the norm in backward (T * d_in
elementwise work) removes it: docs/performance.md, "Recomputing x from the norm".

How: a forward hook on every norm module tags its output tensor with (module, a weak reference to its
input, output version, parameter versions) while gradients are recorded and the norm keeps its input (its output has a grad_fn). `source_of(x)` returns that tag only when `x` is that
very tensor, unmodified; anything else (a view, a dropout output, an in-place edit, a hook that replaced
the output, torch.compile) gets None and the layer saves `x` as before. Norms are deterministic, so the
recomputed `x` is bit for bit the forward one and gradients are unchanged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["NormSource", "is_norm", "enable", "disable", "enabled", "source_of", "enable_gradient_checkpointing"]

_ATTR = "_verakit_norm_source"
_NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


@dataclass(frozen=True)
class NormSource:
    """Where a norm output came from: `module.forward(input)` reproduces it while `versions` hold.

    The input is held weakly: it lives exactly as long as the norm's autograd node keeps it, so a tag
    never keeps a tensor alive (e.g. hidden states a caller holds after backward)."""

    module: nn.Module
    input_ref: weakref.ref
    out_version: int
    param_versions: tuple[int, ...]

    @property
    def input(self) -> torch.Tensor | None:
        return self.input_ref()

    def recompute(self, inp: torch.Tensor) -> torch.Tensor:
        """The norm's output again, from `inp` (the saved input); raises if the norm's parameters were
        modified in place since forward, as autograd does for a modified saved tensor."""
        if _param_versions(self.module) != self.param_versions:
            raise RuntimeError(
                f"verakit: the parameters of {type(self.module).__name__} were modified in place between "
                "forward and backward, so the adapted layer's input cannot be recomputed; disable it with "
                "verakit.set_input_recompute(model, False)"
            )
        with torch.no_grad():
            return self.module.forward(inp)


def is_norm(module: nn.Module) -> bool:
    """nn.LayerNorm / nn.RMSNorm, or a class named *LayerNorm / *RMSNorm (transformers' LlamaRMSNorm,
    T5LayerNorm, ...): elementwise, deterministic, one tensor in and out."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(_NORM_SUFFIXES)


def _param_versions(module: nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in module.parameters(recurse=False))


def _tag(module: nn.Module, args: tuple, out: object) -> None:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
        return
    if out is args[0] or out.is_inference() or not out.requires_grad:
        return  # without a grad_fn the norm keeps nothing: saving its input would cost what x does
    setattr(out, _ATTR, NormSource(module, weakref.ref(args[0]), out._version, _param_versions(module)))


def enable(model: nn.Module) -> None:
    """Tag the outputs of every norm in `model` (idempotent). The hook runs first among the module's
    forward hooks, so it sees the forward's own output; a later hook that replaces it defeats the tag."""
    for module in model.modules():
        if is_norm(module) and not _has_hook(module):
            module.register_forward_hook(_tag, prepend=True)


def disable(model: nn.Module) -> None:
    """Remove the hooks `enable` added."""
    for module in model.modules():
        for hid, fn in list(module._forward_hooks.items()):
            if fn is _tag:
                del module._forward_hooks[hid]


def enabled(model: nn.Module) -> bool:
    """Whether some norm in `model` carries the hook."""
    return any(_has_hook(m) for m in model.modules())


def _has_hook(module: nn.Module) -> bool:
    return any(fn is _tag for fn in module._forward_hooks.values())


def source_of(x: torch.Tensor) -> NormSource | None:
    """The tag of a norm output `x` if `x` is unmodified since the norm produced it and the norm still
    keeps its input, else None."""
    if torch.compiler.is_compiling():
        return None  # compiled graphs do their own activation planning; tensor attributes do not trace
    src = getattr(x, _ATTR, None)
    if src is None or x.is_inference() or x._version != src.out_version or src.input is None:
        return None
    return src


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers' own).

    Non-reentrant checkpointing, because with frozen embeddings no input of a checkpointed layer requires
    grad, which the reentrant variant would silently turn into no gradient for d and b at all.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

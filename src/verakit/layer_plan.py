"""How one `VeraLinear` call runs, decided by a pure function, and the layer's named runtime state.

Semantics: `plan_forward(facts) -> Plan` maps what a call looks like (merged? gradients? may the frozen
matmul be replaced? what does the inference cache hold?) to the path that runs and what happens to the
cache; `VeraLinear.forward` only dispatches on it. Every path computes the same function:

  MERGED        the delta is already in W0: the base layer alone.
  CACHED        gradient-free, W0 + delta (DVoRA: scaled) built once and reused: one matmul per call.
  MATERIALIZED  W0 + delta built per call, one matmul (`ops.vera_materialized`); fewest FLOPs at many tokens.
  FACTORED      the base layer plus the adapter's own two small matmuls (`ops.vera_tail`); fewest FLOPs at
                few tokens, and the only path that keeps the base's own forward (quantized bases, dropout,
                autocast, a weight that needs a gradient).

The state a layer keeps between calls is named here too: `WeightCache` (the inference cache) and
`SharedInput` (u = A x shared by sibling layers that read the same tensor).
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from . import ops

__all__ = ["Path", "CacheStep", "Plan", "CallFacts", "plan_forward", "WeightKey", "WeightCache", "SharedInput",
           "share_inputs"]


class Path(enum.Enum):
    MERGED = "merged"
    CACHED = "cached"
    MATERIALIZED = "materialized"
    FACTORED = "factored"


class CacheStep(enum.Enum):
    KEEP = "keep"  # leave the inference cache as it is (a call that cannot use it)
    DROP = "drop"  # a call with gradients: the vectors change every step, so free the weight
    COUNT = "count"  # count this call's tokens toward building it (`ops.cache_pays`), not built yet
    USE = "use"  # use the cached weight, building it first if it is not there


class Plan(NamedTuple):
    path: Path
    cache: CacheStep = CacheStep.KEEP
    tokens_seen: int = 0  # COUNT and USE: tokens counted toward the cache, this call's included
    keep_weight: bool = False  # MATERIALIZED with gradients: keep W (m, n) for backward, else rebuilt


@dataclass(frozen=True)
class CallFacts:
    """What `plan_forward` needs to know about one call (gathered by `VeraLinear.call_facts`)."""

    merged: bool
    grad: bool  # gradients are recorded and x, d, b (or m) need one
    input_grad: bool  # x needs a gradient
    one_matmul: bool  # the frozen W0 x is a plain matmul of the same x we may replace (see VeraLinear)
    compiling: bool  # inside torch.compile: no Python-side caching
    tokens: int  # rows of x: x.numel() // d_in
    n: int  # d_in
    m: int  # d_out
    r: int
    cached: bool  # the cache holds a weight built from the current vectors and W0
    tokens_seen: int  # tokens already counted toward the cache for the current vectors and W0


def plan_forward(f: CallFacts) -> Plan:
    """The path of one call and the cache step: a pure function of `f` (tested branch by branch)."""
    if f.merged:
        return Plan(Path.MERGED)
    if f.grad:
        path, keep = ops.choose_path(f.tokens, f.n, f.m, f.r, True, f.input_grad)
        if path == "materialized" and f.one_matmul:
            return Plan(Path.MATERIALIZED, CacheStep.DROP, keep_weight=keep)
        return Plan(Path.FACTORED, CacheStep.DROP)
    step, seen = CacheStep.KEEP, 0
    if f.one_matmul and not f.compiling:
        seen = f.tokens_seen + (0 if f.cached else f.tokens)
        if f.cached or ops.cache_pays(seen, f.n, f.m):
            return Plan(Path.CACHED, CacheStep.USE, seen)
        step = CacheStep.COUNT
    path, _ = ops.choose_path(f.tokens, f.n, f.m, f.r, False, f.input_grad)
    if path == "materialized" and f.one_matmul:
        return Plan(Path.MATERIALIZED, step, seen)
    return Plan(Path.FACTORED, step, seen)


class WeightKey(NamedTuple):
    """What a cached weight was built from: in-place updates bump `_version`, reassignment `data_ptr`."""

    d: tuple[int, int]  # (version, data_ptr)
    b: tuple[int, int]
    m: tuple[int, int] | None  # DVoRA's magnitude, None without one
    w0: tuple[int, int]
    device: torch.device
    dtype: torch.dtype


@dataclass
class WeightCache:
    """The inference cache of a VeraLinear: W0 + delta once it pays (None before), and the tokens counted."""

    key: WeightKey
    weight: torch.Tensor | None = None  # (d_out, d_in) in the input's dtype; DVoRA: scale * (W0 + delta)
    tokens_seen: int = 0
    scale: torch.Tensor | None = None  # DVoRA: m / ||W0 + delta|| (d_out,) float32 (valid for key[:5])


@dataclass
class _SharedEntry:
    x: weakref.ref  # the input tensor u was computed from (weakly: never keeps hidden states alive)
    version: int  # x's version then
    grad_enabled: bool  # grad mode then
    u: torch.Tensor  # A_sl x (..., r)
    takers: set[int] = field(default_factory=set)  # id() of the layers that took or put it


class SharedInput:
    """u = A_sl x computed once for sibling layers (q, k, v; gate, up) that read the very same tensor x.

    Semantics: `take(x, layer)` returns the u a sibling stored for this x object (same version, same grad
    mode) unless `layer` already took it (then it is a new forward: the caller recomputes and `put`s).
    A wrong grouping only costs a miss: the match is on the tensor itself, never on names.
    """

    def __init__(self) -> None:
        self._entry: _SharedEntry | None = None

    def take(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor | None:
        e = self._entry
        if (e is None or e.x() is not x or e.version != _version(x) or e.grad_enabled != torch.is_grad_enabled()
                or id(layer) in e.takers):
            return None
        e.takers.add(id(layer))
        return e.u

    def put(self, x: torch.Tensor, layer: nn.Module, u: torch.Tensor) -> None:
        self._entry = _SharedEntry(weakref.ref(x), _version(x), torch.is_grad_enabled(), u, {id(layer)})


def _version(x: torch.Tensor) -> int:
    # Inference tensors have no version counter; nothing writes a model's hidden states in place.
    return -1 if x.is_inference() else x._version


def share_inputs(layers: Mapping[str, nn.Module]) -> None:
    """Give VeraLinear layers under one parent module with the same projection, rank and d_in one SharedInput."""
    groups: dict[tuple[str, int, int, int], list[nn.Module]] = {}
    for name, layer in layers.items():
        key = (name.rpartition(".")[0], id(layer.projection), layer.r, layer.in_features)
        groups.setdefault(key, []).append(layer)
    for group in groups.values():
        if len(group) > 1:
            shared = SharedInput()
            for layer in group:
                layer.shared_input = shared

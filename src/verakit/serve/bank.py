"""AdapterBank: thousands of VeRA adapters resident over one base model, mixed freely within a batch.

Semantics: bank.forward(adapters, **inputs) == model_i(**inputs[i]) for every row i, where model_i is the
base model with adapter adapters[i] loaded normally (None or slot 0: the base model itself).

The bank takes a model with VeRA attached (which fixes the targets, rank R, seed, distribution and
modules to save), detaches it and puts a `SlotLinear` around each adapted base layer (`SlotConv` around a
convolution, `SlotEmbedding` around an embedding: `slots.slot_layer`) and a
`SlotHeadLinear` around each linear leaf of the modules to save. Adapter vectors then live in slot tables
(S = capacity + 1 rows; slot 0 = no adapter). Adding an adapter copies its vectors into a free slot (or
the least recently used one): no allocation, so the cost does not grow with the number resident.

Ranks: the unit tables have the prefix property (a rank-r adapter uses A[:r], B[:, :r] of the rank-R
tables), but the fan-in scale s(d_in, r) depends on r; a rank-r adapter's d is stored as
d * s(d_in, r) / s(d_in, R), zero-padded to R, so the layer's rank-R scale gives back the adapter's output.

Quantized bases (bitsandbytes 4-bit/8-bit, `verakit.quant`): each slot layer calls the quantized layer
itself and adds the factored adapter part, so no dequantized weight is ever held; a mixed batch equals
each row alone on the same quantized base (measured max |diff| 5e-7, tests/serve/test_bank_quantized.py).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import PROJECTION_KINDS
from ..fileformat import Adapter, AdapterError, read_adapter
from ..inject import VeraState, detach, vera_state
from ..projection import Projection
from ..slots import RowSlots, SlotConv, SlotEmbedding, SlotHeadLinear, SlotLinear, slot_layer

__all__ = ["AdapterBank", "AdapterRef"]

# What a batch row names: an adapter resident in the bank, a slot number, or None (the base model).
AdapterRef = str | int | None
_CHECKED_FIELDS = ("seed", "distribution", "projection_sharing")


class AdapterBank:
    """Slot tables for up to `capacity` adapters over one base model, with LRU eviction.

    Not thread-safe: one thread (the serving engine's worker) adds, removes and runs forwards.
    """

    def __init__(self, model: nn.Module, capacity: int = 64) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"AdapterBank capacity must be an integer >= 1, got {capacity!r}")
        state: VeraState = vera_state(model)
        if any(layer.merged for layer in state.layers.values()):
            raise AdapterError("AdapterBank: the model's VeRA is merged; unmerge(model) before building a bank")
        kind = state.config.projection_kind
        if kind != PROJECTION_KINDS[0]:
            raise AdapterError(
                f"AdapterBank: projection_kind {kind!r} has no prefix property across ranks; "
                f"the bank serves regenerable {PROJECTION_KINDS[0]} projections only"
            )
        self.config = state.config
        self.model_type, self.architecture = state.model_type, state.architecture
        self.capacity = capacity
        self.model = model
        self.row_slots = RowSlots()
        taken = {n: (ly.base, ly.projection, ly.dropout, ly.kind) for n, ly in state.layers.items()}
        saved = state.saved_modules
        detach(model)  # restores the base layers and the original heads, which become slot 0

        slots = capacity + 1
        self.layers: dict[str, SlotLinear | SlotConv | SlotEmbedding] = {}
        self.modules: dict[str, tuple[int, int, str]] = {}
        for name, (base, projection, dropout, kind) in taken.items():
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            layer = slot_layer(base, projection, self.config.r, slots, self.row_slots, p, name)
            self._replace(name, layer)
            self.layers[name] = layer
            self.modules[name] = (layer.out_features, layer.in_features, kind)
        self.heads: dict[str, SlotHeadLinear] = {}
        self._original_heads: dict[str, nn.Linear] = {}
        self._head_params: dict[str, tuple[SlotHeadLinear, str]] = {}  # state-dict key -> (head, "weight"|"bias")
        for s in saved:
            self._install_heads(s, slots)
        for p in model.parameters():  # detach restored the flags; a bank's base is frozen (tables start frozen too)
            p.requires_grad_(False)
        self._lru: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(capacity, 0, -1))  # pop() hands out slot 1 first
        self._extra: dict[str, dict[str, Any]] = {}
        self.loads = 0  # adapters written into a slot (counters for monitoring)
        self.evictions = 0

    # ---------------------------------------------------------------- construction helpers

    def _replace(self, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent), leaf, module)

    def _install_heads(self, saved: str, slots: int) -> None:
        root = self.model.get_submodule(saved)
        leaves = {n: m for n, m in root.named_modules() if type(m) is nn.Linear}
        covered = {f"{n}.{k}" if n else k for n, m in leaves.items() for k, _ in m.named_parameters()}
        others = [k for k, _ in root.named_parameters() if k not in covered] + [k for k, _ in root.named_buffers()]
        if others:
            raise AdapterError(
                f"AdapterBank: module to save {saved!r} holds {others[:3]} outside plain nn.Linear leaves; "
                "per-slot heads support stacks of linear layers only"
            )
        for n, leaf in leaves.items():
            full = f"{saved}.{n}" if n else saved
            head = SlotHeadLinear(leaf, slots, self.row_slots, full)
            self._replace(full, head)
            self._original_heads[full] = leaf
            self.heads[full] = head
            self._head_params[f"{full}.weight"] = (head, "weight")
            if head.bias is not None:
                self._head_params[f"{full}.bias"] = (head, "bias")

    def _tables(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield layer.vera_d
            yield layer.vera_b
        for head in self.heads.values():
            yield head.weight
            if head.bias is not None:
                yield head.bias

    # ---------------------------------------------------------------- adapters

    def check(self, adapter: Adapter) -> None:
        """Raise AdapterError (naming the file and field) unless `adapter` can live in this bank."""
        where = adapter.path or "<adapter>"
        ours, theirs = self.config, adapter.config
        if theirs.projection_kind != PROJECTION_KINDS[0]:
            raise AdapterError(
                f"{where}: projection_kind {theirs.projection_kind!r} cannot be served by a bank of "
                f"{PROJECTION_KINDS[0]} projections (no prefix property across ranks)"
            )
        for f in _CHECKED_FIELDS:
            if getattr(ours, f) != getattr(theirs, f):
                raise AdapterError(f"{where}: the bank's projection has {f}={getattr(ours, f)!r} but the adapter {getattr(theirs, f)!r}")
        if theirs.r > ours.r:
            raise AdapterError(f"{where}: adapter rank {theirs.r} exceeds the bank's rank {ours.r}")
        if adapter.model_type != self.model_type:
            raise AdapterError(f"{where}: base model mismatch: adapter for model_type {adapter.model_type!r}, bank {self.model_type!r}")
        for n, shape in adapter.modules.items():
            if n not in self.modules:
                raise AdapterError(f"{where}: base model mismatch: adapter module {n!r} {shape[:2]} is not a bank layer")
            if self.modules[n] != shape:
                raise AdapterError(f"{where}: base model mismatch: module {n!r} is {shape} in the adapter, {self.modules[n]} in the bank")
        if set(adapter.saved) != set(self._head_params):
            raise AdapterError(
                f"{where}: saved modules differ: adapter has {sorted(adapter.saved)[:4]}, bank {sorted(self._head_params)[:4]}"
            )
        for k, t in adapter.saved.items():
            head, attr = self._head_params[k]
            want = tuple(getattr(head, attr).shape[1:])
            if tuple(t.shape) != want:
                raise AdapterError(f"{where}: tensor {k!r} has shape {tuple(t.shape)}, the bank's head has {want}")

    def add(self, name: str, source: str | os.PathLike[str] | Adapter) -> int:
        """Make `name` resident (replacing a resident adapter of that name) and return its slot.

        Evicts the least recently used adapter when the bank is full. Raises AdapterError, leaving the
        bank unchanged, when the adapter is unreadable or incompatible.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
        adapter = source if isinstance(source, Adapter) else read_adapter(source)
        self.check(adapter)
        slot = self._lru.pop(name, None)
        if slot is None:
            if not self._free:
                _, evicted = self._lru.popitem(last=False)
                self.evictions += 1
                self._free.append(evicted)
            slot = self._free.pop()
        self._write(slot, adapter)
        self._lru[name] = slot
        self._extra[name] = dict(adapter.extra)
        self.loads += 1
        return slot

    def _write(self, slot: int, adapter: Adapter) -> None:
        r = adapter.config.r
        with torch.no_grad():
            for n, layer in self.layers.items():
                if n not in adapter.modules:  # an adapter may adapt a subset of the bank's layers
                    layer.vera_d[slot].zero_()
                    layer.vera_b[slot].zero_()
                    continue
                proj: Projection = layer.projection
                ratio = proj.scale(layer.fan_in, r) / layer.scale
                layer.vera_d[slot, :r].copy_(adapter.d[n] * ratio)
                layer.vera_d[slot, r:].zero_()
                layer.vera_b[slot].copy_(adapter.b[n])
            for k, (head, attr) in self._head_params.items():
                getattr(head, attr)[slot].copy_(adapter.saved[k])

    def remove(self, name: str) -> None:
        """Evict `name`; its slot's rows are overwritten in full by the next add. KeyError if not resident."""
        slot = self._lru.pop(name)
        del self._extra[name]
        self._free.append(slot)

    def slot(self, name: str) -> int:
        """The slot of resident adapter `name` (marks it recently used). KeyError if not resident."""
        self._lru.move_to_end(name)
        return self._lru[name]

    def extra(self, name: str) -> dict[str, Any]:
        """The adapter file's `extra` metadata (e.g. "labels") of resident adapter `name`."""
        return self._extra[name]

    def names(self) -> list[str]:
        """Resident adapter names, least recently used first."""
        return list(self._lru)

    def __contains__(self, name: object) -> bool:
        return name in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def nbytes(self) -> int:
        """Bytes of all slot tables (allocated up front for the full capacity)."""
        return sum(t.numel() * t.element_size() for t in self._tables())

    # ---------------------------------------------------------------- forward

    def slots(self, adapters: Sequence[AdapterRef] | torch.Tensor) -> torch.Tensor:
        """Per-row slot ids [B] (int64, on the model's device) for adapter names, slot numbers or None."""
        dev = next(iter(self.layers.values())).vera_d.device
        if isinstance(adapters, torch.Tensor):
            ids = adapters.to(device=dev, dtype=torch.int64)
            bad = ids[(ids < 0) | (ids > self.capacity)]
            if bad.numel():
                raise ValueError(f"slot {int(bad[0])} is outside 0..{self.capacity}")
            return ids
        occupied = set(self._lru.values())
        out = []
        for a in adapters:
            if a is None:
                out.append(0)
            elif isinstance(a, str):
                if a not in self._lru:
                    raise KeyError(f"adapter {a!r} is not resident in the bank")
                out.append(self.slot(a))
            elif isinstance(a, int) and not isinstance(a, bool):
                if a != 0 and a not in occupied:
                    raise ValueError(f"slot {a} holds no adapter (occupied: {len(occupied)} of {self.capacity})")
                out.append(a)
            else:
                raise TypeError(f"a batch row names an adapter by str, int slot or None, got {type(a).__name__}")
        return torch.tensor(out, dtype=torch.int64, device=dev)

    @contextmanager
    def rows(self, adapters: Sequence[AdapterRef] | torch.Tensor) -> Iterator[torch.Tensor]:
        """Within the block, batch row i of every model call uses adapters[i] (e.g. around `generate`)."""
        ids = self.slots(adapters)
        with self.row_slots.use(ids):
            yield ids

    def forward(self, adapters: Sequence[AdapterRef] | torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """`model(*args, **kwargs)` with batch row i using adapters[i]."""
        with self.rows(adapters):
            return self.model(*args, **kwargs)

    # ---------------------------------------------------------------- export / teardown

    def export(self, name: str) -> Adapter:
        """Resident adapter `name` as a rank-R `Adapter` (fp32 copies), e.g. after training its slot."""
        slot = self._lru[name]
        d = {n: (ly.vera_d[slot].detach().float().cpu()).clone() for n, ly in self.layers.items()}
        b = {n: ly.vera_b[slot].detach().float().cpu().clone() for n, ly in self.layers.items()}
        saved = {k: getattr(h, a)[slot].detach().cpu().clone() for k, (h, a) in self._head_params.items()}
        return Adapter(
            self.config, self.model_type, self.architecture, dict(self.modules), d, b, saved, dict(self._extra[name])
        )

    def close(self) -> nn.Module:
        """Put the plain base layers and heads (slot 0) back and return the model; the bank is unusable after."""
        for name, layer in self.layers.items():
            self._replace(name, layer.base)
        for full, leaf in self._original_heads.items():
            self._replace(full, leaf)
        self.layers, self.heads, self._head_params = {}, {}, {}
        self._lru.clear()
        return self.model

"""AdapterBank: thousands of VeRA adapters resident over one base model, mixed freely within a batch.

Semantics: bank.forward(adapters, **inputs) == model_i(**inputs[i]) for every row i, where model_i is the
base model with adapter adapters[i] loaded normally (None or slot 0: the base model itself).

The bank takes a model with VeRA attached (which fixes the targets, rank R, seed, distribution and
modules to save) and turns it into frozen slot tables with `verakit.slot_tables.to_slot_tables` (the
converter grouped training uses too): a slot layer around each adapted base layer and a `SlotHeadLinear`
around each linear leaf of the modules to save. Adapter vectors then live in slot tables (S = capacity + 1
rows; slot 0 = no adapter). Adding an adapter copies its vectors into a free slot (or the least recently
used one): no allocation, so the cost does not grow with the number resident. A rank-r adapter (r <= R)
is folded into the rank-R tables exactly as `slot_tables` describes. DVoRA adapters (VeraConfig.magnitude)
mix with plain ones: `add` computes each one's per-row scale m / ||W0 + delta|| once and keeps it per slot.

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
from ..fileformat import Adapter, AdapterError, BaseMismatchError, read_adapter
from ..fingerprint import compare, read_samples
from ..inject import VeraState, vera_state
from ..slot_tables import SlotLayer, to_slot_tables
from ..slots import SlotHeadLinear

__all__ = ["AdapterBank", "AdapterRef"]

# What a batch row names: an adapter resident in the bank, a slot number, or None (the base model).
AdapterRef = str | int | None
_CHECKED_FIELDS = ("seed", "distribution", "projection_sharing")


class AdapterBank:
    """Slot tables for up to `capacity` adapters over one base model, with LRU eviction.

    Not thread-safe: one thread (the serving engine's worker) adds, removes and runs forwards.
    """

    def __init__(self, model: nn.Module, capacity: int = 64, check_base: bool = True) -> None:
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
        # Frozen, empty tables; slot 0 keeps the base model's own heads (from before attach).
        self.tables = to_slot_tables(model, capacity + 1, trainable=False)
        self.row_slots = self.tables.rows
        self.layers: dict[str, SlotLayer] = self.tables.layers
        self.modules: dict[str, tuple[int, int, str]] = self.tables.modules
        self.heads: dict[str, SlotHeadLinear] = self.tables.heads
        self._lru: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(capacity, 0, -1))  # pop() hands out slot 1 first
        self._extra: dict[str, dict[str, Any]] = {}
        # Refuse adapters whose base-weight samples differ from this base (as load_adapter does). The base
        # weights never change, so what was read at each module's sample positions is kept (a 4-bit base
        # dequantizes a whole weight per read).
        self.check_base = check_base
        self._base_reads: dict[tuple[str, int], torch.Tensor | None] = {}
        self.loads = 0  # adapters written into a slot (counters for monitoring)
        self.evictions = 0

    # ---------------------------------------------------------------- adapters

    def check(self, adapter: Adapter) -> None:
        """Raise AdapterError (naming the file and field) unless `adapter` can live in this bank;
        BaseMismatchError when its base-weight samples differ from this base (unless `check_base` is off)."""
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
        self.tables.check(adapter)  # rank, base model, modules and head shapes
        if self.check_base and adapter.samples is not None:
            result = compare(adapter.samples, self.layers, read=self._read_base)
            if result.failed:
                base = adapter.extra.get("model") or adapter.architecture or "its base model"
                raise BaseMismatchError(
                    f"{where}: base model mismatch: the adapter was trained on {base}, but this server's base "
                    f"weights differ from the ones it was trained on: {result.describe()}. Serve it over that "
                    "base, or start the server with --no-base-check"
                )

    def _read_base(self, name: str, layer: nn.Module, k: int) -> torch.Tensor | None:
        key = (name, k)
        if key not in self._base_reads:  # two threads may both read: same values, harmless
            self._base_reads[key] = read_samples(name, layer, k)
        return self._base_reads[key]

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
        self.tables.write(slot, adapter)
        self._lru[name] = slot
        self._extra[name] = dict(adapter.extra)
        self.loads += 1
        return slot

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
        return sum(t.numel() * t.element_size() for t in self.tables.tables())

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
        return self.tables.export(self.model, self._lru[name], self._extra[name])

    def close(self) -> nn.Module:
        """Put the plain base layers and heads (slot 0) back and return the model; the bank is unusable after."""
        self.tables.restore(self.model)
        self.layers, self.heads = {}, {}
        self._lru.clear()
        return self.model

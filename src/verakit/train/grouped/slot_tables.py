"""A VeRA model turned into trainable slot tables: one slot per adapter, all trained in the same batches.

Semantics: after `tables = to_slot_tables(model, S, per_slot_heads)`, running `model(x)` inside
`tables.rows.use(ids)` gives row i the output of the VeRA model with slot ids[i]'s vectors (and, with
per-slot heads, its head) loaded normally. Slots 1..S-1 all start from the model's VeRA vectors and head
at conversion; slot 0 is the base model (zero vectors, the original head) and is never trained.

Trainable after conversion: the d and b tables of every `SlotLinear` (as VeraConfig.train_d / train_b
say), and either each head leaf's per-slot weight and bias tables (`SlotHeadLinear`) or, with a shared
head, the modules to save themselves. Everything else is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...fileformat import Adapter, adapter_from_model
from ...inject import AttachError, detach, vera_state
from ...slots import RowSlots, SlotConv, SlotEmbedding, SlotHeadLinear, SlotLinear, slot_layer

__all__ = ["SlotTables", "to_slot_tables"]


@dataclass
class SlotTables:
    """The slot layers of one converted model and the adapter they started from."""

    rows: RowSlots  # per-row slots of the forward in flight, shared by every slot layer
    layers: dict[str, SlotLinear | SlotConv | SlotEmbedding]  # adapted module name -> slot layer, in model order
    heads: dict[str, SlotHeadLinear]  # head leaf name -> per-slot head; empty with a shared head
    saved_modules: tuple[str, ...]  # full names of the modules to save (the task head)
    template: Adapter  # the model's VeRA adapter at conversion: config, modules, head keys, initial values

    def adapter_params(self) -> tuple[nn.Parameter, ...]:
        """The trainable vector tables: vera_d (S, r) and vera_b (S, d_out) of every layer."""
        return tuple(t for ly in self.layers.values() for t in (ly.vera_d, ly.vera_b) if t.requires_grad)

    def head_params(self, model: nn.Module) -> tuple[nn.Parameter, ...]:
        """Per-slot head tables (S, ...), or the shared head's own parameters."""
        if self.heads:
            return tuple(t for h in self.heads.values() for t in (h.weight, h.bias) if t is not None)
        return tuple(p for s in self.saved_modules for p in model.get_submodule(s).parameters())

    def slotted_params(self) -> tuple[nn.Parameter, ...]:
        """Every trainable tensor whose dim 0 is the slot."""
        heads = tuple(t for h in self.heads.values() for t in (h.weight, h.bias) if t is not None)
        return self.adapter_params() + heads

    @property
    def slots(self) -> int:
        return next(iter(self.layers.values())).slots

    def write(self, slot: int, adapter: Adapter) -> None:
        """Copy `adapter`'s vectors (and head, with per-slot heads) into `slot`; shapes must match the template."""
        if not 1 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside 1..{self.slots - 1} (slot 0 is the base model)")
        where = adapter.path or "<adapter>"
        if adapter.modules != self.template.modules or adapter.config.r != self.template.config.r:
            raise AttachError(f"{where}: adapter modules or rank differ from the slot tables' "
                              f"(rank {adapter.config.r} vs {self.template.config.r})")
        with torch.no_grad():
            for n, layer in self.layers.items():
                layer.vera_d[slot].copy_(adapter.d[n])
                layer.vera_b[slot].copy_(adapter.b[n])
            for k, t in adapter.saved.items():
                mod, _, attr = k.rpartition(".")
                if mod in self.heads:
                    getattr(self.heads[mod], attr)[slot].copy_(t)

    def export(self, model: nn.Module, slot: int, extra: dict[str, Any]) -> Adapter:
        """Slot `slot` as an ordinary `Adapter` (fp32 vectors, its head or the shared head), for write_adapter."""
        t = self.template
        d = {n: ly.vera_d[slot].detach().float().cpu().clone() for n, ly in self.layers.items()}
        b = {n: ly.vera_b[slot].detach().float().cpu().clone() for n, ly in self.layers.items()}
        state = None if self.heads else model.state_dict()
        saved = {}
        for k in t.saved:
            mod, _, attr = k.rpartition(".")
            src = getattr(self.heads[mod], attr)[slot] if mod in self.heads else state[k]  # type: ignore[index]
            saved[k] = src.detach().cpu().clone()
        return Adapter(t.config, t.model_type, t.architecture, dict(t.modules), d, b, saved, dict(extra),
                       projection=t.projection)


def to_slot_tables(model: nn.Module, slots: int, per_slot_heads: bool = True) -> SlotTables:
    """Replace `model`'s VeraLinear layers (from `attach`) by SlotLinear layers with `slots` rows, and each
    linear leaf of its modules to save by a SlotHeadLinear unless the head is shared. In place."""
    if slots < 2:
        raise ValueError(f"to_slot_tables: needs slot 0 (the base model) and at least one adapter slot, got {slots}")
    state = vera_state(model)
    merged = [n for n, ly in state.layers.items() if ly.merged]
    if merged:
        raise AttachError(f"to_slot_tables: VeRA is merged into {merged[:3]}; unmerge(model) first")
    template = adapter_from_model(model)
    cfg, saved = state.config, state.saved_modules
    taken = {n: (ly.base, ly.projection, ly.dropout) for n, ly in state.layers.items()}
    detach(model)  # base layers back in place; heads back to their values at attach time...
    model.load_state_dict(template.saved, strict=False)  # ...so put the current head back
    for p in model.parameters():
        p.requires_grad_(False)
    rows = RowSlots()
    layers = {}
    for name, (base, projection, dropout) in taken.items():
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        layers[name] = _replace(model, name, slot_layer(base, projection, cfg.r, slots, rows, p, name))
    heads: dict[str, SlotHeadLinear] = {}
    if per_slot_heads:
        for s in saved:
            heads.update(_slot_heads(model, s, slots, rows))
    tables = SlotTables(rows, layers, heads, saved, template)
    for slot in range(1, slots):
        tables.write(slot, template)
    for layer in layers.values():
        layer.vera_d.requires_grad_(cfg.train_d)
        layer.vera_b.requires_grad_(cfg.train_b)
    for p in tables.head_params(model):
        p.requires_grad_(True)
    return tables


def _replace(model: nn.Module, name: str, module: nn.Module) -> Any:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
    return module


def _slot_heads(model: nn.Module, saved: str, slots: int, rows: RowSlots) -> dict[str, SlotHeadLinear]:
    root = model.get_submodule(saved)
    leaves = {n: m for n, m in root.named_modules() if type(m) is nn.Linear}
    covered = {f"{n}.{k}" if n else k for n, m in leaves.items() for k, _ in m.named_parameters()}
    others = [k for k, _ in root.named_parameters() if k not in covered] + [k for k, _ in root.named_buffers()]
    if others:
        raise AttachError(f"module to save {saved!r} holds {others[:3]} outside plain nn.Linear leaves; per-slot "
                          "heads support stacks of linear layers only (train one shared head instead)")
    out = {}
    for n, leaf in leaves.items():
        full = f"{saved}.{n}" if n else saved
        out[full] = _replace(model, full, SlotHeadLinear(leaf, slots, rows, full))
    return out

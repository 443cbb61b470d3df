"""A VeRA model turned into slot tables: one row per adapter, every batch row picks its own (serving, grouped training).

Semantics: after `tables = to_slot_tables(model, S, ...)` and `tables.write(k, adapter)`, running `model(x)`
inside `tables.rows.use(ids)` gives row i the output of the base model with adapter ids[i] loaded normally
(slot 0: no adapter). The one converter for `serve.AdapterBank` (`trainable=False`) and grouped training
(`trainable=True`).

Conversion detaches VeRA and puts a slot layer (`slots.slot_layer`: SlotLinear, SlotConv or SlotEmbedding)
around each adapted base layer, sharing the model's projection, and a `SlotHeadLinear` around each linear
leaf of the modules to save (unless the head is shared). The two uses differ in where they start:
* serving (`trainable=False`): every table frozen, slots 1..S-1 empty (zero) until written; slot 0's head is
  the base model's own, from before `attach` (the bank serves slot 0 as "no adapter").
* training (`trainable=True`): slots 1..S-1 all start from the model's VeRA vectors and head at conversion,
  slot 0 gets the head as it is at conversion, and the d and b tables train as VeraConfig.train_d / train_b
  say (a DVoRA model's m tables always), the heads (per-slot tables or the shared modules) in full.
  Everything else is frozen.

Ranks: the unit tables have the prefix property (a rank-r adapter uses A[:r], B[:, :r] of the rank-R
tables), but the fan-in scale s(d_in, r) depends on r; `write` stores a rank-r adapter's d as
d * s(d_in, r) / s(d_in, R), zero-padded to R, so the layer's rank-R scale gives back the adapter's output
(for r == R the factor is exactly 1.0: the copy is bit for bit).

DVoRA adapters (VeraConfig.magnitude): W' = m * (W0 + delta) / ||W0 + delta|| per output row. The scale
m / ||W0 + delta|| depends only on the adapter (and W0), so `write` computes it once, from the adapter's own
rank-r delta (`ops.vera_delta`, `ops.magnitude_scale`, as VeraLinear does; the dequantized weight for a
quantized base; each kind's own norm for convolutions and embeddings, docs/dvora.md) and keeps it in the
layer's per-slot vera_s table; plain VeRA slots there hold 1. A batch
mixing DVoRA, VeRA and base rows still costs the two shared matmuls plus a per-row scaling. Serving tables
keep the scale, not m, so a DVoRA slot of a bank cannot be exported. Training tables of a DVoRA template
keep m instead (the slot layers' vera_m, trained with d and b; each kind's norm, `slot_magnitude`),
recompute each slot's norm at every step, and export m; every adapter written to them must be DVoRA on
the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops
from .fileformat import Adapter, AdapterError, adapter_from_model
from .inject import AttachError, detach, vera_state
from .layer_embedding import table_norms
from .slots import RowSlots, SlotConv, SlotEmbedding, SlotHeadLinear, SlotLinear, slot_layer

__all__ = ["SlotLayer", "SlotTables", "to_slot_tables"]

SlotLayer = SlotLinear | SlotConv | SlotEmbedding


@dataclass
class SlotTables:
    """The slot layers of one converted model, its per-slot heads, and the adapter it was converted from."""

    rows: RowSlots  # per-row slots of the forward in flight, shared by every slot layer
    layers: dict[str, SlotLayer]  # adapted module name -> slot layer, in model order
    heads: dict[str, SlotHeadLinear]  # head leaf name -> per-slot head; empty with a shared head
    saved_modules: tuple[str, ...]  # full names of the modules to save (the task head)
    template: Adapter  # the model's VeRA adapter at conversion: config, modules, head keys, initial values
    original_heads: dict[str, nn.Linear] = field(default_factory=dict, repr=False)  # head leaf -> the leaf replaced
    # state-dict key of a head tensor ("classifier.weight") -> (per-slot head, "weight" | "bias"), in model order
    head_tensors: dict[str, tuple[SlotHeadLinear, str]] = field(init=False, repr=False)
    magnitude_slots: set[int] = field(init=False, repr=False)  # slots holding a DVoRA adapter

    def __post_init__(self) -> None:
        self.magnitude_slots = set()
        self.head_tensors = {}
        for full, head in self.heads.items():
            self.head_tensors[f"{full}.weight"] = (head, "weight")
            if head.bias is not None:
                self.head_tensors[f"{full}.bias"] = (head, "bias")

    @property
    def slots(self) -> int:
        return next(iter(self.layers.values())).slots

    @property
    def modules(self) -> dict[str, tuple[int, int, str]]:
        """Adapted module name -> (d_out, d_in, kind), as an adapter file records it."""
        return self.template.modules

    @property
    def shared_head(self) -> bool:
        """True when the modules to save stay ordinary modules shared by every slot (grouped --shared-head)."""
        return bool(self.saved_modules) and not self.heads

    def adapter_params(self) -> tuple[nn.Parameter, ...]:
        """The trainable vector tables: vera_d (S, r), vera_b (S, d_out) (and DVoRA's vera_m (S, d_out)) of every layer."""
        return tuple(t for ly in self.layers.values() for t in (ly.vera_d, ly.vera_b, ly.vera_m)
                     if t is not None and t.requires_grad)

    def head_params(self, model: nn.Module) -> tuple[nn.Parameter, ...]:
        """Per-slot head tables (S, ...), or the shared head's own parameters."""
        if self.heads:
            return tuple(getattr(h, a) for h, a in self.head_tensors.values())
        return tuple(p for s in self.saved_modules for p in model.get_submodule(s).parameters())

    def slotted_params(self) -> tuple[nn.Parameter, ...]:
        """Every trainable tensor whose dim 0 is the slot."""
        return self.adapter_params() + tuple(getattr(h, a) for h, a in self.head_tensors.values())

    def tables(self) -> tuple[nn.Parameter, ...]:
        """Every per-slot table, trainable or not (what a bank allocates: up front, DVoRA scales at first use)."""
        vectors = tuple(t for ly in self.layers.values() for t in (ly.vera_d, ly.vera_b))
        scales = tuple(t for ly in self.layers.values() for t in (ly.vera_s, ly.vera_m) if t is not None)
        return vectors + scales + tuple(getattr(h, a) for h, a in self.head_tensors.values())

    def check(self, adapter: Adapter) -> None:
        """Raise AdapterError (naming the file and field) unless `adapter`'s modules, rank and head fit the tables.

        An adapter may adapt a subset of the layers, at a rank up to the tables'. The projection's identity
        (seed, distribution, kind) is the caller's to check: the bank refuses, training writes its own template.
        """
        where = adapter.path or "<adapter>"
        ours = self.template
        if adapter.config.r > ours.config.r:
            raise AdapterError(f"{where}: adapter rank {adapter.config.r} exceeds the bank's rank {ours.config.r}")
        if adapter.model_type != ours.model_type:
            raise AdapterError(f"{where}: base model mismatch: adapter for model_type {adapter.model_type!r}, "
                               f"bank {ours.model_type!r}")
        for n, m in adapter.m.items():
            if n not in adapter.modules or n not in self.layers:
                raise AdapterError(f"{where}: DVoRA magnitude for {n!r}, which the adapter or the bank does not adapt")
            if tuple(m.shape) != (self.modules[n][0],):
                raise AdapterError(f"{where}: DVoRA magnitude of {n!r} has shape {tuple(m.shape)}, the layer has "
                                   f"{self.modules[n][0]} output rows")
        for n, shape in adapter.modules.items():
            if n not in self.modules:
                raise AdapterError(f"{where}: base model mismatch: adapter module {n!r} {shape[:2]} is not a bank layer")
            if self.modules[n] != shape:
                raise AdapterError(f"{where}: base model mismatch: module {n!r} is {shape} in the adapter, "
                                   f"{self.modules[n]} in the bank")
        if self.shared_head:
            return  # the shared head is the model's own module: the adapter's head is not written
        if set(adapter.saved) != set(self.head_tensors):
            raise AdapterError(f"{where}: saved modules differ: adapter has {sorted(adapter.saved)[:4]}, "
                               f"bank {sorted(self.head_tensors)[:4]}")
        for k, t in adapter.saved.items():
            head, attr = self.head_tensors[k]
            want = tuple(getattr(head, attr).shape[1:])
            if tuple(t.shape) != want:
                raise AdapterError(f"{where}: tensor {k!r} has shape {tuple(t.shape)}, the bank's head has {want}")

    def write(self, slot: int, adapter: Adapter) -> None:
        """Copy `adapter`'s vectors (rank-folded, see the module docstring) and per-slot head into `slot`,
        overwriting the whole slot: layers the adapter does not adapt get zero vectors. Checks first."""
        if not 1 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside 1..{self.slots - 1} (slot 0 is the base model)")
        self.check(adapter)
        r = adapter.config.r
        trained_m = {n for n, ly in self.layers.items() if ly.vera_m is not None}
        if trained_m and set(adapter.m) != trained_m:
            raise AdapterError(f"{adapter.path or '<adapter>'}: these training tables train DVoRA magnitudes on "
                               f"{len(trained_m)} layers; the adapter has magnitudes for {len(adapter.m)}")
        with torch.no_grad():
            # DVoRA scales first: an adapter refused here leaves the slot as it was
            scales = {n: _magnitude_scale(self.layers[n], adapter, n) for n in adapter.m if n not in trained_m}
            for n, layer in self.layers.items():
                if n in trained_m:
                    layer.vera_m[slot].copy_(adapter.m[n])
                elif n in scales or layer.vera_s is not None:
                    row = layer.magnitude_table()[slot]
                    if n in scales:
                        row.copy_(scales[n])
                    else:
                        row.fill_(1.0)  # plain VeRA (or a layer this adapter leaves alone): no rescaling
                if n not in adapter.modules:
                    layer.vera_d[slot].zero_()
                    layer.vera_b[slot].zero_()
                    continue
                ratio = layer.projection.scale(layer.fan_in, r) / layer.scale  # exactly 1.0 when r == R
                layer.vera_d[slot, :r].copy_(adapter.d[n] * ratio)
                layer.vera_d[slot, r:].zero_()
                layer.vera_b[slot].copy_(adapter.b[n])
            for k, (head, attr) in self.head_tensors.items():
                getattr(head, attr)[slot].copy_(adapter.saved[k])
        if scales:
            self.magnitude_slots.add(slot)
        else:
            self.magnitude_slots.discard(slot)

    def export(self, model: nn.Module, slot: int, extra: dict[str, Any]) -> Adapter:
        """Slot `slot` as an ordinary rank-R `Adapter` (fp32 vectors, its head or the shared head), for write_adapter."""
        if slot in self.magnitude_slots:
            raise AdapterError(f"slot {slot} holds a DVoRA adapter: the tables keep its scale m / ||W0 + delta||, "
                               "not m, so it cannot be exported from them (its file is the adapter)")
        t = self.template
        d = {n: ly.vera_d[slot].detach().float().cpu().clone() for n, ly in self.layers.items()}
        b = {n: ly.vera_b[slot].detach().float().cpu().clone() for n, ly in self.layers.items()}
        m = {n: mt[slot].detach().float().cpu().clone() for n, ly in self.layers.items() if (mt := ly.vera_m) is not None}
        state = model.state_dict() if self.shared_head else {}
        saved = {}
        for k in t.saved:
            head = self.head_tensors.get(k)
            src = getattr(head[0], head[1])[slot] if head is not None else state[k]
            saved[k] = src.detach().cpu().clone()
        # the base weights never change in the tables, so the template's samples of them hold for every slot
        return Adapter(t.config, t.model_type, t.architecture, dict(t.modules), d, b, saved, dict(extra),
                       projection=t.projection, samples=t.samples, m=m)

    def restore(self, model: nn.Module) -> nn.Module:
        """Put the plain base layers and the replaced head leaves back into `model` and return it."""
        for name, layer in self.layers.items():
            _replace(model, name, layer.base)
        for full, leaf in self.original_heads.items():
            _replace(model, full, leaf)
        return model


def to_slot_tables(model: nn.Module, slots: int, per_slot_heads: bool = True, *, trainable: bool = True) -> SlotTables:
    """Replace `model`'s VeRA layers (from `attach`) by slot layers with `slots` rows, and each linear leaf of
    its modules to save by a SlotHeadLinear unless `per_slot_heads` is False. In place; see the module
    docstring for what `trainable` changes."""
    if slots < 2:
        raise ValueError(f"to_slot_tables: needs slot 0 (the base model) and at least one adapter slot, got {slots}")
    state = vera_state(model)
    merged = [n for n, ly in state.layers.items() if ly.merged]
    if merged:
        raise AttachError(f"to_slot_tables: VeRA is merged into {merged[:3]}; unmerge(model) first")
    template = adapter_from_model(model)
    cfg, saved = state.config, state.saved_modules
    taken = {n: (ly.base, ly.projection, ly.dropout) for n, ly in state.layers.items()}
    detach(model)  # base layers back in place; heads back to their values at attach time (the bank's slot 0)...
    if trainable:
        model.load_state_dict(template.saved, strict=False)  # ...or, for training, the head as it is now
    for p in model.parameters():
        p.requires_grad_(False)
    rows = RowSlots()
    layers = {}
    for name, (base, projection, dropout) in taken.items():
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        layers[name] = _replace(model, name, slot_layer(base, projection, cfg.r, slots, rows, p, name))
    heads: dict[str, SlotHeadLinear] = {}
    originals: dict[str, nn.Linear] = {}
    if per_slot_heads:
        for s in saved:
            for full, leaf in _head_leaves(model, s).items():
                originals[full] = leaf
                heads[full] = _replace(model, full, SlotHeadLinear(leaf, slots, rows, full))
    tables = SlotTables(rows, layers, heads, saved, template, originals)
    if trainable:
        for n in template.m:  # DVoRA: m trains with d and b
            layers[n].train_magnitude()
        for slot in range(1, slots):
            tables.write(slot, template)
        for layer in layers.values():
            layer.vera_d.requires_grad_(cfg.train_d)
            layer.vera_b.requires_grad_(cfg.train_b)
        for p in tables.head_params(model):
            p.requires_grad_(True)
    return tables


def _magnitude_scale(layer: SlotLayer, adapter: Adapter, name: str) -> torch.Tensor:
    """Semantics: m / ||W0 + delta|| per output row (d_out,), float32, for `adapter`'s layer `name` at its own
    rank r (A_sl[:r], B_sl[:, :r], scale s(d_in, r)), the same delta the VeRA layer of rank r forms. The norm
    of each kind is its layer's: per row (linear), per output channel (convolution, as VeraConv's), per
    embedding dimension over the vocabulary, padding row excepted (`layer_embedding.table_norms`)."""
    r, dev = adapter.config.r, layer.vera_b.device
    A, B = layer.slices(dev, torch.float32)
    A, B, d, b, m = A[:r], B[:, :r], adapter.d[name].to(dev), adapter.b[name].to(dev), adapter.m[name].to(dev)
    scale = layer.projection.scale(layer.fan_in, r)
    if isinstance(layer, SlotLinear):
        w0 = layer.plain_weight()  # dequantized for a quantized base, as VeraLinear's norm uses
        return ops.magnitude_scale(w0, ops.vera_delta(A, B, d, b, scale), m)
    if isinstance(layer, SlotConv):  # W0 + delta (C_out, d_in) as VeraConv._adapted_weight forms it
        w0 = layer.base.weight.reshape(layer.out_features, layer.in_features).float()
        return ops.magnitude_scale(ops.vera_delta(A, B, d, b, scale, base=w0), None, m)
    F_A, F_B = ops.delta_factors(A, B, d, b, scale)  # (r, V), (D, r), as VeraEmbedding._factors
    left = F_A.t()
    if layer.base.padding_idx is not None:
        left[layer.base.padding_idx] = 0
    norms = table_norms(layer.base.weight, left, F_B.t())
    return m / norms.clamp_min(torch.finfo(torch.float32).tiny)


def _replace(model: nn.Module, name: str, module: nn.Module) -> Any:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
    return module


def _head_leaves(model: nn.Module, saved: str) -> dict[str, nn.Linear]:
    """Full name -> leaf of every nn.Linear in module to save `saved`; refuses anything else holding state."""
    root = model.get_submodule(saved)
    leaves = {n: m for n, m in root.named_modules() if type(m) is nn.Linear}
    covered = {f"{n}.{k}" if n else k for n, m in leaves.items() for k, _ in m.named_parameters()}
    others = [k for k, _ in root.named_parameters() if k not in covered] + [k for k, _ in root.named_buffers()]
    if others:
        raise AdapterError(f"module to save {saved!r} holds {others[:3]} outside plain nn.Linear leaves; per-slot "
                           "heads support stacks of linear layers only (grouped training: train one shared head)")
    return {f"{saved}.{n}" if n else saved: m for n, m in leaves.items()}

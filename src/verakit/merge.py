"""Merge VeRA into the base weights: on live modules, and as pure functions over tensors.

Merging is only ever an explicit call. Deltas are computed in float32 and cast once to the weight dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .atomic import new_dir
from .fileformat import Adapter, AdapterError, load_adapter, read_adapter
from .inject import vera_state
from .projection import Projection, matrix_ids

__all__ = ["merge", "unmerge", "is_merged", "adapter_deltas", "merged_state_dict", "export_merged", "merge_pretrained"]


def merge(model: nn.Module) -> nn.Module:
    """Fold every VeRA layer's delta into its base weight. Idempotent; returns the model."""
    for layer in vera_state(model).layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (within float rounding). Idempotent; returns the model."""
    for layer in vera_state(model).layers.values():
        layer.unmerge()
    return model


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for layer in vera_state(model).layers.values())


def adapter_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Semantics: {module: diag(b) B_sl diag(s d) A_sl} in float32, shaped like the module's weight.

    Pure: needs only the adapter, since the projections are regenerated from its seed (or, for a
    non-default projection_kind, carried by the adapter with scale 1).
    """
    cfg = adapter.config
    shared = adapter.projection
    if shared is None and cfg.projection_sharing == "shared":
        shared = Projection(
            cfg.seed, cfg.distribution, cfg.r,
            max(v[1] for v in adapter.modules.values()), max(v[0] for v in adapter.modules.values()),
        )
    out = {}
    for name, (d_out, d_in, kind) in adapter.modules.items():
        proj = shared or Projection(cfg.seed, cfg.distribution, cfg.r, d_in, d_out, matrix_ids("unique", name))
        A, B = proj.A[: cfg.r, :d_in], proj.B[:d_out, : cfg.r]
        delta = (adapter.b[name].unsqueeze(1) * B) @ ((adapter.d[name] * proj.scale(d_in, cfg.r)).unsqueeze(1) * A)
        out[name] = delta.t() if kind == "conv1d" else delta
    return out


def merged_state_dict(state_dict: dict[str, torch.Tensor], adapter: Adapter, prefix: str = "") -> dict[str, torch.Tensor]:
    """A new state dict with the adapter merged: `W + delta` per adapted module, saved modules replaced.

    `prefix` is prepended to the adapter's module names to find keys (e.g. "" or "model.").
    Raises AdapterError when a key is missing or a shape differs.
    """
    out = dict(state_dict)
    for name, delta in adapter_deltas(adapter).items():
        key = f"{prefix}{name}.weight"
        if key not in out:
            raise AdapterError(f"{adapter.path}: state dict has no weight {key!r} for adapted module {name!r}")
        w = out[key]
        if tuple(w.shape) != tuple(delta.shape):
            raise AdapterError(f"{adapter.path}: weight {key!r} has shape {tuple(w.shape)}, adapter expects {tuple(delta.shape)}")
        out[key] = (w.float() + delta).to(w.dtype)
    for key, t in adapter.saved.items():
        out[f"{prefix}{key}"] = t.clone()
    return out


def export_merged(model: nn.Module, out_dir: str | os.PathLike[str]) -> Path:
    """Write a standard `save_pretrained` directory of the merged model, loadable without verakit.

    The directory appears atomically (built beside it, then renamed); an existing non-empty directory is
    refused. The live model is left merged or unmerged as it was.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    state = vera_state(model)
    was_merged = {n: layer.merged for n, layer in state.layers.items()}
    merge(model)
    try:
        sd = {}
        renames = {f"{n}.base.": f"{n}." for n in state.layers}
        for k, v in model.state_dict().items():
            if k.endswith((".vera_d", ".vera_b")):
                continue
            for old, new in renames.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            sd[k] = v
        with new_dir(out) as tmp:
            model.save_pretrained(tmp, state_dict=sd)
    finally:
        for n, layer in state.layers.items():
            if not was_merged[n]:
                layer.unmerge()
    return out


def merge_pretrained(model_dir: str, adapter_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Load `model_dir` with the architecture the adapter was trained on, load the adapter, export merged."""
    from .hf import load_base_for_adapter

    adapter = read_adapter(adapter_path)
    model = load_base_for_adapter(model_dir, adapter)
    load_adapter(model, adapter)
    return export_merged(model, out_dir)

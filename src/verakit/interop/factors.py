"""A VeRA adapter as explicit low-rank factors: the projection it uses and its per-layer scale.

Semantics: delta_W = diag(b) B_sl diag(s d) A_sl = F_B @ F_A with F_A = diag(s d) A_sl (r, d_in) and
F_B = diag(b) B_sl (d_out, r). That is exactly a rank-r LoRA with scaling 1, and a PEFT VeRA layer with
lambda_d = s d, lambda_b = b over the same tables. Pure functions of an `Adapter`: no model needed.
"""

from __future__ import annotations

import torch

from ..fileformat import Adapter, AdapterError
from ..ops import delta_factors
from ..projection import Projection, matrix_ids

__all__ = ["EXPORTABLE_KINDS", "check_exportable", "shared_projection", "layer_projection", "vera_factors"]

# Layer kinds whose delta is a plain (d_out, d_in) matrix that PEFT VeRA and LoRA layers represent: torch
# convolutions (kernels) and embeddings (fan-in 1, transposed lookup) are not.
EXPORTABLE_KINDS = ("linear", "conv1d")


def check_exportable(adapter: Adapter, target: str) -> None:
    """Raise AdapterError naming the first module whose kind `target` (PEFT VeRA, LoRA) cannot hold, or
    the magnitude of a DVoRA adapter, which neither holds."""
    if adapter.config.magnitude:
        why = ("PEFT VeRA layers have no magnitude vector" if "PEFT" in target else
               "its change to a weight, m * (W0 + delta) / ||W0 + delta|| - W0, rescales every row of W0, so "
               "it is not low rank and no LoRA export of it is exact")
        raise AdapterError(f"{adapter.path or '<adapter>'}: a DVoRA adapter (config.magnitude=True) cannot be "
                           f"exported to {target}: {why}; merge it instead (verakit merge)")
    for name, (_, _, kind) in adapter.modules.items():
        if kind not in EXPORTABLE_KINDS:
            raise AdapterError(f"{adapter.path or '<adapter>'}: module {name!r} is a {kind.split(':')[0]} layer "
                               f"({kind}); {target} export handles linear layers only")


def shared_projection(adapter: Adapter) -> Projection:
    """The adapter's one shared pair (regenerated, PEFT-generated or stored), sized for all its modules."""
    cfg = adapter.config
    if cfg.projection_sharing != "shared":
        raise AdapterError(
            f"{adapter.path or '<adapter>'}: projection_sharing={cfg.projection_sharing!r} gives every layer its own "
            "pair, which PEFT VeRA (one shared pair per model) cannot represent; export it with to_lora instead"
        )
    if adapter.projection is not None:
        return adapter.projection
    max_in = max(v[1] for v in adapter.modules.values())
    max_out = max(v[0] for v in adapter.modules.values())
    return Projection(cfg.seed, cfg.distribution, cfg.r, max_in, max_out)


def layer_projection(adapter: Adapter, name: str, shared: Projection | None) -> Projection:
    """The pair module `name` uses: `shared`, or its own pair when projections are unique per layer."""
    if shared is not None:
        return shared
    d_out, d_in, _ = adapter.modules[name]
    cfg = adapter.config
    return Projection(cfg.seed, cfg.distribution, cfg.r, d_in, d_out, matrix_ids("unique", name))


def vera_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Semantics: {module: (F_A = diag(s d) A_sl (r, d_in), F_B = diag(b) B_sl (d_out, r))}, float32.

    F_B @ F_A equals `verakit.merge.adapter_deltas(adapter)[module]` (before Conv1D's transpose).
    """
    check_exportable(adapter, "low-rank factor")
    r = adapter.config.r
    shared = shared_projection(adapter) if adapter.config.projection_sharing == "shared" else None
    out = {}
    for name, (d_out, d_in, _) in adapter.modules.items():
        proj = layer_projection(adapter, name, shared)
        A, B = proj.A[:r, :d_in], proj.B[:d_out, :r]  # (r, d_in), (d_out, r)
        # s * d in float32, as VeraLinear.forward computes it, so exported factors round the same way.
        out[name] = delta_factors(A, B, adapter.d[name].float(), adapter.b[name].float(), proj.scale(d_in, r))
    return out

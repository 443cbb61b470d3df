"""Export a VeRA adapter as a standard PEFT LoRA directory, for engines that only know LoRA.

Semantics: a VeRA layer is exactly a rank-r LoRA with scaling 1: lora_A = diag(s d) A_sl (r, d_in),
lora_B = diag(b) B_sl (d_out, r), lora_alpha = r. Its delta has rank <= min(r, d_in, d_out), so each
layer gets rank k = min(r, d_in, d_out, max_rank): the closed form when k = r, else the best rank-k
approximation (truncated SVD, computed from the factors through two thin QRs, never from the dense
delta), which is still exact when k = min(r, d_in, d_out). The relative error of each layer is reported.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fileformat import Adapter, AdapterError
from .factors import check_exportable, vera_factors
from .peftdir import MODEL_PREFIX, common_config, write_peft_dir

__all__ = ["EXACT_TOL", "LoraExport", "lora_factors", "to_lora"]

# A layer counts as exact when its truncation error (float64, from the dropped singular values) is at
# most this fraction of its delta: below what float32 factors resolve anyway (epsilon 1.2e-7 per entry).
EXACT_TOL = 1e-6


@dataclass(frozen=True)
class LoraExport:
    """What `to_lora` wrote (path is None for `lora_factors`).

    factors: module -> (lora_A (k, d_in), lora_B (d_out, k)), float32, k = ranks[module].
    ranks: module -> its LoRA rank k = min(r, d_in, d_out, max_rank); rank is the largest.
    rel_errors: module -> ||delta - lora_B lora_A||_F / ||delta||_F of the truncation, in float64 (0 when no
        singular value is dropped; float32 rounding of the written factors comes on top, ~1e-7).
    exact: every layer's error is <= EXACT_TOL, i.e. the export loses nothing beyond float rounding.
    """

    path: Path | None
    rank: int
    ranks: dict[str, int]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rel_errors: dict[str, float]

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_errors.values(), default=0.0)

    @property
    def exact(self) -> bool:
        return self.max_rel_error <= EXACT_TOL


def _truncate(fa: torch.Tensor, fb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Semantics: best rank-k (A_k, B_k) of delta = fb @ fa, and the relative Frobenius error of B_k A_k.

    fa (r, d_in), fb (d_out, r); float64 inside, float32 out. delta = Q1 (R1 R2^T) Q2^T, so the SVD of the
    small (r x r) core gives delta's SVD without forming the (d_out, d_in) matrix.
    """
    q1, r1 = torch.linalg.qr(fb.double())  # (d_out, k1), (k1, r)
    q2, r2 = torch.linalg.qr(fa.double().t())  # (d_in, k2), (k2, r)
    u, s, vh = torch.linalg.svd(r1 @ r2.t())  # (k1, m), (m,), (m, k2)
    keep = min(k, s.numel())
    root = s[:keep].sqrt()
    lora_b = torch.zeros(fb.shape[0], k, dtype=torch.float64)
    lora_a = torch.zeros(k, fa.shape[1], dtype=torch.float64)
    lora_b[:, :keep] = (q1 @ u[:, :keep]) * root  # (d_out, keep)
    lora_a[:keep] = root.unsqueeze(1) * (vh[:keep] @ q2.t())  # (keep, d_in)
    total = float(s.square().sum())
    err = math.sqrt(float(s[keep:].square().sum()) / total) if total > 0 else 0.0
    return lora_a.float(), lora_b.float(), err


def lora_factors(adapter: Adapter, max_rank: int | None = None) -> LoraExport:
    """LoRA factors of every adapted module at rank min(r, d_in, d_out, max_rank) (see the module docstring)."""
    r = adapter.config.r
    if max_rank is not None and max_rank < 1:
        raise AdapterError(f"{adapter.path or '<adapter>'}: max_rank must be >= 1, got {max_rank}")
    out, ranks, errors = {}, {}, {}
    check_exportable(adapter, "LoRA")
    for name, (fa, fb) in vera_factors(adapter).items():
        d_out, d_in, _ = adapter.modules[name]
        k = min(r, d_in, d_out, max_rank if max_rank is not None else r)
        if k == r:
            out[name], errors[name] = (fa, fb), 0.0
        else:
            lora_a, lora_b, errors[name] = _truncate(fa, fb, k)
            out[name] = (lora_a, lora_b)
        ranks[name] = k
    return LoraExport(None, max(ranks.values(), default=0), ranks, out, errors)


def to_lora(
    adapter: Adapter, out_dir: str | os.PathLike[str], max_rank: int | None = None,
    base_model_name_or_path: str | None = None,
) -> LoraExport:
    """Write `adapter` as a PEFT LoRA directory (scaling 1 in every layer); returns what was written.

    `r` = `lora_alpha` = the largest layer rank; layers of a smaller rank are listed in `rank_pattern`
    and `alpha_pattern` (full module names, regex-escaped) with alpha = rank, so their scaling is 1 too.
    Modules to save (e.g. a classification head) are written as PEFT does; LoRA-only serving engines
    accept only the lora_A / lora_B tensors, so such an adapter needs PEFT (or a merge) to serve.
    """
    export = lora_factors(adapter, max_rank)
    tensors: dict[str, torch.Tensor] = {}
    for name, (lora_a, lora_b) in export.factors.items():
        tensors[f"{MODEL_PREFIX}{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{MODEL_PREFIX}{name}.lora_B.weight"] = lora_b.contiguous()
    for key, t in adapter.saved.items():
        tensors[f"{MODEL_PREFIX}{key}"] = t.clone()
    # PEFT matches these keys as regexes against module names; escaping makes each match one module only.
    pattern = {re.escape(n): k for n, k in export.ranks.items() if k != export.rank}
    config = {
        **common_config(adapter, base_model_name_or_path),
        "peft_type": "LORA",
        "r": export.rank,
        "lora_alpha": export.rank,
        "lora_dropout": adapter.config.dropout,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
    }
    path = write_peft_dir(out_dir, config, tensors)
    return LoraExport(path, export.rank, export.ranks, export.factors, export.rel_errors)

"""The projection part of an adapter file: its `projection` metadata and, for imported projections that
cannot be regenerated, the stored tables; rebuilt and checked on read (docs/format.md,
section 2). Faults raise ValueError naming the field; `fileformat` adds the file's name."""

from __future__ import annotations

from typing import Any

import torch

from .config import PROJECTION_KINDS, VeraConfig
from .projection import GENERATORS, MAX_PROJECTION_ELEMENTS, Projection

__all__ = ["TABLE_KEYS", "projection_meta", "projection_from_file"]

TABLE_KEYS = ("vera_projection.A", "vera_projection.B")  # explicit projections only


def projection_meta(cfg: VeraConfig, proj: Projection | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The file's "projection" metadata, and the tables to store (explicit projections only); `proj` is
    the adapter's projection (None when regenerated from the seed)."""
    meta: dict[str, Any] = {
        "generator": GENERATORS[cfg.projection_kind],
        "seed": cfg.seed,
        "distribution": cfg.distribution,
        "sharing": cfg.projection_sharing,
    }
    if cfg.projection_kind == PROJECTION_KINDS[0]:
        return meta, {}
    if proj is None or proj.kind != cfg.projection_kind:
        raise ValueError(f"projection_kind {cfg.projection_kind!r} needs the adapter's projection of that kind")
    # The tables are always float32: rounding them would change every adapted layer's output.
    meta.update(rank=proj.rank, max_in=proj.max_in, max_out=proj.max_out)
    if cfg.projection_kind == "explicit":
        return meta, {TABLE_KEYS[0]: proj.A.float().contiguous(), TABLE_KEYS[1]: proj.B.float().contiguous()}
    return meta, {}


def projection_from_file(
    config: VeraConfig, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
    modules: dict[str, tuple[int, int, str]],
) -> Projection | None:
    """Rebuild a non-default projection from the file, checking it covers every adapted module."""
    if config.projection_kind == PROJECTION_KINDS[0]:
        return None
    try:
        rank, max_in, max_out = int(meta["rank"]), int(meta["max_in"]), int(meta["max_out"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt metadata: projection needs rank, max_in, max_out ({type(e).__name__}: {e})") from None
    need_in = max((v[1] for v in modules.values()), default=1)
    need_out = max((v[0] for v in modules.values()), default=1)
    if rank < config.r or max_in < need_in or max_out < need_out:
        raise ValueError(
            f"projection (rank {rank}, max_in {max_in}, max_out {max_out}) is too small for r={config.r} "
            f"and the largest module ({need_out}, {need_in})"
        )
    if config.projection_kind == "peft-torch":
        if (rank, max_in, max_out) != (config.r, need_in, need_out):
            raise ValueError(f"projection (rank {rank}, max_in {max_in}, max_out {max_out}) is not PEFT's pair for "
                             f"r={config.r} and the largest module ({need_out}, {need_in}): PEFT sizes it exactly")
        if rank * (max_in + max_out) > MAX_PROJECTION_ELEMENTS:
            raise ValueError(f"projection (rank {rank}, max_in {max_in}, max_out {max_out}) would hold "
                             f"{rank * (max_in + max_out):,} elements, above the limit of {MAX_PROJECTION_ELEMENTS:,}")
        return Projection.peft_torch(config.seed, rank, max_in, max_out)
    A, B = tensors[TABLE_KEYS[0]], tensors[TABLE_KEYS[1]]
    for key, t, want in ((TABLE_KEYS[0], A, (rank, max_in)), (TABLE_KEYS[1], B, (max_out, rank))):
        if tuple(t.shape) != want or t.dtype != torch.float32:
            raise ValueError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected float32 {want}")
    return Projection.from_tables(A, B, kind="explicit", seed=config.seed)

"""One entry point for `verakit convert`: PEFT VeRA -> verakit, verakit -> PEFT VeRA, verakit -> LoRA."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..fileformat import read_adapter, write_adapter
from .lora import to_lora
from .peft_vera import from_peft, to_peft

__all__ = ["DIRECTIONS", "convert"]

DIRECTIONS = ("from-peft", "to-peft", "to-lora")


def convert(
    direction: str, src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
    model: str | None = None, max_rank: int | None = None,
) -> dict[str, Any]:
    """Convert `src` to `dst`; returns a JSON-able summary.

    from-peft: SRC is a PEFT VeRA directory, DST a verakit .safetensors file; `model` is the base
        model directory (default: the adapter's base_model_name_or_path when local).
    to-peft / to-lora: SRC is a verakit adapter file, DST a new directory; `model` is recorded as
        base_model_name_or_path. to-lora gives each layer rank min(r, d_in, d_out, max_rank) (exact unless
        max_rank is below a layer's min(r, d_in, d_out)) and reports the error and whether it is exact.
    """
    if direction == "from-peft":
        if Path(dst).exists():  # as to-peft / to-lora refuse a non-empty DST: a stored adapter is never replaced
            raise FileExistsError(f"{dst} exists; convert from-peft writes a new file and does not overwrite it")
        adapter = from_peft(src, model)
        nbytes = write_adapter(adapter, dst)
        return {"direction": direction, "dst": str(dst), "bytes": nbytes, "layers": len(adapter.modules),
                "projection_kind": adapter.config.projection_kind}
    if direction not in DIRECTIONS:
        raise ValueError(f"convert: direction must be one of {DIRECTIONS}, got {direction!r}")
    adapter = read_adapter(src)
    if direction == "to-peft":
        path = to_peft(adapter, dst, base_model_name_or_path=model)
        return {"direction": direction, "dst": str(path), "layers": len(adapter.modules)}
    export = to_lora(adapter, dst, max_rank=max_rank, base_model_name_or_path=model)
    return {"direction": direction, "dst": str(Path(dst)), "layers": len(adapter.modules), "rank": export.rank,
            "ranks": sorted(set(export.ranks.values())), "exact": export.exact, "max_rel_error": export.max_rel_error}

"""Mixed precision for training steps: the forward (and so the backward) under bf16 autocast.

Trainable parameters, their gradients and AdamW's state stay float32 (autocast casts operands, not the
parameters); evaluation runs outside autocast, so the dev score and the saved file are exact fp32.
On CPUs with bf16 units (AMX tiles, AVX-512 BF16), bf16 matrix products run several times faster than fp32:
a 1280x384 @ 384x1536 product is 9x faster on an AMX Xeon, ~2.5x on an AVX-512 BF16 EPYC; a MiniLM training
step 1.1-1.7x on top of length-grouped batches (docs/performance.md). On CPUs without them it is slower:
`verakit train` keeps fp32 the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

__all__ = ["MIXED_PRECISIONS", "check_mode", "cpu_bf16_units", "speed_tip", "speed_tip_once", "step_context",
           "training_attention"]

MIXED_PRECISIONS = ("no", "bf16")


def check_mode(mode: str) -> str:
    """`mode` if it is one of MIXED_PRECISIONS, else a ValueError naming them."""
    if mode not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mode!r}")
    return mode


def step_context(mode: str, device_type: str) -> AbstractContextManager[object]:
    """What a training step's forward runs under."""
    if check_mode(mode) == "no":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


@contextmanager
def training_attention(model: nn.Module, mode: str, device_type: str) -> Iterator[Callable[[], AbstractContextManager[None]]]:
    """Within this context a transformers model trains with eager attention when bf16 steps run on a CPU:
    torch's CPU flash-attention backward in bf16 is ~8x slower than in fp32 (it ate the whole gain: 0.99
    s/step with SDPA, 0.50 s eager, MiniLM batch 32 x 40 tokens, one thread), while eager attention's bmm
    products run on AMX. Yields `evaluating()`, a context that restores the loaded implementation for
    evaluations, so the dev score equals what `verakit eval` computes from the file later; on exit the
    model has its loaded implementation again. Elsewhere (fp32, GPUs, models without the switch) a no-op."""
    target = _switchable(model) if check_mode(mode) == "bf16" and device_type == "cpu" else None
    loaded = None if target is None else target.config._attn_implementation

    @contextmanager
    def evaluating() -> Iterator[None]:
        if target is None:
            yield
            return
        target.set_attn_implementation(loaded)
        try:
            yield
        finally:
            target.set_attn_implementation("eager")

    if target is None:
        yield evaluating
        return
    target.set_attn_implementation("eager")
    try:
        yield evaluating
    finally:
        target.set_attn_implementation(loaded)


def _switchable(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model (under a PEFT wrapper too) running SDPA attention, or None."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "set_attn_implementation") and getattr(config, "_attn_implementation", None) == "sdpa":
            return module
    return None


# /proc/cpuinfo flag -> the unit it names; either makes bf16 autocast steps faster than fp32 (measured on both)
BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX-512 BF16"}


@lru_cache(maxsize=1)
def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 matrix units this CPU advertises (Linux /proc/cpuinfo flags; () where unreadable or none)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ()
    flags = next((set(line.split(":", 1)[-1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return tuple(unit for flag, unit in BF16_FLAGS.items() if flag in flags)


# Tips already said by this process: `verakit tune` runs one loop per trial, and the same line each time is noise.
_SHOWN_TIPS: set[str] = set()


def speed_tip_once(mode: str, device_type: str) -> str | None:
    """`speed_tip`, or None when this process has said it already."""
    tip = speed_tip(mode, device_type)
    if tip is None or tip in _SHOWN_TIPS:
        return None
    _SHOWN_TIPS.add(tip)
    return tip


def speed_tip(mode: str, device_type: str) -> str | None:
    """A line for fp32 training on a CPU with bf16 units: bf16 steps would be faster there (and only there)."""
    if mode == "no" and device_type == "cpu" and (units := cpu_bf16_units()):
        return (f"this CPU has bf16 units ({', '.join(units)}): --mixed-precision bf16 makes training steps "
                "1.1-1.7x faster (evaluation and the file stay fp32; docs/performance.md)")
    return None

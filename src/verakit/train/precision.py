"""Mixed precision for training steps: the forward (and so the backward) under bf16 autocast.

Trainable parameters, their gradients and AdamW's state stay float32 (autocast casts operands, not the
parameters); evaluation runs outside autocast, so the dev score and the saved file are exact fp32.
On CPUs with AMX (and avx512_bf16), bf16 matrix products run several times faster than fp32: on the
2-core Xeon this project measures on, a 1280x384 @ 384x1536 product is 9x faster; a MiniLM training step
about 2x (docs/performance.md). On CPUs without them it is slower: `verakit train` keeps fp32 the default.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

__all__ = ["MIXED_PRECISIONS", "check_mode", "prepare_model", "step_context"]

MIXED_PRECISIONS = ("no", "bf16")


def check_mode(mode: str) -> str:
    if mode not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mode!r}")
    return mode


def step_context(mode: str, device_type: str) -> AbstractContextManager[object]:
    """What a training step's forward runs under."""
    if check_mode(mode) == "no":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def prepare_model(model: nn.Module, mode: str, device_type: str) -> str | None:
    """Under bf16 on a CPU, switch a transformers model from SDPA to eager attention: torch's CPU flash
    attention backward in bf16 is ~8x slower than in fp32 (it ate the whole gain: 0.99 s/step with SDPA,
    0.50 s eager, MiniLM batch 32 x 40 tokens, one thread), eager attention's bmm products run on AMX.
    Returns the implementation set, or None when nothing changed."""
    if check_mode(mode) == "no" or device_type != "cpu":
        return None
    for module in model.modules():  # the outermost transformers model (under a PEFT wrapper too)
        config = getattr(module, "config", None)
        if hasattr(module, "set_attn_implementation") and getattr(config, "_attn_implementation", None) == "sdpa":
            module.set_attn_implementation("eager")
            return "eager"
    return None

"""Helpers shared by the interop tests (imported as `interop.cases`; the `case` fixture is in conftest.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from verakit import VeraConfig

ATOL = 1e-5  # fp32 logits: ours vs PEFT's


@dataclass
class Case:
    name: str
    base: nn.Module
    inputs: torch.Tensor
    peft_targets: list[str] | str  # PEFT VeraConfig.target_modules
    config: VeraConfig  # ours
    task_type: str | None

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.base)

    def logits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=self.inputs).logits


def randomize_trainable(model: nn.Module, seed: int = 0) -> None:
    """Perturb every trainable parameter (VeRA vectors and saved heads, ours or PEFT's) at a fixed seed.

    Vectors get values of std 0.1 (b starts at zero, which would hide bugs); matrices of saved modules get
    noise of std 0.02 on top of their weights, enough to differ from the base without saturating tanh.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                if p.dim() == 1 and p.numel() > 0:
                    p.copy_(noise * 0.1)
                else:
                    p.add_(noise * 0.02)

"""AdamW over slot tables where every slot (one group's adapter) steps only when its rows were in the batch.

Semantics: for each slot s marked present this step (a dense, non-slotted parameter counts as one slot
that is always present):
    t[s] += 1
    p[s] *= 1 - lr * weight_decay
    m[s] = b1 m[s] + (1 - b1) g[s];   v[s] = b2 v[s] + (1 - b2) g[s]^2
    p[s] -= lr / (1 - b1^t[s]) * m[s] / (sqrt(v[s]) / sqrt(1 - b2^t[s]) + eps)
and every absent slot keeps its parameters, moments and step count exactly.

Why not torch's AdamW over the stacked (S, ...) tables: its weight decay, moment decay and bias correction
act on every element at every step. A group with no rows in the batch has a zero gradient row, yet it
would still be decayed and would still move by lr * m / (sqrt(v) + eps) from its old moments, and its
bias correction would count steps it never took. Stacked AdamW equals per-group AdamW only while every
group is in every batch. Here each group's vectors follow exactly the AdamW trajectory of that group's own
gradient sequence (the steps where it had rows), with the learning rate of the shared schedule at those
steps. "Present" is declared, not inferred from the gradient: at b = 0 (VeRA's initial b) the gradient of
d is exactly zero for groups that are present.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["SlotAdamW"]


class SlotAdamW(torch.optim.Optimizer):
    """AdamW with per-slot step counts for tables whose dim 0 is the slot.

    Param groups are dicts with "params", "lr" and "slotted" (default True: every parameter's dim 0 has
    `slots` rows; False: ordinary AdamW, e.g. a head shared by all groups). Call `mark(ids)` with each
    batch's per-row slots before `step()`; `step()` updates the slots marked since the previous step.
    Under torch.distributed the marks are OR-reduced across ranks, so every rank takes the same step.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        slots: int,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if slots < 1:
            raise ValueError(f"SlotAdamW: slots must be >= 1, got {slots}")
        defaults = {"betas": betas, "eps": eps, "weight_decay": weight_decay, "slotted": True}
        super().__init__(list(params), defaults)
        self.slots = slots
        for i, group in enumerate(self.param_groups):
            if group["slotted"]:
                for p in group["params"]:
                    if p.dim() == 0 or p.shape[0] != slots:
                        raise ValueError(
                            f"SlotAdamW: param group {group.get('name', i)!r} is slotted but holds a tensor of "
                            f"shape {tuple(p.shape)}; slot tables need dim 0 = {slots}"
                        )
        self._present: torch.Tensor | None = None  # (S,) bool, the slots marked since the last step

    def mark(self, ids: torch.Tensor) -> None:
        """Declare the per-row slots `ids` [B] of a batch whose loss is part of the coming step."""
        if ids.dim() != 1 or ids.dtype != torch.int64:
            raise ValueError(f"SlotAdamW.mark: slots must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.slots):
            raise ValueError(f"SlotAdamW.mark: slot ids must be in 0..{self.slots - 1}, got {ids.tolist()[:8]}")
        if self._present is None:
            self._present = torch.zeros(self.slots, dtype=torch.bool, device=ids.device)
        self._present[ids.to(self._present.device)] = True

    def _present_rows(self) -> torch.Tensor:
        present = self._present
        self._present = None
        if present is None:
            raise RuntimeError("SlotAdamW.step(): no slots were marked; call mark(ids) with each batch's per-row slots")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flags = present.to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            present = flags.bool()
        return present.nonzero().squeeze(1)  # (P,) int64, ascending

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("SlotAdamW.step does not take a closure")
        slotted = any(g["slotted"] and any(p.grad is not None for p in g["params"]) for g in self.param_groups)
        rows = self._present_rows() if slotted else None
        if not slotted:
            self._present = None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            hyper = (float(group["lr"]), b1, b2, group["eps"], group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SlotAdamW: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    n = self.slots if group["slotted"] else 1
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["slot_steps"] = torch.zeros(n, dtype=torch.float32, device=p.device)  # (S,) or (1,)
                if group["slotted"]:
                    assert rows is not None
                    if rows.numel():
                        _adamw_rows(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["slot_steps"],
                                    rows.to(p.device), *hyper)
                else:  # one always-present slot: the tensor itself, viewed as a 1-row table
                    one = torch.zeros(1, dtype=torch.int64, device=p.device)
                    _adamw_rows(p.unsqueeze(0), p.grad.unsqueeze(0), state["exp_avg"].unsqueeze(0),
                                state["exp_avg_sq"].unsqueeze(0), state["slot_steps"], one, *hyper)


def _adamw_rows(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor,
    lr: float, b1: float, b2: float, eps: float, wd: float,
) -> None:
    """Semantics: AdamW on rows `rows` of p (S, ...) with moments m, v (S, ...) and step counts steps (S,)."""
    steps.index_add_(0, rows, torch.ones(rows.shape[0], dtype=steps.dtype, device=steps.device))
    t = steps.index_select(0, rows).double()  # (P,): exact integers; powers in float64 as torch's AdamW
    shape = (-1,) + (1,) * (p.dim() - 1)
    step_size = (lr / (1.0 - b1**t)).to(p.dtype).view(shape)  # (P, 1, ...)
    bc2_sqrt = (1.0 - b2**t).sqrt().to(p.dtype).view(shape)
    pr, gr, mr, vr = (x.index_select(0, rows) for x in (p, g, m, v))  # (P, ...) copies
    pr.mul_(1.0 - lr * wd)
    mr.lerp_(gr, 1.0 - b1)
    vr.mul_(b2).addcmul_(gr, gr, value=1.0 - b2)
    denom = (vr.sqrt() / bc2_sqrt).add_(eps)
    pr.sub_(step_size * mr / denom)
    p.index_copy_(0, rows, pr)
    m.index_copy_(0, rows, mr)
    v.index_copy_(0, rows, vr)

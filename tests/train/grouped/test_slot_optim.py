"""SlotAdamW against torch's AdamW: every slot follows AdamW run on that slot alone over the steps where it
had rows (with the schedule's learning rate), absent slots stay bit for bit, a dense group is plain AdamW,
a state_dict round trip (--resume) changes nothing, and misuse fails naming the group or the slots."""

from __future__ import annotations

import copy

import pytest
import torch

from verakit.train.grouped.slot_optim import SlotAdamW


def test_slot_adamw_equals_per_group_adamw_and_stacked_adamw_does_not():
    """Random presence patterns, a changing lr and weight decay: every slot follows torch's AdamW run on
    that slot alone over the steps where it was present; absent slots stay bit for bit; a dense group is
    plain AdamW. A state_dict round trip halfway (what --resume does) changes nothing."""
    S, steps = 6, 10
    g = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(S, 3, 4, generator=g))
    dense = torch.nn.Parameter(torch.randn(5, generator=g))
    stacked = torch.nn.Parameter(table.detach().clone())

    def make(t, d):
        return SlotAdamW([{"params": [t], "lr": 1e-2}, {"params": [d], "lr": 3e-2, "slotted": False}], S,
                         weight_decay=0.1)

    opt = make(table, dense)
    refs = [torch.nn.Parameter(table[s].detach().clone()) for s in range(S)]
    ref_opts = [torch.optim.AdamW([r], lr=1e-2, weight_decay=0.1) for r in refs]
    dense_ref = torch.nn.Parameter(dense.detach().clone())
    dense_opt = torch.optim.AdamW([dense_ref], lr=3e-2, weight_decay=0.1)
    stacked_opt = torch.optim.AdamW([stacked], lr=1e-2, weight_decay=0.1)
    absent_moved = 0.0
    for step in range(steps):
        present = sorted({int(i) for i in torch.randint(1, S, (3,), generator=g)})  # slot 0 never trains
        grad = torch.zeros(S, 3, 4)
        grad[present] = torch.randn(len(present), 3, 4, generator=g)
        dense_grad = torch.randn(5, generator=g)
        scale = 1.0 - step / steps  # the schedule changes lr between steps
        before = table.detach().clone()
        table.grad, dense.grad, stacked.grad = grad.clone(), dense_grad.clone(), grad.clone()
        for group in opt.param_groups:
            group["lr"] = (3e-2 if not group["slotted"] else 1e-2) * scale
        stacked_opt.param_groups[0]["lr"] = 1e-2 * scale
        opt.mark(torch.tensor(present))
        opt.step()
        stacked_before = stacked.detach().clone()
        stacked_opt.step()
        for s in present:
            refs[s].grad = grad[s].clone()
            ref_opts[s].param_groups[0]["lr"] = 1e-2 * scale
            ref_opts[s].step()
        dense_ref.grad = dense_grad
        dense_opt.param_groups[0]["lr"] = 3e-2 * scale
        dense_opt.step()
        absent = [s for s in range(S) if s not in present]
        assert torch.equal(table.detach()[absent], before[absent])
        if step > 0:
            absent_moved = max(absent_moved, float((stacked.detach() - stacked_before)[absent[1:]].abs().max()))
        if step == steps // 2:  # checkpoint and resume into a fresh optimizer
            saved = copy.deepcopy(opt.state_dict())
            opt = make(table, dense)
            opt.load_state_dict(saved)
    for s in range(S):
        torch.testing.assert_close(table.detach()[s], refs[s].detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense.detach(), dense_ref.detach(), atol=1e-6, rtol=0)
    # torch's AdamW over the stacked table moves groups that had no rows (decay + stale moments):
    assert absent_moved > 1e-3


def test_slot_adamw_refuses_unmarked_steps_and_bad_tables():
    table = torch.nn.Parameter(torch.zeros(4, 2))
    opt = SlotAdamW([{"params": [table], "lr": 0.1}], 4)
    table.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="no slots were marked"):
        opt.step()
    with pytest.raises(ValueError, match=r"slot ids must be in 0..3"):
        opt.mark(torch.tensor([4]))
    with pytest.raises(ValueError, match=r"'adapter' is slotted but holds a tensor of shape \(3, 2\)"):
        SlotAdamW([{"params": [torch.nn.Parameter(torch.zeros(3, 2))], "lr": 0.1, "name": "adapter"}], 4)


def test_slot_adamw_step_counts_are_per_slot():
    """Bias correction counts each slot's own steps: after slot 1 steps 3 times and slot 2 once, slot 2's
    update is AdamW's first-step update (|delta| = lr for a constant gradient, decay off), slot 1's
    step counter reads 3."""
    table = torch.nn.Parameter(torch.zeros(3, 2))
    opt = SlotAdamW([{"params": [table], "lr": 0.1}], 3, weight_decay=0.0)
    for present in ([1], [1], [1, 2]):
        table.grad = torch.ones(3, 2)
        opt.mark(torch.tensor(present))
        opt.step()
    assert opt.state[table]["slot_steps"].tolist() == [0.0, 3.0, 1.0]
    assert torch.equal(table.detach()[0], torch.zeros(2))
    torch.testing.assert_close(table.detach()[2], torch.full((2,), -0.1), rtol=0, atol=1e-6)
    torch.testing.assert_close(table.detach()[1], torch.full((2,), -0.3), rtol=0, atol=1e-6)

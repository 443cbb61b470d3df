"""RUN_DIR/checkpoint: what `save_checkpoint` writes loads back equal, a checkpoint is complete only once
state.pt exists (the main process writes it last), RNG states restore the exact draws, and files that are
not ours, or a checkpoint from fewer processes, fail naming the file."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from verakit.train.checkpoint import (
    Checkpoint,
    checkpoint_dir,
    load_checkpoint,
    remove_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _checkpoint(step: int = 3) -> Checkpoint:
    p = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(2, 3)
    opt.step()
    return Checkpoint(step=step, tensors={"layer.vera_b": p.detach().clone()}, optimizer=opt.state_dict(),
                      scheduler={"last_epoch": step}, rng=rng_state(), history=[{"step": 0, "metrics": {"a": 0.5}}],
                      best={"step": 2, "metrics": {"a": 0.75}}, seconds=12.5, window=(1.5, 4.0), losses=[0.9, 0.8, 0.7])


def test_round_trip_keeps_every_field(tmp_path):
    ckpt = _checkpoint()
    save_checkpoint(tmp_path, 0, ckpt, write_shared=True)
    back = load_checkpoint(tmp_path, 0)
    assert back is not None
    assert torch.equal(back.tensors["layer.vera_b"], ckpt.tensors["layer.vera_b"])
    state, saved = back.optimizer["state"][0], ckpt.optimizer["state"][0]
    assert all(torch.equal(state[k], saved[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert (back.step, back.scheduler, back.history, back.best, back.seconds, back.window, back.losses) == (
        3, {"last_epoch": 3}, ckpt.history, ckpt.best, 12.5, (1.5, 4.0), [0.9, 0.8, 0.7])
    remove_checkpoint(tmp_path)
    assert not checkpoint_dir(tmp_path).exists() and load_checkpoint(tmp_path, 0) is None


def test_incomplete_or_foreign_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 1, _checkpoint(), write_shared=False)  # a non-main rank: its RNG file only
    assert load_checkpoint(tmp_path, 1) is None  # no state.pt: nothing to resume
    save_checkpoint(tmp_path, 0, _checkpoint(), write_shared=True)
    with pytest.raises(ValueError, match=r"rng-2\.pt: missing; the checkpoint was written by fewer processes"):
        load_checkpoint(tmp_path, 2)
    torch.save({"format": "something else"}, checkpoint_dir(tmp_path) / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: not a verakit checkpoint"):
        load_checkpoint(tmp_path, 0)


def test_rng_state_restores_the_same_draws():
    state = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]

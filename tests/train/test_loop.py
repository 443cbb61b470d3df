"""The generic training loop: parity with a plain PyTorch reference loop, exact loss normalisation,
determinism, and Ctrl-C -> checkpoint -> --resume reaching the same result bit for bit."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from verakit.train.loop import LoopConfig, TrainingInterrupted, _epoch_order, _local_slice, run_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(recipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}


def _reference_train(recipe, epochs: int, batch_size: int, warmup_ratio: float, seed: int) -> None:
    """The slow reference: the textbook loop with mean loss, AdamW and a hand-written linear schedule."""
    groups = recipe.param_groups()
    opt = torch.optim.AdamW([{"params": list(g.params), "lr": g.lr} for g in groups], weight_decay=0.01)
    n = recipe.num_train()
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    warm = math.ceil(warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    torch.manual_seed(seed)
    recipe.model.train()
    for epoch in range(epochs):
        order = _epoch_order(n, seed, epoch)
        for i in range(steps_per_epoch):
            batch = recipe.collate(order[i * batch_size : (i + 1) * batch_size])
            labels = batch.pop("labels")
            loss = F.cross_entropy(recipe.model(**batch).logits, labels)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()


@pytest.mark.parametrize("method", ["vera", "lora"])
def test_loop_matches_plain_reference(make_recipe, tmp_path, method):
    # batch 20 over 96 rows: the last batch of each epoch has 16 rows, so per-batch normalisation matters.
    cfg = LoopConfig(epochs=2, batch_size=20, warmup_ratio=0.2, seed=3, quiet=True)
    ours, ref = make_recipe(method, seed=3), make_recipe(method, seed=3)
    before = _trained(ours)
    result = run_loop(ours, cfg, tmp_path)
    _reference_train(ref, 2, 20, 0.2, 3)
    got, want = _trained(ours), _trained(ref)
    assert got.keys() == want.keys() and len(got) > 0
    for name in got:
        assert not torch.equal(got[name], before[name]) or "bias" in name, f"{name} did not train"
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert result.total_steps == 2 * math.ceil(96 / 20) == 10
    assert [h["step"] for h in result.history] == [5, 10]  # one evaluation per epoch


def test_same_seed_same_metrics_and_eval_every(make_recipe, tmp_path):
    cfg = LoopConfig(epochs=2, batch_size=16, seed=1, eval_every=4, quiet=True)
    a = run_loop(make_recipe(seed=1), cfg, tmp_path / "a")
    b = run_loop(make_recipe(seed=1), cfg, tmp_path / "b")
    # 6 steps per epoch: evaluations at steps 4, 6 (epoch end), 8, 12 (epoch end, also a multiple of 4).
    assert [h["step"] for h in a.history] == [4, 6, 8, 12]
    assert [h["metrics"] for h in a.history] == [h["metrics"] for h in b.history]
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    best = max(a.history, key=lambda h: h["metrics"]["accuracy"])
    assert a.best["step"] == best["step"]  # the first evaluation with the highest metric


def test_ctrl_c_checkpoint_then_resume_equals_uninterrupted(make_recipe, tmp_path):
    cfg = LoopConfig(epochs=3, batch_size=16, seed=2, quiet=True)
    full_recipe = make_recipe(seed=2)
    full = run_loop(full_recipe, cfg, tmp_path / "full")

    def ctrl_c_at_step_8(info):
        if info.step == 8:  # mid epoch 2: exercises data position and RNG restore
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted, match="after step 9") as exc:
        run_loop(make_recipe(seed=2), cfg, run_dir, on_step=ctrl_c_at_step_8)
    assert (exc.value.checkpoint_dir / "state.pt").is_file()
    resumed_recipe = make_recipe(seed=2)  # a fresh process would rebuild the model the same way
    resumed = run_loop(resumed_recipe, cfg, run_dir, resume=True)
    assert not (run_dir / "checkpoint").exists()  # removed once training completed
    assert [h["step"] for h in resumed.history] == [6, 12, 18]
    assert [h["metrics"] for h in resumed.history] == [h["metrics"] for h in full.history]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert resumed.losses == full.losses and len(full.losses) == 18
    got, want = _trained(resumed_recipe), _trained(full_recipe)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # Same saved tensors and metadata (the files' bytes may differ: safetensors writes the metadata map in
    # hash order, which varies between runs).
    from verakit import read_adapter

    x, y = read_adapter(run_dir / "adapter.safetensors"), read_adapter(tmp_path / "full" / "adapter.safetensors")
    assert (x.config, x.extra, x.modules) == (y.config, y.extra, y.modules)
    for name in y.d:
        assert torch.equal(x.d[name], y.d[name]) and torch.equal(x.b[name], y.b[name]), name
    assert all(torch.equal(x.saved[k], y.saved[k]) for k in y.saved)


def test_local_slices_cover_the_batch_exactly_once():
    for n, world in ((32, 2), (17, 2), (5, 4), (3, 4)):
        idx = list(range(100, 100 + n))
        parts = [_local_slice(idx, r, world) for r in range(world)]
        assert sum(parts, []) == idx


@pytest.mark.parametrize(("field", "value"), [("epochs", 0), ("batch_size", 0), ("warmup_ratio", 1.0), ("eval_every", 0)])
def test_loop_config_rejects(field, value):
    kw = {"epochs": 1, "batch_size": 8, field: value}
    with pytest.raises(ValueError, match=f"LoopConfig.{field}"):
        LoopConfig(**kw)

"""The generic training loop: parity with a plain PyTorch reference loop, exact loss normalisation,
determinism, and Ctrl-C -> checkpoint -> --resume reaching the same result bit for bit."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from verakit.train.batching import epoch_order as _epoch_order
from verakit.train.loop import LoopConfig, TrainingInterrupted, _local_slice, run_loop

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
    assert [h["step"] for h in result.history] == [0, 5, 10]  # before training, then one evaluation per epoch


def test_same_seed_same_metrics_and_eval_every(make_recipe, tmp_path):
    cfg = LoopConfig(epochs=2, batch_size=16, seed=1, eval_every=4, quiet=True)
    a = run_loop(make_recipe(seed=1), cfg, tmp_path / "a")
    b = run_loop(make_recipe(seed=1), cfg, tmp_path / "b")
    # 6 steps per epoch: evaluations at step 0 (before training), 4, 6 (epoch end), 8, 12 (epoch end, also a
    # multiple of 4).
    assert [h["step"] for h in a.history] == [0, 4, 6, 8, 12]
    assert [h["metrics"] for h in a.history] == [h["metrics"] for h in b.history]
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    best = max(a.history[1:], key=lambda h: h["metrics"]["accuracy"])
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
    assert [h["step"] for h in resumed.history] == [0, 6, 12, 18]  # step 0 evaluated once, before the interruption
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


def test_resume_refuses_a_checkpoint_written_with_fsdp(make_recipe, tmp_path):
    """docs/training.md: a checkpoint written with FSDP (optimizer state keyed by parameter name) resumes only
    with FSDP; a plain run refuses it before touching the model, and leaves the checkpoint in place."""
    cfg = LoopConfig(epochs=1, batch_size=16, seed=2, quiet=True)

    def ctrl_c_at_step_1(info):
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run_loop(make_recipe(seed=2), cfg, run_dir, on_step=ctrl_c_at_step_1)
    state_path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    names = list(state["tensors"])
    assert sorted(state["optimizer"]["state"]) == list(range(len(names)))  # a plain run keys it by position
    state["optimizer"]["state"] = {names[i]: v for i, v in state["optimizer"]["state"].items()}  # as FSDP writes it
    torch.save(state, state_path)
    recipe = make_recipe(seed=2)
    before = _trained(recipe)
    with pytest.raises(ValueError, match=r"checkpoint was written with FSDP; resume it the same way "
                                         r"\(with accelerate's --use_fsdp\)"):
        run_loop(recipe, cfg, run_dir, resume=True)
    assert all(torch.equal(p, before[n]) for n, p in _trained(recipe).items())
    assert state_path.is_file()


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


class _FakeClock:
    """The loop's clock (loop._clock): advances only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _slow_steps(recipe, clock: _FakeClock, seconds: float):
    """Each training step of `recipe` takes `seconds` on `clock` (evaluations take none)."""
    loss = recipe.loss

    def slow(model, batch):
        clock.now += seconds
        return loss(model, batch)

    recipe.loss = slow
    return recipe


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "verakit.train"]


def test_plan_then_estimate_and_no_warning_for_a_short_run(make_recipe, tmp_path, caplog, monkeypatch):
    import logging

    from verakit.train import loop

    clock = _FakeClock()
    monkeypatch.setattr(loop, "_clock", clock)
    recipe = _slow_steps(make_recipe(), clock, 2.0)  # before the capture: loading logs the task's classes
    caplog.set_level(logging.INFO, logger="verakit.train")
    run_loop(recipe, LoopConfig(epochs=2, batch_size=16, eval_every=4, quiet=True), tmp_path)
    lines = _lines(caplog)
    # 96 rows, batch 16: 6 steps per epoch, 12 in all.
    assert lines[0] == ("plan: 96 training rows, 2 epochs x 6 steps of batch 16 = 12 optimizer steps; dev evaluation "
                        "at step 0 and each epoch end and every 4 steps")
    assert lines[1].startswith("eval step 0 (before training): accuracy ")
    # After 5 timed steps of 2 s: 7 steps left (14 s), evaluations at 6, 8 and 12 (0 s each on this clock).
    assert "estimated 24 s in all, 14 s left for 7 more steps (2.00 s/step, 3 evaluations of 0.0 s)" in lines
    assert not any("warning" in line for line in lines)


def test_examples_per_second_counts_training_time_only(make_recipe, tmp_path, monkeypatch):
    """The bar's ex/s: 16 examples per 2 s step = 8/s from the first step on, though the step-0 evaluation
    took 100 s (E2E's 100 generations before training showed 0.2 ex/s where steps ran at 0.5)."""
    from verakit.train import loop

    clock, rates = _FakeClock(), []
    monkeypatch.setattr(loop, "_clock", clock)
    monkeypatch.setattr(loop.Progress, "stepped", lambda self, now, epoch, step, loss, lr, rate, left: rates.append(rate))
    recipe = _slow_steps(make_recipe(), clock, 2.0)
    evaluate = recipe.evaluate

    def slow_evaluate(model):
        clock.now += 100.0
        return evaluate(model)

    recipe.evaluate = slow_evaluate
    run_loop(recipe, LoopConfig(epochs=2, batch_size=16, quiet=True), tmp_path)
    assert rates == [pytest.approx(8.0)] * 12  # after the epoch-end evaluation too


def test_a_cpu_run_over_an_hour_is_warned_about_naming_the_budget_flags(make_recipe, tmp_path, caplog, monkeypatch):
    import logging

    import torch

    from verakit.train import loop

    if torch.cuda.is_available():
        pytest.skip("the warning is for CPU runs")
    clock = _FakeClock()
    monkeypatch.setattr(loop, "_clock", clock)
    caplog.set_level(logging.INFO, logger="verakit.train")
    recipe = _slow_steps(make_recipe(), clock, 1000.0)  # 12 steps of 1000 s: 3.3 h
    run_loop(recipe, LoopConfig(epochs=2, batch_size=16, quiet=True), tmp_path)
    lines = _lines(caplog)
    assert "estimated 3.3 h in all, 1.9 h left for 7 more steps (1000.00 s/step, 2 evaluations of 0.0 s)" in lines
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["warning: this run needs about 3.3 h on this CPU (over an hour); to shrink it, pass "
                        "--max-train-samples N and/or --epochs N (fewer rows per epoch, fewer epochs)"]
    # Without a progress bar (quiet), slow steps still print progress: at most one line a minute.
    assert "step 1/12 (epoch 1/2) loss" in next(line for line in lines if line.startswith("step 1/12"))


def test_step_zero_is_recorded_but_never_saved_as_best(make_recipe, tmp_path, caplog):
    """Step 0 scores the model before any step (VeRA: b = 0, the base model and its fresh head); the best
    checkpoint is the best *trained* evaluation even when step 0 scored higher."""
    import logging

    caplog.set_level(logging.INFO, logger="verakit.train")
    fresh = make_recipe()
    fresh.model.eval()
    before = fresh.evaluate(fresh.model)
    recipe = make_recipe()
    scores, saved = iter([0.9, 0.5, 0.6]), []
    real = recipe.evaluate

    def evaluate(model):
        return {**real(model), "accuracy": next(scores)}

    recipe.evaluate = evaluate
    recipe.save_best = lambda model, run_dir: saved.append(len(saved))
    recipe.baseline = lambda: {"accuracy": 0.5, "f1": 0.6667}
    result = run_loop(recipe, LoopConfig(epochs=2, batch_size=16, quiet=True), tmp_path)
    first = result.history[0]
    assert (first["step"], first["epoch"], first["train_loss"]) == (0, 0.0, None)
    assert {k: v for k, v in first["metrics"].items() if k != "accuracy"} == {
        k: v for k, v in before.items() if k != "accuracy"}
    assert [h["metrics"]["accuracy"] for h in result.history] == [0.9, 0.5, 0.6]
    assert result.best["step"] == 12 and len(saved) == 2  # saved at step 6 (first trained), then 12 (better)
    assert result.baseline == {"accuracy": 0.5, "f1": 0.6667}
    assert any(line.startswith("eval step 0 (before training): accuracy 0.9000") and
               line.endswith("; trivial baseline: accuracy 0.5000 f1 0.6667") for line in _lines(caplog))


def test_evaluation_count_matches_a_brute_force_count():
    from verakit.train.progress import evaluations as _evaluations

    for spe, total_epochs, every in ((6, 3, None), (6, 3, 4), (5, 2, 5), (7, 4, 3), (1, 5, 2)):
        total = spe * total_epochs
        for step in range(total + 1):
            want = sum(1 for s in range(step + 1, total + 1) if s % spe == 0 or (every and s % every == 0))
            assert _evaluations(step, total, spe, every) == want, (spe, total_epochs, every, step)


def test_without_quiet_the_lines_go_above_a_progress_bar_not_to_the_log(make_recipe, tmp_path, caplog, capsys):
    """progress.Progress: with a bar (not quiet) the plan and evaluation lines are written through tqdm (to
    stdout) and the bar's postfix shows epoch, loss, lr and examples per second; nothing goes to the log."""
    import logging

    recipe = make_recipe()  # before the capture: loading logs the task's classes
    caplog.set_level(logging.INFO, logger="verakit.train")
    run_loop(recipe, LoopConfig(epochs=1, batch_size=48, quiet=False), tmp_path)
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == ("plan: 96 training rows, 1 epoch x 2 steps of batch 48 = 2 optimizer steps; "
                                   "dev evaluation at step 0 and each epoch end")
    assert "eval step 0 (before training): accuracy " in out and "eval epoch 1.00 step 2: train_loss " in out
    assert "train: 100%" in err and "epoch 1/1 loss " in err and " ex/s" in err
    assert _lines(caplog) == []

"""The classification recipe's argument resolution (budgets) and its trivial baseline."""

from __future__ import annotations

import pytest

from verakit.train.classify import TrainArgs
from verakit.train.hparams import TASK_BUDGETS

pytestmark = pytest.mark.usefixtures("one_thread")


def _resolved(**kw) -> TrainArgs:
    return TrainArgs(task="sst2", data_dir=None, out="unused", **kw).resolved()


def test_cpu_budget_is_the_default_and_paper_is_one_flag_away():
    cpu, paper = _resolved(), _resolved(budget="paper")
    want = TASK_BUDGETS["cpu"]["sst2"]
    assert (cpu.epochs, cpu.max_train_samples, cpu.lr, cpu.head_lr, cpu.batch_size) == (
        want.epochs, want.max_train_samples, want.vera_lr, want.head_lr, 32)
    # The VeRA paper's SST-2 row (RoBERTa-base): 60 epochs over the whole set, d/b at 4e-3, head 4e-3.
    assert (paper.epochs, paper.max_train_samples, paper.lr, paper.head_lr) == (60, None, 4e-3, 4e-3)
    lora = _resolved(method="lora", budget="paper")
    assert (lora.r, lora.lr, lora.epochs) == (8, 5e-4, 60)


def test_explicit_values_beat_the_budget():
    args = _resolved(budget="paper", epochs=2, max_train_samples=500, lr=3e-2, head_lr=1e-3, batch_size=8)
    assert (args.epochs, args.max_train_samples, args.lr, args.head_lr, args.batch_size) == (2, 500, 3e-2, 1e-3, 8)


def test_unknown_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown budget 'gpu'; choose one of cpu, paper"):
        _resolved(budget="gpu")


def test_cpu_budgets_fit_a_laptop():
    # What "minutes on a CPU" means in rows: at batch 32, no cpu preset exceeds ~1,000 optimizer steps on the
    # GLUE training sets (SST-2 67k, QNLI 105k rows are subsampled; the others are small).
    sizes = {"sst2": 67_349, "mrpc": 3_668, "cola": 8_551, "qnli": 104_743, "rte": 2_490, "stsb": 5_749}
    for task, n in sizes.items():
        b = TASK_BUDGETS["cpu"][task]
        rows = min(n, b.max_train_samples or n)
        assert rows * max(b.epochs, b.lora_epochs) / 32 <= 1_000, task


def test_baseline_is_the_majority_label_of_dev(make_recipe):
    recipe = make_recipe()
    labels = recipe.dev.labels.tolist()
    majority = max(set(labels), key=labels.count)
    want = sum(1 for y in labels if y == majority) / len(labels)
    assert recipe.baseline()["accuracy"] == pytest.approx(want)


"""The classification recipe: argument resolution (budgets), the trivial baseline, the loss (a sum of
each row's own cross-entropy) and evaluation in length-sorted batches."""

from __future__ import annotations

import pytest
import torch

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
    # GLUE training sets (SST-2 67k, QNLI 105k rows are subsampled; the others are small), but CoLA's 1,340:
    # its sentences are short (~11 tokens against MRPC's ~53), so its 5 epochs took 633 s where MRPC's 345
    # steps took 608 s (2026-12-06, one thread each, the same busy CPU; docs/training.md).
    sizes = {"sst2": 67_349, "mrpc": 3_668, "cola": 8_551, "qnli": 104_743, "rte": 2_490, "stsb": 5_749}
    for task, n in sizes.items():
        b = TASK_BUDGETS["cpu"][task]
        rows = min(n, b.max_train_samples or n)
        assert rows * max(b.epochs, b.lora_epochs) / 32 <= (1_400 if task == "cola" else 1_000), task


def test_baseline_is_the_majority_label_of_dev(make_recipe):
    recipe = make_recipe()
    labels = recipe.dev.labels.tolist()
    majority = max(set(labels), key=labels.count)
    want = sum(1 for y in labels if y == majority) / len(labels)
    assert recipe.baseline()["accuracy"] == pytest.approx(want)



def test_loss_is_the_sum_of_each_rows_own_cross_entropy(make_recipe):
    """A padded training batch: the recipe's loss is the *sum* over rows of the cross-entropy each row gets
    alone, unpadded (padding and the attention mask change nothing), and the unit count is the row count."""
    import torch.nn.functional as F

    from helpers import randomize_vectors

    recipe = make_recipe()
    randomize_vectors(recipe.model, seed=3, std=0.3)  # b = 0 would make VeRA a no-op
    recipe.model.eval()
    rows = list(range(8))
    batch = recipe.collate(rows)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1  # rows of different lengths: padded
    with torch.no_grad():
        loss, units = recipe.loss(recipe.model, batch)
        alone = [F.cross_entropy(recipe.model(**{k: v for k, v in recipe.train.batch([i]).items()
                                                 if k != "labels"}).logits, recipe.train.labels[i : i + 1])
                 for i in rows]
    assert units == 8
    torch.testing.assert_close(loss, torch.stack(alone).sum(), rtol=1e-5, atol=1e-6)


def test_evaluation_batches_by_length_and_does_not_depend_on_row_order(make_recipe):
    """evaluate_encoded scores rows in length-sorted batches of EVAL_BATCH (stable among equal lengths): the
    same dev rows in reverse order give the same metrics."""
    from verakit.train.classify import Encoded, evaluate_encoded
    from verakit.train.runner import EVAL_BATCH, length_batches

    recipe = make_recipe()
    model, spec = recipe.model.eval(), recipe.spec
    lengths = recipe.dev.lengths()
    batches = list(length_batches(lengths, EVAL_BATCH))
    assert [i for b in batches for i in b] == sorted(range(len(lengths)), key=lambda i: lengths[i])
    dev = recipe.dev
    reversed_dev = Encoded.__new__(Encoded)
    reversed_dev.keys, reversed_dev.pad_id = dev.keys, dev.pad_id
    reversed_dev.columns = {k: v[::-1] for k, v in dev.columns.items()}
    reversed_dev.labels = dev.labels.flip(0)
    assert evaluate_encoded(model, reversed_dev, spec) == evaluate_encoded(model, dev, spec)

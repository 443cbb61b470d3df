"""Every recipe's defaults in one shape: `defaults(recipe, task, method, budget)` gives each recipe's
table values, and the recipes' resolved arguments are exactly `fill` of them (explicit values win)."""

from __future__ import annotations

import pytest

from verakit.train.causal import CausalArgs
from verakit.train.classify import TrainArgs
from verakit.train.hparams import (
    CAUSAL_BUDGETS,
    CAUSAL_LR,
    IMAGE_DEFAULTS,
    TASK_BUDGETS,
    Defaults,
    defaults,
    fill,
)
from verakit.train.vision import ImageArgs


def test_one_shape_from_each_recipes_table():
    b = TASK_BUDGETS["paper"]["rte"]
    assert defaults("classify", "rte", "lora", "paper") == Defaults(b.lora_epochs, b.lora_lr, b.head_lr, 8, 32, None,
                                                                    group_by_length=True)
    c = CAUSAL_BUDGETS["cpu"]["e2e"]
    assert defaults("causal", "e2e", "vera") == Defaults(c.epochs, CAUSAL_LR["vera"], None, 1024, c.batch_size,
                                                         c.max_train_samples, c.max_eval_samples, c.gen_eval_samples,
                                                         group_by_length=False)
    epochs, lr, head_lr, r = IMAGE_DEFAULTS["vera"]
    assert defaults("images", "images", "vera") == Defaults(epochs, lr, head_lr, r, 32, None)
    with pytest.raises(ValueError, match="unknown recipe 'audio'; choose one of classify, causal, images"):
        defaults("audio", "x", "vera")


@pytest.mark.parametrize("method", ["vera", "lora", "full", "head"])
def test_resolved_arguments_are_the_filled_defaults(method):
    t = TrainArgs(task="mrpc", data_dir=None, out="", method=method, budget="paper").resolved()
    d = defaults("classify", "mrpc", method, "paper")
    assert (t.epochs, t.lr, t.head_lr, t.r, t.batch_size, t.max_train_samples) == (
        d.epochs, d.lr, d.head_lr, d.r, d.batch_size, d.max_train_samples)
    i = ImageArgs(data_dir="", out="", model="m", method=method, lr=0.5).resolved()
    e = defaults("images", "images", method)
    assert (i.epochs, i.lr, i.head_lr, i.r, i.batch_size) == (e.epochs, 0.5, e.head_lr, e.r, e.batch_size)


def test_fill_sets_only_unset_fields_the_arguments_have():
    c = CausalArgs(task="instruct", data_dir="", out="", method="lora", epochs=3)
    d = defaults("causal", "instruct", "lora")
    got = fill(c, d)
    assert (got.epochs, got.lr, got.r, got.gen_eval_samples) == (3, d.lr, d.r, d.gen_eval_samples)
    assert got == c.budgeted() and not hasattr(got, "head_lr")  # CausalArgs has no head: head_lr unused

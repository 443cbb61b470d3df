"""compute_metrics against hand-computed values (each derivation is in the comment above it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from verakit.train.classify.data import TASKS, TaskSpec
from verakit.train.classify.metrics import compute_metrics

# A binary confusion matrix used below: TP=3, TN=4, FP=1, FN=2 (10 examples).
REFS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]


def test_accuracy_sst2() -> None:
    # 7 of 10 right (TP + TN).
    assert compute_metrics(TASKS["sst2"], PREDS, REFS) == {"accuracy": pytest.approx(0.7)}


def test_mrpc_f1_and_accuracy_in_spec_order() -> None:
    # F1 = 2TP / (2TP + FP + FN) = 6 / 9.
    result = compute_metrics(TASKS["mrpc"], PREDS, REFS)
    assert list(result) == ["f1", "accuracy"]
    assert result["f1"] == pytest.approx(6 / 9)
    assert result["accuracy"] == pytest.approx(0.7)


def test_cola_matthews_correlation() -> None:
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(4*5*5*6).
    result = compute_metrics(TASKS["cola"], PREDS, REFS)
    assert result == {"matthews_correlation": pytest.approx(10 / np.sqrt(600))}
    assert result["matthews_correlation"] == pytest.approx(0.4082482904638631)


def test_stsb_pearson_and_spearman() -> None:
    # preds - mean = (-1.5, -.5, .5, 1.5), refs - mean = (-1.75, -.75, .25, 2.25):
    # r = 6.5 / sqrt(5 * 8.75). The ranks agree exactly, so rho = 1.
    result = compute_metrics(TASKS["stsb"], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    assert list(result) == ["pearson", "spearmanr"]
    assert result["pearson"] == pytest.approx(6.5 / np.sqrt(43.75))
    assert result["spearmanr"] == pytest.approx(1.0)


def test_spearman_with_a_swap() -> None:
    # rank differences (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8.
    result = compute_metrics(TASKS["stsb"], [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert result["spearmanr"] == pytest.approx(0.8)
    assert result["pearson"] == pytest.approx(0.8)  # equally spaced values: r equals rho here


def test_macro_f1_for_user_tasks() -> None:
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 4/5, class 2: 2/3.
    spec = TaskSpec("csv", ("a", "b", "c"), False, ("accuracy", "macro_f1"), "accuracy")
    result = compute_metrics(spec, [0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_constant_predictions_score_zero_without_nan_or_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stsb = compute_metrics(TASKS["stsb"], [2.5, 2.5, 2.5], [1.0, 2.0, 4.0])
        stsb_constant_refs = compute_metrics(TASKS["stsb"], [1.0, 2.0, 4.0], [3.0, 3.0, 3.0])
        single = compute_metrics(TASKS["stsb"], [1.0], [2.0])
        cola = compute_metrics(TASKS["cola"], [1, 1, 1, 1], [0, 1, 0, 1])
        mrpc = compute_metrics(TASKS["mrpc"], [0, 0, 0, 0], [0, 1, 0, 1])
    assert stsb == {"pearson": 0.0, "spearmanr": 0.0}
    assert stsb_constant_refs == {"pearson": 0.0, "spearmanr": 0.0}
    assert single == {"pearson": 0.0, "spearmanr": 0.0}
    assert cola == {"matthews_correlation": 0.0}
    assert mrpc == {"f1": 0.0, "accuracy": 0.5}


def test_logits_and_column_shapes() -> None:
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-3.0, 4.0], [1.0, 0.0]])  # argmax: 0, 1, 1, 0
    assert compute_metrics(TASKS["sst2"], logits, [0, 1, 0, 0]) == {"accuracy": pytest.approx(0.75)}
    column = np.array([[1.0], [2.0], [3.0], [4.0]])  # a regression head's (N, 1) output
    assert compute_metrics(TASKS["stsb"], column, [1.0, 2.0, 3.0, 5.0])["pearson"] == pytest.approx(
        6.5 / np.sqrt(43.75)
    )


def test_results_are_python_floats() -> None:
    for name in ("sst2", "mrpc", "cola"):
        assert all(type(v) is float for v in compute_metrics(TASKS[name], PREDS, REFS).values())
    assert all(type(v) is float for v in compute_metrics(TASKS["stsb"], [1, 2, 3], [1, 3, 2]).values())


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="do not match"):
        compute_metrics(TASKS["sst2"], [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(TASKS["sst2"], [], [])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(TaskSpec("x", ("a", "b"), False, ("bleu",), "bleu"), [0], [0])


def test_trivial_baseline_is_the_majority_class_or_the_mean() -> None:
    from verakit.train.classify.metrics import trivial_baseline

    refs = [1, 1, 1, 0, 0]  # majority class 1: accuracy 3/5; always-1 has P = 3/5, R = 1, F1 = 2PR/(P+R) = 3/4
    assert trivial_baseline(TASKS["mrpc"], refs) == {"f1": pytest.approx(0.75), "accuracy": pytest.approx(0.6)}
    assert trivial_baseline(TASKS["cola"], refs) == {"matthews_correlation": 0.0}
    # Majority class 0: always-0 never predicts the positive class, F1 0; a tie picks the lowest id (0).
    assert trivial_baseline(TASKS["mrpc"], [0, 0, 1]) == {"f1": 0.0, "accuracy": pytest.approx(2 / 3)}
    assert trivial_baseline(TASKS["sst2"], [1, 0, 1, 0]) == {"accuracy": 0.5}
    assert trivial_baseline(TASKS["stsb"], [0.5, 2.0, 4.5]) == {"pearson": 0.0, "spearmanr": 0.0}
    qnli = trivial_baseline(TASKS["qnli"], np.array([0, 1, 1, 1]))
    assert qnli == {"accuracy": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="trivial_baseline\\('sst2'\\): references must be a non-empty"):
        trivial_baseline(TASKS["sst2"], [])

"""GLUE metrics: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

Semantics: ``compute_metrics(spec, predictions, references)`` returns ``{name: value}`` for each
name in ``spec.metric_names``, with GLUE's definitions: ``f1`` is binary F1 of class 1 (MRPC's
"equivalent"), ``macro_f1`` the unweighted mean over classes, correlations are Pearson's r and
Spearman's rho between predicted and reference scores.

``trivial_baseline(spec, references)`` is ``compute_metrics`` of the best constant prediction one can
read off the references: the most frequent class (the lowest id on a tie), or the mean score for
regression. It is the floor a trained model must clear: accuracy = the majority share, F1 of always
predicting that class, Matthews and both correlations 0.

scikit-learn and scipy are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tasks import TaskSpec

__all__ = ["METRIC_NAMES", "compute_metrics", "trivial_baseline"]

METRIC_NAMES = ("accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearmanr")


def compute_metrics(
    spec: TaskSpec,
    predictions: Sequence[int] | Sequence[float] | np.ndarray,
    references: Sequence[int] | Sequence[float] | np.ndarray,
) -> dict[str, float]:
    """Score ``predictions`` against ``references`` with the metrics of ``spec``.

    predictions: class ids ``(N,)`` or class scores/logits ``(N, num_labels)`` (argmax is taken)
    for classification; scores ``(N,)`` or ``(N, 1)`` for regression. references: ``(N,)``.
    """
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.ndim == 2:
        # (N, num_labels) logits -> (N,) ids; a regression head's (N, 1) -> (N,)
        preds = preds[:, 0] if spec.is_regression and preds.shape[1] == 1 else preds.argmax(axis=-1)
    if preds.ndim != 1 or refs.ndim != 1 or len(preds) != len(refs):
        raise ValueError(
            f"compute_metrics({spec.name!r}): predictions of shape {preds.shape} do not match "
            f"references of shape {refs.shape}; expected (N,) and (N,)"
        )
    if len(refs) == 0:
        raise ValueError(f"compute_metrics({spec.name!r}): no predictions to score")
    unknown = [name for name in spec.metric_names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"TaskSpec {spec.name!r}: unknown metric(s) {unknown}; known: {METRIC_NAMES}")
    if spec.is_regression:
        preds, refs = preds.astype(np.float64), refs.astype(np.float64)
    return {name: _metric(name, preds, refs) for name in spec.metric_names}


def trivial_baseline(spec: TaskSpec, references: Sequence[int] | Sequence[float] | np.ndarray) -> dict[str, float]:
    """``compute_metrics`` of always predicting the most frequent reference class (regression: the mean
    reference score), on ``references`` (N,): the score of a model that learned nothing about the input."""
    refs = np.asarray(references)
    if refs.ndim != 1 or len(refs) == 0:
        raise ValueError(f"trivial_baseline({spec.name!r}): references must be a non-empty (N,) array, "
                         f"got shape {refs.shape}")
    if spec.is_regression:
        constant = np.full(len(refs), refs.astype(np.float64).mean())
    else:
        values, counts = np.unique(refs, return_counts=True)  # sorted values: argmax picks the lowest on a tie
        constant = np.full(len(refs), values[counts.argmax()])
    return compute_metrics(spec, constant, refs)


def _metric(name: str, preds: np.ndarray, refs: np.ndarray) -> float:
    if name in ("pearson", "spearmanr"):
        return _correlation(name, preds, refs)
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if name == "accuracy":
        return float(accuracy_score(refs, preds))
    if name == "f1":
        # zero_division=0: no predicted and no true positives scores 0, not a warning and NaN.
        return float(f1_score(refs, preds, pos_label=1, average="binary", zero_division=0))
    if name == "macro_f1":
        return float(f1_score(refs, preds, average="macro", zero_division=0))
    # Matthews correlation is 0.0 by sklearn's convention when either side is constant.
    return float(matthews_corrcoef(refs, preds))


def _correlation(name: str, preds: np.ndarray, refs: np.ndarray) -> float:
    # A correlation with a constant series is undefined (0/0): scipy warns and returns NaN. A model
    # that predicts one score for everything has learned nothing, so report 0.0 (as matthews_corrcoef
    # does) and keep NaN out of "best checkpoint" comparisons.
    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(refs) == 0:
        return 0.0
    from scipy.stats import pearsonr, spearmanr

    stat = pearsonr(preds, refs)[0] if name == "pearson" else spearmanr(preds, refs)[0]
    return float(stat)

"""What a GLUE-style classification or regression task is: its TaskSpec (labels, metrics), its Examples,
and DataError (train/errors.py), the error of every data loader. stdlib only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import DataError

__all__ = ["ENTAILMENT", "REGRESSION_METRICS", "TASKS", "DataError", "Example", "TaskData", "TaskSpec"]


@dataclass(frozen=True, slots=True)  # slots: SST-2 alone is 67k of these
class Example:
    text: str  # first (or only) sentence, verbatim from the file
    text_pair: str | None  # second sentence of pair tasks (MRPC, RTE, STS-B, QNLI), else None
    label: int | float  # class id in [0, num_labels), or the score for regression
    group: str | None = None  # value of the optional group column, for per-group training


@dataclass(frozen=True)
class TaskSpec:
    name: str  # key in TASKS, e.g. "sst2"
    label_names: tuple[str, ...]  # index = class id; empty for regression
    is_regression: bool
    metric_names: tuple[str, ...]  # what compute_metrics reports, in this order
    main_metric: str  # the one used for model selection; one of metric_names

    def __post_init__(self) -> None:
        if self.main_metric not in self.metric_names:
            raise ValueError(
                f"TaskSpec {self.name!r}: main_metric {self.main_metric!r} is not in {self.metric_names}"
            )
        if self.is_regression and self.label_names:
            raise ValueError(f"TaskSpec {self.name!r}: a regression task has no label_names")

    @property
    def num_labels(self) -> int:
        """Width of the model head: 1 for regression."""
        return 1 if self.is_regression else len(self.label_names)


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    train: tuple[Example, ...]
    dev: tuple[Example, ...]


ENTAILMENT = ("entailment", "not_entailment")  # GLUE / Hugging Face order: entailment = 0
REGRESSION_METRICS = ("pearson", "spearmanr")  # STS-B's, and the csv task's when its labels are scores

TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        "sst2": TaskSpec("sst2", ("negative", "positive"), False, ("accuracy",), "accuracy"),
        "mrpc": TaskSpec("mrpc", ("not_equivalent", "equivalent"), False, ("f1", "accuracy"), "f1"),
        "rte": TaskSpec("rte", ENTAILMENT, False, ("accuracy",), "accuracy"),
        "cola": TaskSpec(
            "cola", ("unacceptable", "acceptable"), False, ("matthews_correlation",), "matthews_correlation"
        ),
        "stsb": TaskSpec("stsb", (), True, REGRESSION_METRICS, "pearson"),
        "qnli": TaskSpec("qnli", ENTAILMENT, False, ("accuracy",), "accuracy"),
        # A template: load_task fills label_names / is_regression from the user's train file, and
        # switches to pearson/spearmanr for regression. macro F1 because classes may be many.
        "csv": TaskSpec("csv", (), False, ("accuracy", "macro_f1"), "accuracy"),
    }
)

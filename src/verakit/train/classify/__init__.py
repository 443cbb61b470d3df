"""Sequence classification and regression (GLUE tasks, the user's csv): `verakit train --task sst2|...|csv`
and `verakit eval`.

    recipe.py    TrainArgs, the model and its head, ClassificationRecipe, train_classifier, evaluate_classifier
    data.py      load_task: GLUE folders (rows.py reads delimited files) and the user's csv (userdata.py)
    tasks.py     TaskSpec, Example (stdlib only)
    metrics.py   GLUE metrics and the trivial baseline

Imports the shared layer of verakit.train only. Names resolve on first access (tasks.py stays stdlib only).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "ADAPTER_COMPUTE_DTYPES": "recipe",
    "DEFAULT_HEAD": "recipe",
    "ClassificationRecipe": "recipe",
    "Encoded": "recipe",
    "TrainArgs": "recipe",
    "build_classifier": "recipe",
    "build_classifier_checked": "recipe",
    "evaluate_classifier": "recipe",
    "evaluate_encoded": "recipe",
    "resolve_head": "recipe",
    "train_classifier": "recipe",
    "TASKS": "data",
    "TaskSpec": "tasks",
    "Example": "tasks",
    "load_task": "data",
    "compute_metrics": "metrics",
    "trivial_baseline": "metrics",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Training recipes for VeRA adapters: data loading, metrics, classification and causal-LM loops, reports.

Heavy dependencies (transformers, scikit-learn, scipy, datasets) are imported lazily inside the
submodules that need them, so importing this package stays cheap.

Classification (`verakit train` / `verakit eval`):
    from verakit.train.classify import TrainArgs, train_classifier, evaluate_classifier
Image classification (`verakit train --task images`, docs/vision.md):
    from verakit.train.vision import ImageArgs, train_images, evaluate_images
Hyperparameter search over classification runs (`verakit tune`, docs/tuning.md; the function is
not re-exported here because the submodule has its name):
    from verakit.train.tune import TuneArgs, SearchDim, tune
The generic loop, for other recipes (causal LM, images):
    from verakit.train.loop import Recipe, ParamGroup, LoopConfig, run_loop
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TrainArgs",
    "train_classifier",
    "evaluate_classifier",
    "LoopConfig",
    "ParamGroup",
    "Recipe",
    "TrainingInterrupted",
    "run_loop",
    "METHODS",
    "ImageArgs",
    "train_images",
    "evaluate_images",
    "TuneArgs",
    "SearchDim",
]

# name -> submodule; resolved on first access (PEP 562) so `import verakit.train` imports nothing heavy.
_EXPORTS = {
    "TrainArgs": "classify",
    "train_classifier": "classify",
    "evaluate_classifier": "classify",
    "LoopConfig": "loop",
    "ParamGroup": "loop",
    "Recipe": "loop",
    "TrainingInterrupted": "loop",
    "run_loop": "loop",
    "METHODS": "methods",
    "ImageArgs": "vision",
    "train_images": "vision",
    "evaluate_images": "vision",
    "TuneArgs": "tune",
    "SearchDim": "tune",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'verakit.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

"""Training recipes for VeRA adapters.

The tree shows the recipes. The shared layer, which every recipe imports and which imports no recipe:
    loop.py (the training loop), checkpoint.py, fsdp.py, progress.py, rundir.py (RUN_DIR, config.json,
    metrics.json), report.py, methods.py (vera/lora/full/head/peft-vera: model preparation), artifacts.py (saving and
    loading what each method trained),
    hparams.py (every recipe's default hyperparameters), runner.py (the train and evaluate skeletons
    every recipe runs), errors.py.
One sub-package per recipe, importing only the shared layer (grouped and tune also use classify):
    classify/  sequence classification and regression: `verakit train --task sst2|...|csv`, `verakit eval`
    causal/    causal LMs (e2e, instruct, jsonl) and text generation: `verakit train --task e2e`, `verakit generate`
    vision/    image classification: `verakit train --task images`
    grouped/   one VeRA adapter per group of rows in one run: `verakit train --group-column`
    tune/      Optuna search over classification runs: `verakit tune`
A new recipe is a new sub-package that builds its Recipe (loop.Recipe) and calls runner.py.

Heavy dependencies (transformers, scikit-learn, scipy, datasets) are imported lazily inside the
modules that need them, and the names below resolve on first access, so importing this package stays cheap:
    from verakit.train import TrainArgs, train_classifier, evaluate_classifier
    from verakit.train.causal import CausalArgs, train_causal, evaluate_causal
    from verakit.train.vision import ImageArgs, train_images, evaluate_images
    from verakit.train.tune import TuneArgs, SearchDim, tune
    from verakit.train.loop import Recipe, ParamGroup, LoopConfig, run_loop
"""

from __future__ import annotations

from .lazy import lazy_exports

# name -> submodule; resolved on first access (PEP 562) so `import verakit.train` imports nothing heavy.
_EXPORTS = {
    "TrainArgs": "classify.recipe",
    "train_classifier": "classify.recipe",
    "evaluate_classifier": "classify.recipe",
    "LoopConfig": "loop",
    "ParamGroup": "loop",
    "Recipe": "loop",
    "TrainingInterrupted": "loop",
    "run_loop": "loop",
    "METHODS": "methods",
    "ImageArgs": "vision.recipe",
    "train_images": "vision.recipe",
    "evaluate_images": "vision.recipe",
    "TuneArgs": "tune.search",
    "SearchDim": "tune.search",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

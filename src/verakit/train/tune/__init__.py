"""Hyperparameter search (Optuna) over classification runs: `verakit tune` (docs/tuning.md).

    search.py    SearchDim, TuneArgs, the search space, tune
    progress.py  the lines logged as trials start and end
    report.py    report.md, importance.png, summary.json

Imports the shared layer of verakit.train and the classification recipe. Names resolve on first access.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "PRUNERS": "search",
    "TUNABLE": "search",
    "SearchDim": "search",
    "SpaceError": "search",
    "TuneArgs": "search",
    "TuneInterrupted": "search",
    "default_space": "search",
    "load_space": "search",
    "parse_dim": "search",
    "tune": "search",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

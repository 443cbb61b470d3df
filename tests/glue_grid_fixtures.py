"""Fixtures shared by the GLUE grid's tests (tests/test_glue_grid*.py): the experiments' modules, loaded
as the grid loads them, and fake finished cells (RUN_DIRs holding only metrics.json)."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import load_experiment

__all__ = ["fake_carve", "grid", "gtime", "rep", "write_metrics"]


@pytest.fixture(scope="module")
def grid():
    yield load_experiment("glue_grid")
    sys.modules.pop("glue_grid", None)


@pytest.fixture(scope="module")
def rep(grid):
    """experiments/glue_grid_report.py, importing the `grid` fixture's module (its experiments/ is on sys.path)."""
    import glue_grid_report

    yield glue_grid_report
    sys.modules.pop("glue_grid_report", None)


@pytest.fixture(scope="module")
def gtime(grid):
    """experiments/glue_grid_time.py (wall time: estimates, pauses, --until), on the `grid` fixture's module."""
    import glue_grid_time

    yield glue_grid_time
    sys.modules.pop("glue_grid_time", None)


@pytest.fixture
def fake_carve(grid, monkeypatch, tmp_path):
    """carve() without reading GLUE: the sweep commands only need its folder name."""
    monkeypatch.setattr(grid, "carve", lambda task, root: root / "data" / grid.FOLDERS[task])


def write_metrics(grid, cell, head, root, score, *, main="accuracy", seconds=100.0, params=1000, file_bytes=5000,
                   baseline=0.5):
    out = grid.run_dir(cell, head, root)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({
        "task": cell.task, "main_metric": main, "metric": {main: score, "f1": score / 2},
        "baseline": {main: baseline, "f1": 0.25}, "best_epoch": 1.0, "trainable_params": params, "head_params": 770, "adapter_bytes": file_bytes, "train_seconds": seconds,
        "epochs": [{"metrics": {main: baseline}}, {"metrics": {main: round(score - 0.01, 6)}}]}))  # best, then last

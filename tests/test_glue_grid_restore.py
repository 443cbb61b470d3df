"""experiments/glue_grid_restore.py: the committed docs/results.json rebuilt into a grid root on a new
machine reports back unchanged, and `run` resumes at the first cell it lacks. Nothing trains."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from helpers import load_experiment

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results.json"


@pytest.fixture(scope="module")
def grid():
    module = load_experiment("glue_grid")
    import glue_grid_report
    import glue_grid_restore

    yield module, glue_grid_restore, glue_grid_report
    for name in ("glue_grid", "glue_grid_report", "glue_grid_restore"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def records():
    return json.loads(RESULTS.read_text())


def _defaults(grid):
    return list(grid.METHODS), list(grid.FOLDERS), list(grid.SEEDS)


def test_committed_results_round_trip(grid, records, tmp_path):
    g, restore, report = grid
    assert len(restore.restore(records, tmp_path, "t")) == len(records)
    back = report.collect(*_defaults(g), "vera", tmp_path)
    assert back == [{**r, "cpu": r.get("cpu")} for r in records]  # records before the "cpu" field: None
    assert any(r["paused_seconds"] > 0 for r in records)  # the case the next test breaks


def test_paused_seconds_need_their_field(grid, records, tmp_path):
    g, restore, report = grid
    restore.restore(records, tmp_path, "t")
    paused = next(r for r in records if r["paused_seconds"] > 0)
    cell = restore._cell(paused)
    path = g.run_dir(cell, "vera", tmp_path) / "metrics.json"
    m = json.loads(path.read_text())
    del m["grid_paused_seconds"]
    path.write_text(json.dumps(m))
    back = {(r["stage"], r["task"], r["method"], r["seed"], r["lr"]): r
            for r in report.collect(*_defaults(g), "vera", tmp_path)}
    got = back[(paused["stage"], paused["task"], paused["method"], paused["seed"], paused["lr"])]
    assert got["train_seconds"] == pytest.approx(paused["train_seconds"] + paused["paused_seconds"])


def test_run_resumes_at_the_first_missing_cell(grid, records, tmp_path):
    g, restore, _ = grid
    # the committed grid is complete: leave two seeds cells out, as a machine lost mid-grid would
    seeds_records = [r for r in records if r["stage"] == "seeds"]
    lost = [seeds_records[len(seeds_records) // 2], seeds_records[-1]]
    restore.restore([r for r in records if r not in lost], tmp_path, "t")
    methods, tasks, seeds = _defaults(g)
    assert all(g.read_metrics(c, "vera", tmp_path) for c in g.sweep_cells(methods, "vera", tmp_path))
    cells = g.seed_cells(methods, tasks, seeds, "vera", tmp_path)
    done = {(r["task"], r["method"], r["seed"]) for r in records if r["stage"] == "seeds" and r not in lost}
    todo = [c for c in cells if g.read_metrics(c, "vera", tmp_path) is None]
    assert len(todo) == len(cells) - len(done) >= len(lost)
    assert todo[0] == next(c for c in cells if (c.task, c.method, c.seed) not in done)
    assert {(r["task"], r["method"], r["seed"]) for r in lost} <= {(c.task, c.method, c.seed) for c in todo}
    # the chosen rates are those the committed seeds cells ran at
    for r in records:
        if r["stage"] == "seeds":
            assert float(g.choose_lr(r["method"], "vera", tmp_path)) == r["lr"]


def test_measured_cells_are_kept(grid, records, tmp_path):
    g, restore, _ = grid
    cell = restore._cell(records[0])
    out = g.run_dir(cell, "vera", tmp_path)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"measured": "here"}')
    written = restore.restore(records, tmp_path, "t")
    assert out not in written and len(written) == len(records) - 1
    assert json.loads((out / "metrics.json").read_text()) == {"measured": "here"}


def test_a_record_that_cannot_round_trip_is_named(grid, records, tmp_path):
    g, restore, _ = grid
    bad = [dict(r) for r in records]
    bad[3]["lr"] = bad[3]["lr"] * 10  # its RUN_DIR's name says otherwise
    with pytest.raises(SystemExit, match=rf"record 3 \(sweep {bad[3]['task']} {bad[3]['method']} seed 0\).*lr"):
        restore.check(bad, *_defaults(g), "vera")
    restore.check(records, *_defaults(g), "vera")
    assert not any(tmp_path.iterdir())


def test_processors_round_trip_and_are_counted(grid, records, tmp_path):
    g, restore, report = grid
    marked = [{**r, "cpu": None} for r in records]
    seeds = [r for r in marked if r["stage"] == "seeds"]
    seeds[0]["cpu"] = "Some CPU (AVX-512 BF16)"  # its task and seed have other methods' cells
    restore.check(marked, *_defaults(g), "vera")
    restore.restore(marked, tmp_path, "t")
    back = report.collect(*_defaults(g), "vera", tmp_path)
    assert [r["cpu"] for r in back].count("Some CPU (AVX-512 BF16)") == 1
    line = report.machines_line(back)
    assert f"{len(records) - 1} cells on the first machine" in line and "; 1 cells on Some CPU (AVX-512 BF16)." in line
    for (t, m, s), v in report.RERUN.items():
        first = next(r for r in records if (r["stage"], r["task"], r["method"], r["seed"]) == ("seeds", t, m, s))
        assert f"{t} {m} seed {s} {100 * first['value']:.2f} -> {100 * v:.2f}" in line
    last = seeds[0]
    mixed = {r["cpu"] for r in seeds if (r["task"], r["seed"]) == (last["task"], last["seed"])}
    assert len(mixed) == 2 and f"more than one: {last['task']} seed {last['seed']} (their paired" in line


def test_committed_grid_reads_complete(grid, records, tmp_path):
    g, restore, report = grid
    restore.restore(records, tmp_path, "t")
    methods, tasks, seeds = _defaults(g)
    line = report.progress_line(records, methods, tasks, seeds, "vera", tmp_path)
    assert line == "Cells measured: sweep 62/62, seeds 105/105 (complete, every cell at 3 seeds)."
    assert report.progress_line(records[:-1], methods, tasks, seeds, "vera", tmp_path).endswith(
        "seeds 104/105 (**partial**; `python experiments/glue_grid.py status` for the rest).")


def test_readme_quality_figures_are_the_committed_grids(grid, records):
    """README's "Quality, measured here" paragraph quotes the grid: its figures must move with results.json."""
    g, _, report = grid
    by = report._seeds_by_cell(records)
    tasks = list(g.FOLDERS)

    def mean_gap(method: str, against: str = "lora-8") -> float:
        return sum(statistics.mean(report._paired(by, t, method, against)) for t in tasks) / len(tasks)

    def kb(method: str) -> int:
        return round(by[("sst2", method)][0]["file_bytes"] / 1000)

    readme = " ".join((REPO / "README.md").read_text().split())
    params = by[("sst2", "lora-8")][0]["adapter_params"] / by[("sst2", "vera-256")][0]["adapter_params"]
    assert (f"VeRA r=256 files are {kb('vera-256')} KB against PEFT LoRA r=8's {kb('lora-8')} KB "
            f"({params:.1f}x fewer adapter parameters) and score {-mean_gap('vera-256'):.1f} points below LoRA") in readme
    assert f"CoLA MCC {statistics.mean(report._paired(by, 'cola', 'vera-256', 'lora-8')):.1f} is the largest gap" in readme
    assert f"r=1024 ({kb('vera-1024')} KB) is {-mean_gap('vera-1024'):.1f} points below" in readme
    assert f"DVoRA r=1024 (`--magnitude`, {kb('dvora-1024')} KB) {-mean_gap('dvora-1024'):.1f} below" in readme
    assert abs(mean_gap("vera-256", "peft-vera-256")) < 0.5 and abs(mean_gap("vera-1024", "peft-vera-1024")) < 0.5

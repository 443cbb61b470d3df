"""experiments/glue_grid_time.py: status's estimates, run --until, and paused time left out of wall
times, on fake RUN_DIRs. Nothing trains."""

from __future__ import annotations

import os

import pytest

from glue_grid_fixtures import write_metrics  # the fixtures: tests/conftest.py's pytest_plugins


def test_status_counts_and_estimates(grid, gtime, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gtime, "_train_rows", lambda task: 1000)
    monkeypatch.setattr(gtime, "_row_chars", lambda task: {"sst2": 50.0, "mrpc": 250.0, "rte": 340.0}[task])
    for t in ("sst2", "mrpc"):
        for lr in grid.lrs("lora-8", "vera"):
            score = 0.8 if lr == "2e-3" else 0.7  # an inside best: the edge rule adds no rate
            write_metrics(grid, grid.Cell("sweep", t, "lora-8", 0, lr), "vera", tmp_path, score, seconds=600.0)
    grid.main(["status", "--root", str(tmp_path), "--methods", "lora-8", "--tasks", "rte", "--seeds", "0", "1"])
    out = capsys.readouterr().out
    assert "sweep: 8/8 done; seeds: 0/2 done (0 wait" in out
    # measured per character: sst2 600 s / (20,000 rows x 50), mrpc 600 s / (600 rows x 10 epochs x 250); the
    # lora-8 median of the 8 cells (4 of each) is the mean of the two rates; left: 2 rte cells x 1000 rows x
    # 20 epochs x 340 characters, 2 at a time.
    rate = (600 / 1_000_000 + 600 / 1_500_000) / 2
    assert f"left: 2 cells, about {2 * 20_000 * 340 * rate / 2 / 3600:.1f} h at 2 at a time " \
           f"({2 * 20_000 * 340 * 600 / 1_500_000 / 2 / 3600:.1f} h at each method's fastest" in out


def test_run_until_starts_only_cells_that_end_in_time(grid, gtime, tmp_path, monkeypatch, capsys):
    """--until: a cell starts only if now + its median estimate is before the deadline, judged when its turn
    comes; the others are left for the next run. MRPC (1 epoch here) is short, RTE x 20 epochs is not."""
    started, clock = [], [1000.0]

    class FakeProc:
        returncode = 0

        def __init__(self, argv, stdout, stderr, env, start_new_session):
            started.append(argv[argv.index("--task") + 1])

        def poll(self):
            return 0

    def sleep(seconds):
        clock[0] += 100  # each wait: the started cells finish and 100 s pass

    monkeypatch.setattr(grid.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(grid.time, "sleep", sleep)
    monkeypatch.setattr(grid.time, "time", lambda: clock[0])
    done = [(grid.Cell("sweep", "sst2", "lora-8", 0, "2e-3"), {"train_seconds": 10.0})]  # 0.01 s per row-epoch
    cells = [grid.Cell("seeds", t, "lora-8", s, "2e-3") for t, s in (("mrpc", 0), ("rte", 0), ("mrpc", 1), ("stsb", 0))]
    work = {"mrpc": 1, "rte": 20, "stsb": 10}  # epochs: the estimate is 10 s x epochs
    monkeypatch.setattr(gtime, "_work", lambda cell: 1000 * work[cell.task] if cell.stage == "seeds" else 1000)
    fits = lambda cell: grid.time.time() + gtime.estimate(done, [cell], 1) <= 1000 + 150  # noqa: E731
    grid.run_cells(cells, "vera", tmp_path, jobs=1, fits=fits)
    # mrpc (10 s) starts at 1000; rte (200 s) does not fit; mrpc again at 1100; stsb (100 s) no longer fits at 1200
    assert started == ["mrpc", "mrpc"]
    assert "2 cells would end after --until, left for the next run" in capsys.readouterr().out
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    if now.hour > 0:
        with pytest.raises(SystemExit, match=rf"--until {now.hour - 1:02d}:00 UTC has passed"):
            gtime.deadline_fits(f"{now.hour - 1:02d}:00", "vera", tmp_path, cells)
    if now.hour < 23:
        assert gtime.deadline_fits("23:59", "vera", tmp_path, cells)(cells[0])  # nothing measured: 0.5 s per step


def test_paused_time_is_taken_out_of_wall_times(grid, gtime, rep, tmp_path, capsys, fake_carve):
    """Seconds the grid was SIGSTOPped (ROOT/pauses.log) inside a cell's run leave its train_seconds."""

    root = tmp_path / "runs"
    cell = grid.Cell("sweep", "sst2", "lora-8", 0, "1e-3")
    write_metrics(grid, cell, "vera", root, 0.8, seconds=1000.0)
    out = grid.run_dir(cell, "vera", root)
    (out.parent / f"{cell.name}.cmd").write_text("verakit train ...\n")
    os.utime(out.parent / f"{cell.name}.cmd", (1000.0, 1000.0))  # started at t=1000, finished at t=2100
    os.utime(out / "metrics.json", (2100.0, 2100.0))
    # 300 s inside the run, 50 s of a stop that began before it, and one before it
    (root / "pauses.log").write_text("STOP 1200\nCONT 1500\nSTOP 950\nCONT 1050\nSTOP 10\nCONT 20\n")
    assert gtime.pauses(root) == [(1200.0, 1500.0), (950.0, 1050.0), (10.0, 20.0)]
    m = grid.read_metrics(cell, "vera", root)
    assert gtime.running_seconds(cell, "vera", root, m, gtime.pauses(root)) == 650.0
    record = rep.cell_record(cell, "vera", root, m, gtime.pauses(root))
    assert (record["train_seconds"], record["paused_seconds"]) == (650.0, 350.0)
    assert gtime.running_seconds(cell, "vera", root, m, []) == 1000.0

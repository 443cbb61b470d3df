"""Wall time of the GLUE grid (experiments/glue_grid.py): what a cell's time is proportional to, the pauses
left out of cells' seconds (ROOT/pauses.log), estimates from the finished cells (`glue_grid.py status`) and
run --until's deadline."""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from default_sweep import HOLD
from glue_grid import (
    BATCH,
    EPOCHS,
    FOLDERS,
    GLUE,
    PENDING,
    SWEEP,
    Cell,
    read_metrics,
    run_dir,
    seed_cells,
    sweep_cells,
)

__all__ = ["deadline_fits", "estimate", "measured", "pauses", "running_seconds", "status"]


def _rows(cell: Cell) -> int:
    """Training rows x epochs of a cell."""
    if cell.stage == "sweep":
        rows, epochs = SWEEP[cell.task]
        if rows is None:
            rows = _train_rows(cell.task) - HOLD[cell.task]
        return rows * epochs
    return _train_rows(cell.task) * EPOCHS[cell.task]


def _train_rows(task: str) -> int:
    with open(GLUE / FOLDERS[task] / "train.tsv", "rb") as f:
        return sum(1 for _ in f) - 1


@functools.cache
def _row_chars(task: str) -> float:
    """Mean characters of a train.tsv line: a proxy for a row's tokens (RTE's ~340 against SST-2's ~55)."""
    with open(GLUE / FOLDERS[task] / "train.tsv", "rb") as f:
        sizes = [len(line) for line in f][1:]
    return sum(sizes) / max(len(sizes), 1)


def _work(cell: Cell) -> float:
    """What a cell's time is proportional to: training rows x epochs x characters per row (length-grouped
    batches pad little, so a step costs about its tokens; the sweep's SST-2 and MRPC cells agree within ~15%)."""
    return _rows(cell) * _row_chars(cell.task)


def pauses(root: Path) -> list[tuple[float, float]]:
    """(stop, cont) unix times from ROOT/pauses.log, whose lines "STOP t" / "CONT t" are appended by whoever
    SIGSTOPs the grid (e.g. to give a test suite quiet cores); a stop without its cont lasts until now."""
    path, out, stop = root / "pauses.log", [], None
    for line in path.read_text().splitlines() if path.is_file() else []:
        kind, _, when = line.partition(" ")
        if kind == "STOP":
            stop = float(when)
        elif kind == "CONT" and stop is not None:
            out.append((stop, float(when)))
            stop = None
    return out + ([(stop, time.time())] if stop is not None else [])


def running_seconds(cell: Cell, head: str, root: Path, m: dict, stops: list[tuple[float, float]]) -> float:
    """The cell's train_seconds less the `stops` inside its run (NAME.cmd is written at its start,
    metrics.json at its end)."""
    out = run_dir(cell, head, root)
    if "grid_paused_seconds" in m:  # restored from results.json: paused where it ran (glue_grid_restore)
        return float(m["train_seconds"]) - float(m["grid_paused_seconds"])
    cmd, metrics = out.parent / f"{cell.name}.cmd", out / "metrics.json"
    if not stops or not cmd.is_file():
        return float(m["train_seconds"])
    start, end = cmd.stat().st_mtime, metrics.stat().st_mtime
    paused = sum(max(0.0, min(end, b) - max(start, a)) for a, b in stops)
    return max(0.0, float(m["train_seconds"]) - paused)


def estimate(done: list[tuple[Cell, dict]], left: list[Cell], jobs: int, pick=statistics.median) -> float:
    """Wall seconds for `left` at `jobs` at a time: each method's measured seconds per unit of `_work`, reduced
    by `pick` (median; `min` for a quiet machine: cells that shared the CPU with other work ran up to 5x
    slower), every method's rates where a method has none yet, 0.5 s per 32-row step of 50 characters
    before any cell finished."""
    rates: dict[str, list[float]] = {}
    for cell, m in done:
        rates.setdefault(cell.method, []).append(m["train_seconds"] / _work(cell))
    every = [r for rs in rates.values() for r in rs] or [0.5 / BATCH / 50]
    return sum(pick(rates.get(c.method, every)) * _work(c) for c in left) / max(jobs, 1)


def measured(cells: list[Cell], head: str, root: Path) -> list[tuple[Cell, dict]]:
    """The finished cells with their metrics, train_seconds less the grid's pauses (`estimate`'s input)."""
    stops = pauses(root)
    return [(c, {**m, "train_seconds": running_seconds(c, head, root, m, stops)})
            for c in cells if (m := read_metrics(c, head, root)) is not None]


def status(args: argparse.Namespace) -> None:
    root = Path(args.root)
    sweep = sweep_cells(args.methods, args.head, root)
    seeds = seed_cells(args.methods, args.tasks, args.seeds, args.head, root)
    done = measured([*sweep, *seeds], args.head, root)
    left = {stage: [c for c in cells if read_metrics(c, args.head, root) is None]
            for stage, cells in (("sweep", sweep), ("seeds", seeds))}
    print(f"sweep: {len(sweep) - len(left['sweep'])}/{len(sweep)} done; seeds: {len(seeds) - len(left['seeds'])}/"
          f"{len(seeds)} done ({sum(c.lr == PENDING for c in seeds)} wait for their method's sweep)")
    todo = [*left["sweep"], *left["seeds"]]
    quiet, median = (estimate(done, todo, args.jobs, pick) / 3600 for pick in (min, statistics.median))
    print(f"left: {len(todo)} cells, about {median:.1f} h at {args.jobs} at a time ({quiet:.1f} h at each "
          "method's fastest measured rate, i.e. with nothing else running)")


def deadline_fits(until: str, head: str, root: Path, cells: list[Cell]) -> Callable[[Cell], bool]:
    """`--until HH:MM` (UTC, today): a cell fits if its median estimate (`estimate`, one at a time, as the
    cells run beside each other) ends before then, counted from when it would start, i.e. now."""
    import datetime as dt

    hour, minute = (int(x) for x in until.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    end = now.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()
    if end <= now.timestamp():
        sys.exit(f"glue_grid: --until {until} UTC has passed (now {now:%H:%M} UTC)")
    done = measured(cells, head, root)
    return lambda cell: time.time() + estimate(done, [cell], 1) <= end

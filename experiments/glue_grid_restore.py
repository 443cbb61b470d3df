"""Rebuild the GLUE grid's finished cells under a new --root from the committed docs/results.json
(`glue_grid.py restore`), so a grid whose run directory was lost with its machine resumes where the
commit left it instead of recomputing CPU-hours of measured cells.

Each record of results.json becomes RUN_DIR/metrics.json holding exactly the fields that glue_grid.py and
glue_grid_report.py read (main metric, best and last epoch-end value, baselines, parameter and byte counts,
seconds), plus NAME.cmd with the record's command (and NAME.cpu with its processor, where recorded); `"restored_from"` marks the file as rebuilt, not
written by `verakit train`. A record's paused seconds travel as `grid_paused_seconds` (the pauses.log
they were computed from stayed behind), so the report writes every restored record back unchanged:
`check` is that round trip, run by `restore` before it touches the root. Adapters and logs are not
restored: a restored cell can be reported, not served or evaluated again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from glue_grid import Cell, run_dir

__all__ = ["check", "metrics_from_record", "restore"]


def _num(x: float | None) -> float:
    return math.nan if x is None else x  # the report maps NaN back to None (glue_grid_report._finite)


def metrics_from_record(r: dict, source: str) -> dict:
    """The metrics.json from which glue_grid_report.cell_record rebuilds record `r`."""
    main = r["metric"]
    last = r["last_epoch_value"]
    return {"main_metric": main,
            "metric": {main: _num(r["value"]), **{k: _num(v) for k, v in r["other_metrics"].items()}},
            "epochs": [] if last is None and r["best_epoch"] is None else [{"metrics": {main: _num(last)}}],
            "baseline": {main: _num(r["baseline"]), **{k: _num(v) for k, v in r["other_baselines"].items()}},
            "best_epoch": r["best_epoch"], "trainable_params": r["adapter_params"], "head_params": r["head_params"],
            "adapter_bytes": r["file_bytes"], "train_seconds": r["train_seconds"] + r["paused_seconds"],
            "grid_paused_seconds": r["paused_seconds"], "restored_from": source}


def _cell(r: dict) -> Cell:
    lr = Path(r["command"].split(" --out ")[1].split()[0]).name.split("-lr")[1].rsplit("-s", 1)[0]
    return Cell(r["stage"], r["task"], r["method"], r["seed"], lr)  # lr as its RUN_DIR spells it ("2e-2")


def restore(records: list[dict], root: Path, source: str) -> list[Path]:
    """Write every record's RUN_DIR/metrics.json and NAME.cmd under `root`; a cell that already has
    metrics.json (measured here, or restored before) is left as it is. Returns the RUN_DIRs written."""
    written = []
    for r in records:
        cell = _cell(r)
        out = run_dir(cell, r["head"], root)
        if (out / "metrics.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{cell.name}.cmd").write_text(r["command"] + "\n")
        if r.get("cpu"):
            (out.parent / f"{cell.name}.cpu").write_text(r["cpu"] + "\n")
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics_from_record(r, source), indent=1) + "\n")
        tmp.replace(out / "metrics.json")
        written.append(out)
    return written


def check(records: list[dict], methods: list[str], tasks: list[str], seeds: list[int], head: str) -> None:
    """Restore into a scratch root and report it back: SystemExit naming the first record that differs."""
    import tempfile

    from glue_grid_report import collect

    with tempfile.TemporaryDirectory() as tmp:
        restore(records, Path(tmp), "check")
        back = collect(methods, tasks, seeds, head, Path(tmp))
    want = [{**r, "cpu": r.get("cpu")} for r in records if r["head"] == head]  # "cpu": recorded since 2026-12-06
    for i, (a, b) in enumerate(zip(want, back, strict=False)):  # lengths compared below
        if a != b:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise SystemExit(f"glue_grid restore: record {i} ({a['stage']} {a['task']} {a['method']} seed "
                             f"{a['seed']}) does not survive the round trip: {', '.join(diff)} differ")
    if len(want) != len(back):
        raise SystemExit(f"glue_grid restore: {len(want)} records, {len(back)} reported back")

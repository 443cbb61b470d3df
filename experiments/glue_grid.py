"""The GLUE grid at learnable budgets (issue 16, Part 2): verakit VeRA, PEFT LoRA, PEFT VeRA and head only
on all-MiniLM-L6-v2, full training sets, real dev sets, 3 seeds, each method at its swept learning rate.

Two stages, every cell one `verakit train` command (`python -m verakit.cli train` with this checkout's
src first on PYTHONPATH, one thread), so the grid runs the code of the commit it is run from (use a
`git worktree` of it while the main tree changes):

* ``sweep``: LRS per method, seed 0, on SST-2 (a 20,000-row seeded subset x 1 epoch) and MRPC (all x 10
  epochs), scored on 1,000 / 400 rows carved from the *training* set (default_sweep.carve), never dev.
  A method's learning rate = the best mean of the two tasks' held-out main metrics.
* ``seeds``: every task x method x seed at the chosen rate, on the real dev set; the score is the best
  epoch-end dev evaluation, as `verakit train` selects its checkpoint.

The head (`--head`, one for every method): ``vera`` (VeRA vectors on the pooler, classifier in full;
head only = VeRA on pooler.dense alone) or ``full`` (pooler and classifier in full; head only =
`--method head`, whose swept rate is the head's). A cell whose RUN_DIR has metrics.json is skipped, so
the grid stops and restarts at will; cells run in seed-major order, so a partial grid covers every
task and method once before any second seed.

    python experiments/glue_grid.py run    [--stage all|sweep|seeds] [--jobs 2] [--head vera]
    python experiments/glue_grid.py status                    # cells done / left, and a time estimate
    python experiments/glue_grid.py report                    # docs/results.json, docs/results_grid.png, markdown
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
from default_sweep import HOLD, carve  # noqa: E402 (the sweep's held-out split: the same carving)

GLUE = REPO.parent / "shared" / "data" / "glue"
FOLDERS = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "rte": "RTE"}
# Per-task budget of the seeds stage: epochs over the whole training set (the lead may change these).
EPOCHS = {"sst2": 1, "mrpc": 10, "cola": 5, "stsb": 10, "rte": 20}
HEAD_LR = {"sst2": 4e-3, "mrpc": 4e-3, "cola": 4e-3, "stsb": 4e-3, "rte": 4e-3}  # the cpu budget's, every task
BATCH, MAX_LENGTH = 32, 128
SWEEP = {"sst2": (20_000, 1), "mrpc": (None, 10)}  # task -> (training rows, None: all; epochs)
SEEDS = (0, 1, 2)
# Every cell, every method: length-grouped batches and bf16 autocast steps (fp32 evaluation and files). On this
# project's AMX Xeon they make a MiniLM step ~5x cheaper (SST-2 vera-256: 1.2-1.8 s -> 0.25 s, one thread),
# which is what makes 161 cells fit in CPU-hours (docs/performance.md).
SPEED = ("--group-by-length", "--mixed-precision", "bf16")
VERA_LRS = ("1e-2", "2e-2", "5e-2", "1e-1")
# grid method -> (verakit --method, rank, swept learning rates)
METHODS = {
    "vera-256": ("vera", 256, VERA_LRS),
    "vera-1024": ("vera", 1024, VERA_LRS),
    "lora-8": ("lora", 8, ("1e-3", "2e-3", "5e-3", "1e-2")),
    "peft-vera-256": ("peft-vera", 256, VERA_LRS),
    "peft-vera-1024": ("peft-vera", 1024, VERA_LRS),
    "head": ("head", 1024, VERA_LRS),  # head vera: VeRA r=1024 on pooler.dense alone
    # DVoRA (issue 21 Part 2): verakit VeRA r=1024 with the learned magnitude (--magnitude), same protocol.
    "dvora-1024": ("dvora", 1024, VERA_LRS),
}
HEAD_FULL_LRS = ("1e-3", "2e-3", "4e-3", "1e-2")  # head only with --head full: the swept rate is --head-lr
PENDING = "?"  # the lr of a seeds cell whose method's sweep is unfinished
VERA_VS = {"vera-256": "peft-vera-256", "vera-1024": "peft-vera-1024"}  # verakit VeRA's PEFT counterpart
HEADING = "## GLUE at learnable budgets: the grid (issue 16)"
SECTION_INTRO = (
    "all-MiniLM-L6-v2, full training sets, real dev sets; verakit VeRA r=256 / r=1024, DVoRA r=1024, PEFT LoRA r=8, "
    "PEFT VeRA r=256 / r=1024, head only; the VeRA head for every method. Each method's learning rate is the "
    "best of 4 on rows carved from the training set (SST-2: 20,000 rows x 1 epoch; MRPC: all x 10), then 3 seeds "
    f"at it with epochs {', '.join(f'{t} {e}' for t, e in EPOCHS.items())}, batch {BATCH}, max length {MAX_LENGTH}, "
    "length-grouped batches and bf16 autocast steps (fp32 evaluation and files) for every cell. Written by "
    "`python experiments/glue_grid.py report --results-md docs/results.md`; every cell with its command is in "
    "docs/results.json, the plot in docs/results_grid.png. No GPU: CPU, one thread per cell.")


@dataclass(frozen=True)
class Cell:
    stage: str  # "sweep" (carved held-out split) or "seeds" (real dev set)
    task: str
    method: str  # a key of METHODS
    seed: int
    lr: str  # as written on the command line

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}-lr{self.lr}-s{self.seed}"


def lrs(method: str, head: str) -> tuple[str, ...]:
    return HEAD_FULL_LRS if method == "head" and head == "full" else METHODS[method][2]


def method_flags(method: str, head: str, lr: str) -> list[str]:
    """`verakit train` flags of one grid method: what trains, its rank and its (swept) learning rate."""
    kind, rank, _ = METHODS[method]
    if kind == "head" and head == "full":
        return ["--method", "head", "--head", "full", "--head-lr", lr]
    if kind == "head":  # the VeRA head without body targets: only pooler.dense's vectors and the classifier
        return ["--method", "vera", "--target-modules", "pooler.dense", "--head", "vera", "--r", str(rank),
                "--lr", lr]
    if kind == "dvora":
        return ["--method", "vera", "--magnitude", "--head", head, "--r", str(rank), "--lr", lr]
    return ["--method", kind, "--head", head, "--r", str(rank), "--lr", lr]


def command(cell: Cell, head: str, root: Path) -> list[str]:
    """The cell's `verakit train` arguments (after `verakit train`)."""
    if cell.stage == "sweep":
        rows, epochs = SWEEP[cell.task]
        data = [str(carve(cell.task, root)), *([] if rows is None else ["--max-train-samples", str(rows)])]
    else:
        data, epochs = [str(GLUE / FOLDERS[cell.task])], EPOCHS[cell.task]
    # --budget paper: the whole training set unless --max-train-samples; every other setting is explicit.
    budget = ["--budget", "paper", "--epochs", str(epochs), "--batch-size", str(BATCH), "--max-length",
              str(MAX_LENGTH), "--seed", str(cell.seed), *SPEED]
    swept_head = cell.method == "head" and head == "full"  # its --head-lr is the swept rate
    head_lr = [] if swept_head else ["--head-lr", f"{HEAD_LR[cell.task]:g}"]
    return ["--task", cell.task, "--data-dir", *data, "--out", str(run_dir(cell, head, root)),
            *method_flags(cell.method, head, cell.lr), *head_lr, *budget, "--quiet"]


def run_dir(cell: Cell, head: str, root: Path) -> Path:
    return root / f"head-{head}" / cell.stage / cell.name


def sweep_cells(methods: list[str], head: str) -> list[Cell]:
    """Every learning rate of every method on both sweep tasks, seed 0, one rate of each method at a time."""
    width = max(len(lrs(m, head)) for m in methods)
    return [Cell("sweep", t, m, 0, lrs(m, head)[i]) for i in range(width) for t in SWEEP for m in methods
            if i < len(lrs(m, head))]


def read_metrics(cell: Cell, head: str, root: Path) -> dict | None:
    path = run_dir(cell, head, root) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main_score(m: dict) -> float:
    return float(m["metric"][m["main_metric"]])


def choose_lr(method: str, head: str, root: Path) -> str | None:
    """The swept rate with the best mean held-out main metric over the sweep tasks (the first on a tie);
    None until every sweep cell of the method has finished."""
    best: tuple[float, str] | None = None
    for lr in lrs(method, head):
        ms = [read_metrics(Cell("sweep", t, method, 0, lr), head, root) for t in SWEEP]
        if any(m is None for m in ms):
            return None
        mean = statistics.mean(main_score(m) for m in ms)
        if best is None or mean > best[0]:
            best = (mean, lr)
    return best[1] if best else None


def seed_cells(methods: list[str], tasks: list[str], seeds: list[int], head: str, root: Path) -> list[Cell]:
    """Seed-major cells of the seeds stage; lr PENDING where the method's sweep is unfinished."""
    chosen = {m: choose_lr(m, head, root) or PENDING for m in methods}
    return [Cell("seeds", t, m, s, chosen[m]) for s in seeds for t in tasks for m in methods]


def run_cells(cells: list[Cell], head: str, root: Path, jobs: int) -> None:
    """Run the cells without metrics.json, `jobs` at a time, one thread each; each cell's command and log
    lie beside its RUN_DIR (NAME.cmd, NAME.log)."""
    todo = [c for c in cells if read_metrics(c, head, root) is None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    running: list[tuple[subprocess.Popen[bytes], Cell, float]] = []
    while todo or running:
        while todo and len(running) < jobs:
            cell = todo.pop(0)
            out = run_dir(cell, head, root)
            if out.exists():  # an interrupted cell: start it again from nothing
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            args = command(cell, head, root)
            (out.parent / f"{cell.name}.cmd").write_text(shlex.join(["verakit", "train", *args]) + "\n")
            log = open(out.parent / f"{cell.name}.log", "wb")  # noqa: SIM115 (the child holds it)
            proc = subprocess.Popen([sys.executable, "-m", "verakit.cli", "train", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((proc, cell, time.time()))
            print(f"started {cell.stage} {cell.name}", flush=True)
        time.sleep(5)
        for proc, cell, t0 in list(running):
            if proc.poll() is not None:
                running.remove((proc, cell, t0))
                print(f"finished {cell.stage} {cell.name} rc={proc.returncode} in {time.time() - t0:.0f} s", flush=True)


def run(args: argparse.Namespace) -> None:
    root = Path(args.root)
    if args.stage in ("all", "sweep"):
        run_cells(sweep_cells(args.methods, args.head), args.head, root, args.jobs)
    if args.stage in ("all", "seeds"):
        cells = seed_cells(args.methods, args.tasks, args.seeds, args.head, root)
        missing = sorted({c.method for c in cells if c.lr == PENDING})
        if missing:
            sys.exit(f"glue_grid: the sweep of {', '.join(missing)} is unfinished under {root}/head-{args.head}/sweep; "
                     "run `--stage sweep` first")
        run_cells(cells, args.head, root, args.jobs)


# ----------------------------------------------------------------------------------------- status


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


def status(args: argparse.Namespace) -> None:
    root = Path(args.root)
    sweep = sweep_cells(args.methods, args.head)
    seeds = seed_cells(args.methods, args.tasks, args.seeds, args.head, root)
    stops = pauses(root)
    done = [(c, {**m, "train_seconds": running_seconds(c, args.head, root, m, stops)})
            for c in [*sweep, *seeds] if (m := read_metrics(c, args.head, root)) is not None]
    left = {stage: [c for c in cells if read_metrics(c, args.head, root) is None]
            for stage, cells in (("sweep", sweep), ("seeds", seeds))}
    print(f"sweep: {len(sweep) - len(left['sweep'])}/{len(sweep)} done; seeds: {len(seeds) - len(left['seeds'])}/"
          f"{len(seeds)} done ({sum(c.lr == PENDING for c in seeds)} wait for their method's sweep)")
    todo = [*left["sweep"], *left["seeds"]]
    quiet, median = (estimate(done, todo, args.jobs, pick) / 3600 for pick in (min, statistics.median))
    print(f"left: {len(todo)} cells, about {median:.1f} h at {args.jobs} at a time ({quiet:.1f} h at each "
          "method's fastest measured rate, i.e. with nothing else running)")


# ----------------------------------------------------------------------------------------- report


def bootstrap_ci(diffs: list[float], n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired differences, resampling the pairs (seeds)."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _finite(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def cell_record(cell: Cell, head: str, root: Path, m: dict, stops: list[tuple[float, float]] = ()) -> dict:
    """One object of docs/results.json; train_seconds excludes the time the grid was paused (`pauses`)."""
    kind, rank, _ = METHODS[cell.method]
    cmd_file = run_dir(cell, head, root).parent / f"{cell.name}.cmd"
    cmd = cmd_file.read_text().strip() if cmd_file.is_file() else shlex.join(["verakit", "train",
                                                                               *command(cell, head, root)])
    main, running = m["main_metric"], running_seconds(cell, head, root, m, list(stops))
    return {"stage": cell.stage, "task": cell.task, "method": cell.method, "verakit_method": kind,
            "rank": None if kind == "head" and head == "full" else rank, "head": head, "seed": cell.seed,
            "lr": float(cell.lr), "metric": main, "value": _finite(m["metric"][main]),
            "baseline": _finite((m.get("baseline") or {}).get(main)), "adapter_params": m["trainable_params"],
            "head_params": m["head_params"], "file_bytes": m["adapter_bytes"], "train_seconds": round(running, 2),
            "paused_seconds": round(m["train_seconds"] - running, 2),
            "command": cmd}


def collect(methods: list[str], tasks: list[str], seeds: list[int], head: str, root: Path) -> list[dict]:
    cells = [*sweep_cells(methods, head), *seed_cells(methods, tasks, seeds, head, root)]
    stops = pauses(root)
    return [cell_record(c, head, root, m, stops) for c in cells if (m := read_metrics(c, head, root)) is not None]


def markdown(records: list[dict], tasks: list[str], methods: list[str]) -> str:
    """The headline table (seeds stage, scores x 100) and the paired differences with bootstrap intervals."""
    by = {}
    for r in records:
        if r["stage"] == "seeds" and r["value"] is not None:
            by.setdefault((r["task"], r["method"]), {})[r["seed"]] = r
    lines = ["| task (metric, trivial) | method | lr | median | spread (min-max) | seeds | adapter params | "
             "file bytes (incl. head) | wall s (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for meth in methods:
            rs = list(by.get((t, meth), {}).values())
            if not rs:
                lines.append(f"| {t} | {meth} | | not yet measured | | 0 | | | |")
                continue
            v = [100 * r["value"] for r in rs]
            base = rs[0]["baseline"]
            lines.append(f"| {t} ({rs[0]['metric']}, {'-' if base is None else f'{100 * base:.1f}'}) | {meth} | "
                         f"{rs[0]['lr']:g} | {statistics.median(v):.2f} | {min(v):.2f}-{max(v):.2f} | {len(rs)} | "
                         f"{rs[0]['adapter_params']:,} | {rs[0]['file_bytes']:,} | "
                         f"{statistics.median(r['train_seconds'] for r in rs):.0f} |")
    pairs = [(a, "lora-8") for a in ("vera-256", "vera-1024", "peft-vera-256", "peft-vera-1024")]
    pairs += [*VERA_VS.items(), ("dvora-1024", "vera-1024"), ("dvora-1024", "lora-8")]
    lines += ["", "| difference (points, paired by seed) | " + " | ".join(tasks) + " | mean over tasks |",
              "|---|" + "---|" * (len(tasks) + 1)]
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        row, means = [], []
        for t in tasks:
            common = sorted(set(by.get((t, a), {})) & set(by.get((t, b), {})))
            d = [100 * (by[(t, a)][s]["value"] - by[(t, b)][s]["value"]) for s in common]
            if not d:
                row.append("")
                continue
            lo, hi = bootstrap_ci(d)
            means.append(statistics.mean(d))
            row.append(f"{means[-1]:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(d)})")
        mean = f"{statistics.mean(means):+.2f} over {len(means)}" if means else ""
        lines.append(f"| {a} - {b} | " + " | ".join(row) + f" | {mean} |")
    return "\n".join(lines)


# Issue 16's bar for a budget to count: LoRA r=8 >= the trivial baseline + 5 points (accuracy, F1, MCC), or a
# Pearson >= 0.5 (STS-B, whose constant predictor has no correlation).
LEARNED_MARGIN, LEARNED_PEARSON = 5.0, 0.5


def budget_check(records: list[dict], tasks: list[str], method: str = "lora-8") -> str:
    """Per task: `method`'s median dev score against the trivial baseline and issue 16's bar (is the task
    learned at this budget?)."""
    lines = [f"| task | metric | trivial | {method} median | bar | learned at this budget |", "|---|---|---|---|---|---|"]
    for t in tasks:
        rs = [r for r in records if r["stage"] == "seeds" and r["task"] == t and r["method"] == method
              and r["value"] is not None]
        if not rs:
            lines.append(f"| {t} | | | not yet measured | | |")
            continue
        metric, base = rs[0]["metric"], rs[0]["baseline"]
        med = 100 * statistics.median(r["value"] for r in rs)
        if metric == "pearson":
            bar, ok = f">= {100 * LEARNED_PEARSON:.0f}", med >= 100 * LEARNED_PEARSON
        elif base is None:
            bar, ok = "no trivial baseline recorded", None
        else:
            bar, ok = f">= {100 * base + LEARNED_MARGIN:.1f}", med >= 100 * base + LEARNED_MARGIN
        verdict = "?" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {t} | {metric} | {'-' if base is None else f'{100 * base:.1f}'} | {med:.2f} (n={len(rs)}) | "
                     f"{bar} | {verdict} |")
    return "\n".join(lines)


def sweep_table(records: list[dict], methods: list[str], head: str) -> str:
    """The sweep's held-out main metric x 100 per method, task and rate; the chosen rate in bold."""
    got = {(r["method"], r["task"], r["lr"]): r["value"] for r in records if r["stage"] == "sweep"}
    lines = ["| method | " + " | ".join(f"{t} (held-out)" for t in SWEEP) + " | chosen lr |", "|---|" + "---|" * (len(SWEEP) + 1)]
    for meth in methods:
        rates = lrs(meth, head)
        means = {lr: [got.get((meth, t, float(lr))) for t in SWEEP] for lr in rates}
        done = [lr for lr in rates if all(v is not None for v in means[lr])]
        best = max(done, key=lambda lr: statistics.mean(means[lr]), default=None) if len(done) == len(rates) else None
        cells = []
        for t_i, _ in enumerate(SWEEP):
            parts = [(f"**{lr}: {100 * v:.1f}**" if lr == best else f"{lr}: {100 * v:.1f}")
                     for lr in rates if (v := means[lr][t_i]) is not None]
            cells.append(", ".join(parts) or "-")
        lines.append(f"| {meth} | " + " | ".join(cells) + f" | {best or 'sweep unfinished'} |")
    return "\n".join(lines)


def progress_line(records: list[dict], methods: list[str], tasks: list[str], seeds: list[int], head: str) -> str:
    n_sweep = sum(len(lrs(m, head)) for m in methods) * len(SWEEP)
    n_seeds = len(methods) * len(tasks) * len(seeds)
    done = {s: sum(r["stage"] == s for r in records) for s in ("sweep", "seeds")}
    state = "complete" if done["sweep"] == n_sweep and done["seeds"] == n_seeds else "**partial**"
    return (f"Cells measured: sweep {done['sweep']}/{n_sweep}, seeds {done['seeds']}/{n_seeds} ({state}; "
            "`python experiments/glue_grid.py status` for the rest).")


def plot(records: list[dict], tasks: list[str], methods: list[str], path: Path) -> None:
    """Score against file bytes (log x) per task: each seed faint, the median as a diamond, the trivial
    baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = [r for r in records if r["stage"] == "seeds" and r["value"] is not None]
    tasks = [t for t in tasks if any(r["task"] == t for r in seeds)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.4), constrained_layout=True, squeeze=False)
    colors = dict(zip(METHODS, ("tab:blue", "navy", "tab:orange", "tab:green", "darkgreen", "tab:gray", "tab:purple"), strict=True))
    for ax, t in zip(axes[0], tasks, strict=True):
        for meth in methods:
            rs = [r for r in seeds if r["task"] == t and r["method"] == meth]
            if rs:
                ys = [100 * r["value"] for r in rs]
                ax.scatter([rs[0]["file_bytes"]] * len(ys), ys, color=colors[meth], alpha=0.35, s=14)
                ax.scatter([rs[0]["file_bytes"]], [statistics.median(ys)], color=colors[meth], marker="D", s=40,
                           label=meth)
        base = next((r["baseline"] for r in seeds if r["task"] == t and r["baseline"] is not None), None)
        if base is not None:
            ax.axhline(100 * base, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("file bytes (incl. head)")
        ax.set_ylabel(next(r["metric"] for r in seeds if r["task"] == t) + " x 100")
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    root = Path(args.root)
    records = collect(args.methods, args.tasks, args.seeds, args.head, root)
    Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    plot(records, args.tasks, args.methods, Path(args.plot))
    chosen = {m: choose_lr(m, args.head, root) for m in args.methods}
    print(f"Head: {args.head}. Chosen learning rates (sweep): " + ", ".join(f"{m} {lr or '(sweep unfinished)'}"
                                                                          for m, lr in chosen.items()) + "\n")
    text = "\n\n".join([progress_line(records, args.methods, args.tasks, args.seeds, args.head),
                         "Learning-rate sweep (seed 0; held-out rows carved from the training set):",
                         sweep_table(records, args.methods, args.head),
                         "Seeds stage (real dev sets; scores x 100):", markdown(records, args.tasks, args.methods),
                         "Is each task learned at its budget? (issue 16: LoRA r=8 at least 5 points above the "
                         "trivial baseline, or Pearson >= 0.5)", budget_check(records, args.tasks)])
    print(text)
    if args.results_md:
        sys.path.insert(0, str(REPO / "experiments"))
        from results_section import replace_section, write_atomic

        md = Path(args.results_md)
        body = f"{HEADING}\n\n{SECTION_INTRO}\n\n{text}\n"
        write_atomic(md, replace_section(md.read_text() if md.is_file() else "", HEADING, body))
    print(f"\nwrote {args.json} ({len(records)} cells) and {args.plot}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "status", "report"])
    p.add_argument("--stage", choices=["all", "sweep", "seeds"], default="all", help="run: which cells (default all)")
    p.add_argument("--head", choices=["vera", "full"], default="vera", help="the head of every method (default vera)")
    p.add_argument("--tasks", nargs="+", default=list(FOLDERS), choices=list(FOLDERS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--jobs", type=int, default=2, help="cells at a time, one thread each (default 2)")
    p.add_argument("--root", default="/work/runs_glue_grid", help="carved data and RUN_DIRs (outside the repo)")
    p.add_argument("--json", default=str(REPO / "docs" / "results.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "results_grid.png"))
    p.add_argument("--results-md", default=None, help="report: also write the section into this Markdown file "
                   "(docs/results.md), replacing the grid's earlier section")
    args = p.parse_args(argv)
    {"run": run, "status": status, "report": report}[args.action](args)


if __name__ == "__main__":
    main()

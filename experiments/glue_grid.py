"""The GLUE grid at learnable budgets (issue 16, Part 2): verakit VeRA, PEFT LoRA, PEFT VeRA and head only
on all-MiniLM-L6-v2, full training sets, real dev sets, 3 seeds, each method at its swept learning rate.

Two stages, every cell one `verakit train` command (`python -m verakit.cli train` with this checkout's
src first on PYTHONPATH, one thread), so the grid runs the code of the commit it is run from (use a
`git worktree` of it while the main tree changes):

* ``sweep``: LRS per method, seed 0, on SST-2 (a 20,000-row seeded subset x 1 epoch) and MRPC (all x 10
  epochs), scored on 1,000 / 400 rows carved from the *training* set (default_sweep.carve), never dev.
  A method's learning rate = the best mean of the two tasks' held-out main metrics. Edge rule, the same for
  every method: while the best is the lowest (highest) swept rate, the next rate below (above) it on the
  1-2-5 LADDER is swept too, at most EXTEND_MAX more per method, so no choice rests on an edge of the grid.
* ``seeds``: every task x method x seed at the chosen rate, on the real dev set; the score is the best
  epoch-end dev evaluation, as `verakit train` selects its checkpoint.

The head (`--head`, one for every method): ``vera`` (VeRA vectors on the pooler, classifier in full;
head only = VeRA on pooler.dense alone) or ``full`` (pooler and classifier in full; head only =
`--method head`, whose swept rate is the head's). A cell whose RUN_DIR has metrics.json is skipped, so
the grid stops and restarts at will; cells run in seed-major order, so a partial grid covers every
task and method once before any second seed.

    python experiments/glue_grid.py run    [--stage all|sweep|seeds] [--jobs 2] [--head vera] [--code CHECKOUT]
                                           [--until HH:MM]  # start only cells estimated to end by then (UTC)
                                           # SIGTERM: running cells checkpoint, the next run resumes them
    python experiments/glue_grid.py status                    # cells done / left, and a time estimate
    python experiments/glue_grid.py report                    # docs/results.json, docs/results_grid.png, markdown
                                                              # (glue_grid_report.py)
    python experiments/glue_grid.py restore                   # a new machine: finished cells from docs/results.json
                                                              # into --root, so `run` resumes (glue_grid_restore.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
from default_sweep import carve  # noqa: E402 (the sweep's held-out split: the same carving)

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
LADDER = ("1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3", "1e-2", "2e-2", "5e-2", "1e-1", "2e-1", "5e-1")  # the edge rule's
EXTEND_MAX = 2  # rates the edge rule may add to one method's sweep
PENDING = "?"  # the lr of a seeds cell whose method's sweep is unfinished
VERA_VS = {"vera-256": "peft-vera-256", "vera-1024": "peft-vera-1024"}  # verakit VeRA's PEFT counterpart


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


def lrs(method: str, head: str, root: Path | None = None) -> tuple[str, ...]:
    """The method's swept rates, ascending: its base rates, and with `root` those the edge rule added from the
    sweep results under root (a rate is added only once the rates before it are all measured)."""
    rates = HEAD_FULL_LRS if method == "head" and head == "full" else METHODS[method][2]
    for _ in range(EXTEND_MAX if root is not None else 0):
        best = _best_rate(method, head, root, rates)
        beyond = None if best is None else _beyond(rates, best)
        if beyond is None:
            break
        rates = tuple(sorted((*rates, beyond), key=float))
    return rates


def _beyond(rates: tuple[str, ...], best: str) -> str | None:
    """The LADDER rate past the edge that `best` sits on, or None (inside, off the ladder, or its end)."""
    if best not in LADDER or best not in (rates[0], rates[-1]):
        return None
    i = LADDER.index(best) + (-1 if best == rates[0] else 1)
    return LADDER[i] if 0 <= i < len(LADDER) and LADDER[i] not in rates else None


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


def sweep_cells(methods: list[str], head: str, root: Path | None = None) -> list[Cell]:
    """Every learning rate of every method (`lrs`: with `root`, the edge rule's too) on both sweep tasks,
    seed 0, one rate of each method at a time."""
    rates = {m: lrs(m, head, root) for m in methods}
    width = max(len(r) for r in rates.values())
    return [Cell("sweep", t, m, 0, rates[m][i]) for i in range(width) for t in SWEEP for m in methods
            if i < len(rates[m])]


def read_metrics(cell: Cell, head: str, root: Path) -> dict | None:
    path = run_dir(cell, head, root) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main_score(m: dict) -> float:
    return float(m["metric"][m["main_metric"]])


def choose_lr(method: str, head: str, root: Path) -> str | None:
    """The swept rate (edge rule included) with the best mean held-out main metric over the sweep tasks (the
    lowest rate on a tie); None until every sweep cell of the method, the edge rule's too, has finished."""
    return _best_rate(method, head, root, lrs(method, head, root))


def _best_rate(method: str, head: str, root: Path, rates: tuple[str, ...]) -> str | None:
    best: tuple[float, str] | None = None
    for lr in rates:
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


def run_cells(cells: list[Cell], head: str, root: Path, jobs: int, code: Path = REPO,
              fits: Callable[[Cell], bool] | None = None) -> None:
    """Run the cells without metrics.json, `jobs` at a time, one thread each, on `code`'s src/ (a checkout, e.g.
    a `git worktree` of the commit the grid started on); each cell's command and log lie beside its RUN_DIR
    (NAME.cmd, NAME.log, NAME.cpu: `cpu_name()`, the processor it ran on). A cell stopped with its checkpoint (RUN_DIR/checkpoint/, written by `verakit
    train` on SIGINT) continues with --resume, which ends as an uninterrupted run would; any other partial
    RUN_DIR starts again from nothing. SIGTERM or SIGINT to this process starts no new cell and SIGINTs the
    running ones, so they checkpoint before everything exits (a session's end loses no finished epoch).
    `fits` (run --until): a cell starts only if fits(cell) when its turn comes; the others wait for the next run."""
    todo = [c for c in cells if read_metrics(c, head, root) is None]
    waiting: list[Cell] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(code) / "src"), os.environ.get("PYTHONPATH", "")])}
    running: list[tuple[subprocess.Popen[bytes], Cell, float]] = []
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
        for proc, _, _ in running:
            proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (todo and not stopping) or running:
            while todo and not stopping and len(running) < jobs:
                cell = todo.pop(0)
                if fits is not None and not fits(cell):  # judged when it would start
                    waiting.append(cell)
                    continue
                out = run_dir(cell, head, root)
                args = command(cell, head, root)
                resume = (out / "checkpoint").is_dir()
                if resume:
                    args.append("--resume")
                elif out.exists():  # interrupted without a checkpoint: start it again from nothing
                    shutil.rmtree(out)
                out.parent.mkdir(parents=True, exist_ok=True)
                if not resume:
                    (out.parent / f"{cell.name}.cmd").write_text(shlex.join(["verakit", "train", *args]) + "\n")
                (out.parent / f"{cell.name}.cpu").write_text(cpu_name() + "\n")  # a resumed cell: where it ended
                log = open(out.parent / f"{cell.name}.log", "ab" if resume else "wb")  # noqa: SIM115 (the child holds it)
                # its own session: a terminal's Ctrl-C reaches this runner alone, which passes one SIGINT on (a
                # second one would stop `verakit train` before its checkpoint is written)
                proc = subprocess.Popen([sys.executable, "-m", "verakit.cli", "train", *args], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running.append((proc, cell, time.time()))
                print(f"{'resumed' if resume else 'started'} {cell.stage} {cell.name}", flush=True)
            time.sleep(5)
            for proc, cell, t0 in list(running):
                if proc.poll() is not None:
                    running.remove((proc, cell, t0))
                    print(f"{'stopped' if stopping else 'finished'} {cell.stage} {cell.name} rc={proc.returncode} "
                          f"in {time.time() - t0:.0f} s", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if waiting:
        print(f"glue_grid: {len(waiting)} cells would end after --until, left for the next run", flush=True)
    if stopping:
        sys.exit(f"glue_grid: stopped by signal {stopping[0]}; running cells checkpointed, the next `run` resumes them")


def cpu_name() -> str:
    """This machine's processor and whether it has the bf16 matrix units the cells' autocast steps use (AMX
    tiles, AVX-512 BF16): the grid's cells ran on more than one machine, and bf16 kernels differ between them."""
    from verakit.train.precision import cpu_bf16_units  # the flags `verakit train`'s bf16 tip reads

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    units = cpu_bf16_units()
    return f"{model} ({', '.join(units) or 'no bf16 units'})"


def run(args: argparse.Namespace) -> None:
    import glue_grid_time  # --until's estimates

    root = Path(args.root)
    fits = None
    if args.stage in ("all", "sweep"):
        left: set[Cell] | None = None
        while True:  # the edge rule adds cells as results land: run until no cell is left or none progressed
            cells = sweep_cells(args.methods, args.head, root)
            now = {c for c in cells if read_metrics(c, args.head, root) is None}
            if not now or now == left:
                break
            left = now
            fits = args.until and glue_grid_time.deadline_fits(args.until, args.head, root, cells)
            run_cells(cells, args.head, root, args.jobs, Path(args.code), fits or None)
    if args.stage in ("all", "seeds"):
        cells = seed_cells(args.methods, args.tasks, args.seeds, args.head, root)
        missing = sorted({c.method for c in cells if c.lr == PENDING})
        if missing:
            sys.exit(f"glue_grid: the sweep of {', '.join(missing)} is unfinished under {root}/head-{args.head}/sweep; "
                     "run `--stage sweep` first")
        fits = args.until and glue_grid_time.deadline_fits(args.until, args.head, root,
                                                           [*sweep_cells(args.methods, args.head, root), *cells])
        run_cells(cells, args.head, root, args.jobs, Path(args.code), fits or None)


def restore(args: argparse.Namespace) -> None:
    """Finished cells from --json (docs/results.json) into --root, after checking they report back unchanged."""
    from glue_grid_restore import check
    from glue_grid_restore import restore as write

    records = json.loads(Path(args.json).read_text())
    check(records, args.methods, args.tasks, args.seeds, args.head)
    written = write(records, Path(args.root), str(args.json))
    print(f"restored {len(written)} of {len(records)} cells under {args.root} (the others had metrics.json)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "status", "report", "restore"])
    p.add_argument("--stage", choices=["all", "sweep", "seeds"], default="all", help="run: which cells (default all)")
    p.add_argument("--head", choices=["vera", "full"], default="vera", help="the head of every method (default vera)")
    p.add_argument("--tasks", nargs="+", default=list(FOLDERS), choices=list(FOLDERS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--jobs", type=int, default=2, help="cells at a time, one thread each (default 2)")
    p.add_argument("--until", metavar="HH:MM", help="run: start only cells whose estimated end (status's median "
                   "rate) is before HH:MM UTC today, e.g. a session's end; the rest wait for the next run")
    p.add_argument("--code", default=str(REPO), help="run: the checkout whose src/ trains the cells, e.g. a git "
                   "worktree of the commit the grid started on (default: this one)")
    p.add_argument("--root", default="/work/runs_glue_grid", help="carved data and RUN_DIRs (outside the repo)")
    p.add_argument("--json", default=str(REPO / "docs" / "results.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "results_grid.png"))
    p.add_argument("--results-md", default=None, help="report: also write the section into this Markdown file "
                   "(docs/results.md), replacing the grid's earlier section")
    args = p.parse_args(argv)
    if args.action == "report":
        from glue_grid_report import report  # matplotlib and numpy only where a report is written

        report(args)
    elif args.action == "restore":
        restore(args)
    else:
        from glue_grid_time import status

        {"run": run, "status": status}[args.action](args)


if __name__ == "__main__":
    main()

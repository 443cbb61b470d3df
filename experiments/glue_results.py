"""The results grid of docs/results.md: GLUE tasks x {vera, lora, head} x seeds on all-MiniLM-L6-v2.

Every cell is one `verakit train` command (printed, and recorded in the table), run one after another
in seed-major order so that a partial grid still covers every task and method once. A cell whose
RUN_DIR already has metrics.json is skipped, so the script can be stopped and restarted at will.

    python experiments/glue_results.py run  [--seeds 0 1 2] [--tasks sst2 mrpc ...] [--runs runs/glue]
    python experiments/glue_results.py report [--runs runs/glue]   # prints the table, writes docs/results.png

Budget (a shared 2-core CPU, no GPU): each cell trains on a random subset of the train split for one
epoch and evaluates on at most 500 dev rows, with the paper's learning rates (docs/training.md). These
are far smaller budgets than the paper's, so absolute numbers are low; the comparison between methods
at an equal budget is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "glue"
TASKS = {  # task -> (max_train_samples, epochs, max_length)
    "sst2": (1000, 1, 64),
    "mrpc": (1000, 1, 128),
    "cola": (1000, 1, 64),
    "stsb": (1000, 1, 128),
    "rte": (1000, 1, 128),
}
METHODS = {"vera": ["--r", "1024"], "lora": ["--r", "8"], "head": []}
MAX_EVAL = 500
BATCH = 16


def command(task: str, method: str, seed: int, runs: Path) -> list[str]:
    n_train, epochs, max_length = TASKS[task]
    return [
        "verakit", "train", "--task", task, "--data-dir", str(DATA), "--out", str(runs / f"{task}-{method}-s{seed}"),
        # --budget paper: the per-task learning rates of the papers' tables, which this grid was run with
        # (every other budget setting is explicit here).
        "--method", method, *METHODS[method], "--budget", "paper", "--epochs", str(epochs), "--batch-size", str(BATCH),
        "--max-length", str(max_length), "--max-train-samples", str(n_train), "--max-eval-samples", str(MAX_EVAL),
        "--seed", str(seed), "--quiet",
    ]


def run(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    for seed in args.seeds:
        for task in args.tasks:
            for method in METHODS:
                out = runs / f"{task}-{method}-s{seed}"
                if (out / "metrics.json").is_file():
                    continue
                if out.exists():  # an interrupted cell: start it again
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                cmd = command(task, method, seed, runs)
                print("+", shlex.join(cmd), flush=True)
                t = time.perf_counter()
                subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)


def _cells(runs: Path) -> dict[tuple[str, str], list[dict]]:
    cells: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(runs.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        m["seed"] = json.loads((path.parent / "config.json").read_text())["args"]["seed"]
        cells.setdefault((m["task"], m["method"]), []).append(m)
    return cells


def report(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    cells = _cells(runs)
    lines = [
        "| task (metric) | method | median | seeds measured | per seed | adapter params | head params "
        "| adapter tensors (B) | artifact file (B) | wall time (s, median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    medians: dict[tuple[str, str], float] = {}
    for task in TASKS:
        for method in METHODS:
            ms = sorted(cells.get((task, method), []), key=lambda m: m["seed"])
            if not ms:
                lines.append(f"| {task} | {method} | not yet measured | 0 | | | | | | |")
                continue
            main = ms[0]["main_metric"]
            vals = [m["metric"][main] for m in ms]
            med = statistics.median(vals)
            medians[(task, method)] = med
            per_seed = ", ".join(f"s{m['seed']}: {m['metric'][main]:.4f}" for m in ms)
            wall = statistics.median(m["train_seconds"] for m in ms)
            lines.append(
                f"| {task} ({main}) | {method} | {med:.4f} | {len(ms)} | {per_seed} | {ms[0]['trainable_params']:,} "
                f"| {ms[0]['head_params']:,} | {ms[0]['adapter_tensor_bytes']:,} | {ms[0]['adapter_bytes']:,} | {wall:.0f} |"
            )
    complete = [t for t in TASKS if all((t, m) in medians for m in ("vera", "lora"))]
    if complete:
        gap = statistics.mean(medians[(t, "lora")] - medians[(t, "vera")] for t in complete)
        lines += ["", f"Mean (LoRA - VeRA) over {', '.join(complete)}: {100 * gap:+.2f} points."]
    table = "\n".join(lines)
    if args.table:
        Path(args.table).write_text(table + "\n")
    _plot(cells, Path(args.plot))
    print(table)


def _plot(cells: dict[tuple[str, str], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any((t, m) in cells for m in METHODS)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), constrained_layout=True, squeeze=False)
    colors = {"vera": "tab:blue", "lora": "tab:orange", "head": "tab:gray"}
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in METHODS:
            ms = cells.get((task, method), [])
            if not ms:
                continue
            main = ms[0]["main_metric"]
            # Head-only has no adapter tensors: drawn at 1 byte so the log axis can show it.
            x = max(ms[0]["adapter_tensor_bytes"], 1)
            ys = [m["metric"][main] for m in ms]
            ax.scatter([x] * len(ys), ys, color=colors[method], alpha=0.4, s=14)
            ax.scatter([x], [statistics.median(ys)], color=colors[method], marker="D", s=40, label=method)
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("adapter bytes (fp32, no head)")
        ax.set_ylabel(main)
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    r.add_argument("--runs", default=str(REPO / "runs" / "glue"))
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(func=run)
    s = sub.add_parser("report")
    s.add_argument("--runs", default=str(REPO / "runs" / "glue"))
    s.add_argument("--table", default=None, help="also write the table to this file (it is always printed)")
    s.add_argument("--plot", default=str(REPO / "docs" / "results.png"))
    s.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())

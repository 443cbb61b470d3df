"""Run reports: `report.md` (a human-readable summary) and `curve.png` (train loss and dev metric per
evaluation). matplotlib is imported inside `plot_curve`, with the non-interactive Agg backend.

Every report puts the best score beside what it must beat: the trivial baseline (a constant prediction,
when the recipe computes one; metrics.json "baseline") and the model before its first step (step 0, the
first record of the history). The curve starts at step 0 too, so a run with a single evaluation (one
epoch, no --eval-every) still draws an honest two-point line from the untrained model to the trained
one, instead of one point on a meaningless axis.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

__all__ = ["dev_floor", "write_report", "plot_curve", "render_report", "scores_table"]


def plot_curve(history: list[dict[str, Any]], main_metric: str, path: str | Path, title: str,
               step_losses: list[float] | None = None, baseline: dict[str, float] | None = None,
               split: str = "dev") -> None:
    """Two panels over optimizer steps: train loss (per step, and the mean since the previous evaluation),
    and the dev metric at each evaluation from step 0 on, with the trivial baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from ..fileformat import atomic_write_bytes

    trained = [h for h in history if h["train_loss"] is not None]  # step 0 has no train loss yet
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    if step_losses:
        ax_loss.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8, alpha=0.5, label="per step")
    ax_loss.plot([h["step"] for h in trained], [h["train_loss"] for h in trained], marker="o",
                 label="mean since last eval")
    ax_loss.legend(fontsize=8)
    ax_loss.set_ylabel("train loss")
    ax_metric.plot([h["step"] for h in history], [h["metrics"][main_metric] for h in history], marker="o",
                   color="tab:green", label=f"{split} (step 0: before training)")
    if baseline and main_metric in baseline:
        ax_metric.axhline(baseline[main_metric], ls="--", color="tab:gray", label="trivial baseline")
    ax_metric.legend(fontsize=8)
    ax_metric.set_ylabel(f"{split} {main_metric}")
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def scores_table(metrics: dict[str, Any], names: list[str], split: str = "dev") -> list[str]:
    """report.md's score section: the trivial baseline, step 0, the best (saved) and the final evaluation,
    one column per metric in `names`, and a plain warning when the best does not beat step 0 or the baseline."""
    history, main = metrics["epochs"], metrics["main_metric"]
    start = history[0] if history and history[0]["step"] == 0 else None
    baseline = metrics.get("baseline")

    def row(label: str, step: Any, values: dict[str, float]) -> str:
        return f"| {label} | {step} | " + " | ".join(f"{values[k]:.4f}" if k in values else "-" for k in names) + " |"

    lines = [f"## {split.capitalize()} scores", "", "| | step | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    if baseline:
        lines.append(row("trivial baseline (constant prediction: the most frequent class, or the mean score)",
                         "-", baseline))
    if start is not None:
        lines.append(row("before training", 0, start["metrics"]))
    lines.append(row("best (saved artifact)", metrics["best_step"], metrics["metric"]))
    if history:
        lines.append(row("final evaluation", history[-1]["step"], history[-1]["metrics"]))
    best = metrics["metric"][main]
    beaten = [(what, ref[main]) for what, ref in (("the trivial baseline", baseline),
                                                  ("the model before training", start and start["metrics"]))
              if ref and main in ref and best <= ref[main]]
    if beaten:
        lines += ["", "**Warning:** the best trained " + split + f" {main} ({best:.4f}) does not beat "
                  + " nor ".join(f"{what} ({value:.4f})" for what, value in beaten)
                  + ": the run learned nothing useful; try a larger learning rate or more steps."]
    return lines


def evaluation_row(h: dict[str, Any], values: list[float]) -> str:
    """One row of a report's evaluations table: epoch, step, train loss ('-' at step 0), lr, values."""
    loss = "-" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
    return f"| {h['epoch']:.2f} | {h['step']} | {loss} | {h['lr']:.2e} | " + " | ".join(f"{v:.4f}" for v in values) + " |"


def dev_floor(scores: dict[str, Any], main: str) -> float | None:
    """Dev's trivial baseline of `main` recorded by a run (or a tune's best trial) that chose on held-out
    rows (`dev_baseline`), or None (runs that chose on dev, and runs written before it was recorded)."""
    return (scores.get("dev_baseline") or {}).get(main)


def _dev_floor(metrics: dict[str, Any], main: str) -> str:
    """"; trivial baseline on dev X" inside report.md's dev sentence, or ""."""
    floor = dev_floor(metrics, main)
    return "" if floor is None else f"; trivial baseline on dev {floor:.4f}"


def render_report(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """The Markdown text of report.md."""
    args = config["args"]
    main = metrics["main_metric"]
    names = list(metrics["metric"])
    split = "held-out" if "dev" in metrics else "dev"  # "dev": the dev score of a run that chose on held-out rows
    lines = [
        f"# {metrics['task']} / {metrics['method']}",
        "",
        f"Best {split} **{main} = {metrics['metric'][main]:.4f}** at step {metrics['best_step']} "
        f"(epoch {metrics['best_epoch']:.2f} of {args['epochs']}); artifact `{metrics['artifact']}`.",
        *([f"Chosen on {metrics['eval_split']}; dev, scored once by that adapter: **{main} = "
           f"{metrics['dev'][main]:.4f}** ({metrics['n_dev']:,} rows{_dev_floor(metrics, main)})."]
          if "dev" in metrics else []),
        "",
        *scores_table(metrics, names, split),
        "",
        "## Run",
        "",
        "| | |",
        "|---|---|",
        f"| model | {metrics['model']} |",
        f"| trainable adapter params | {metrics['trainable_params']:,} |",
        f"| head params (trained separately) | {metrics['head_params']:,} |",
        f"| artifact bytes | {metrics['adapter_bytes']:,} |",
        f"| adapter tensors (fp32, no head) | {metrics['adapter_tensor_bytes']:,} bytes |",
        f"| train / {split} examples | {metrics['n_train']:,} / {metrics['n_eval']:,} |",
        f"| steps, processes | {metrics['total_steps']}, {metrics['world_size']} |",
        f"| wall time | {metrics['train_seconds']:.1f} s |",
        f"| learning rates | adapter {args['lr']:g}, head {args['head_lr']:g}, warmup {args['warmup_ratio']} |",
        f"| batch, max length, seed | {args['batch_size']}, {args['max_length']}, {args['seed']} |",
        "",
        "## Evaluations",
        "",
        f"| epoch | step | train loss | lr | {' | '.join(names)} |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    lines += [evaluation_row(h, [h["metrics"][k] for k in names]) for h in metrics["epochs"]]
    lines += ["", "![curve](curve.png)", "", "Method config:", "", "```json"]
    lines += [json.dumps(config["method"], indent=2), "```", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    """Write run_dir/report.md and run_dir/curve.png."""
    from ..fileformat import atomic_write_bytes

    run_dir = Path(run_dir)
    title = f"{metrics['task']} / {metrics['method']}"
    plot_curve(metrics["epochs"], metrics["main_metric"], run_dir / "curve.png", title, metrics.get("step_losses"),
               metrics.get("baseline"), "held-out" if "dev" in metrics else "dev")
    atomic_write_bytes(run_dir / "report.md", render_report(metrics, config).encode())

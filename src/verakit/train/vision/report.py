"""Reports of image-classification runs: `report.md` (summary, per-class accuracy, confusion matrix) and
`curve.png` (the same train-loss / accuracy curve as text runs, from report.plot_curve)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..report import evaluation_row, scores_table

__all__ = ["render_image_report", "write_image_report"]

_MAX_MATRIX = 20  # classes up to which report.md shows the confusion matrix (metrics.json always has it)


def render_image_report(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """The Markdown text of report.md for an image-classification run."""
    args = config["args"]
    acc, final = metrics["metric"]["accuracy"], metrics["final_metric"]["accuracy"]
    shots = f"{metrics['shots']} per class" if metrics["shots"] else "all"
    lines = [
        f"# images / {metrics['method']}",
        "",
        f"Best {metrics['eval_split']} **accuracy = {acc:.4f}** at step {metrics['best_step']} "
        f"(epoch {metrics['best_epoch']:.2f} of {args['epochs']}); last evaluation {final:.4f}; "
        f"artifact `{metrics['artifact']}`.",
        "",
        *scores_table(metrics, list(metrics["metric"]), split=metrics["eval_split"]),
        "",
        "## Run",
        "",
        "| | |",
        "|---|---|",
        f"| model | {metrics['model']} |",
        f"| data | {args['data_dir']} ({len(metrics['classes'])} classes) |",
        f"| training images | {metrics['n_train']:,} (shots: {shots}) |",
        f"| {metrics['eval_split']} images | {metrics['n_eval']:,} |",
        f"| trainable adapter params | {metrics['trainable_params']:,} |",
        f"| head params (trained separately) | {metrics['head_params']:,} |",
        f"| artifact bytes | {metrics['adapter_bytes']:,} |",
        f"| adapter tensors (fp32, no head) | {metrics['adapter_tensor_bytes']:,} bytes |",
        f"| steps, processes | {metrics['total_steps']}, {metrics['world_size']} |",
        f"| wall time | {metrics['train_seconds']:.1f} s |",
        f"| learning rates | adapter {args['lr']:g}, head {args['head_lr']:g}, warmup {args['warmup_ratio']} |",
        f"| batch, augment, seed | {args['batch_size']}, {args['augment']}, {args['seed']} |",
        "",
        "## Per-class accuracy (best evaluation)",
        "",
        "| class | images | accuracy |",
        "|---|---|---|",
    ]
    counts = metrics["data"][metrics["eval_split"]]
    for cls, value in metrics["per_class_accuracy"].items():
        lines.append(f"| {cls} | {counts[cls]} | {'-' if value is None else f'{value:.4f}'} |")
    classes = metrics["classes"]
    if len(classes) <= _MAX_MATRIX:
        lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", "",
                  "| | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for cls, row in zip(classes, metrics["confusion_matrix"], strict=True):
            lines.append(f"| {cls} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## Evaluations", "", "| epoch | step | train loss | lr | accuracy | mean class accuracy |",
              "|---|---|---|---|---|---|"]
    lines += [evaluation_row(h, [h["metrics"]["accuracy"], h["metrics"]["mean_class_accuracy"]])
              for h in metrics["epochs"]]
    lines += ["", "![curve](curve.png)", "", "Method config:", "", "```json", json.dumps(config["method"], indent=2),
              "```", ""]
    return "\n".join(lines)


def write_image_report(run_dir: str | Path, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    """Write run_dir/report.md and run_dir/curve.png."""
    from ...fileformat import atomic_write_bytes
    from ..report import plot_curve

    run_dir = Path(run_dir)
    plot_curve(metrics["epochs"], metrics["main_metric"], run_dir / "curve.png", f"images / {metrics['method']}",
               baseline=metrics.get("baseline"))
    atomic_write_bytes(run_dir / "report.md", render_image_report(metrics, config).encode())

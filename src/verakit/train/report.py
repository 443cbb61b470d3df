"""Run reports: `report.md` (a human-readable summary) and `curve.png` (train loss and dev metric per
evaluation). matplotlib is imported inside `plot_curve`, with the non-interactive Agg backend.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

__all__ = ["write_report", "plot_curve", "render_report"]


def plot_curve(history: list[dict[str, Any]], main_metric: str, path: str | Path, title: str,
               step_losses: list[float] | None = None) -> None:
    """Two panels over optimizer steps: train loss (per step, and the mean since the previous evaluation),
    and the dev metric at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileformat import atomic_write_bytes

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    if step_losses:
        ax_loss.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8, alpha=0.5, label="per step")
    ax_loss.plot(steps, [h["train_loss"] for h in history], marker="o", label="mean since last eval")
    ax_loss.legend(fontsize=8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss")
    ax_metric.plot(steps, [h["metrics"][main_metric] for h in history], marker="o", color="tab:green")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"dev {main_metric}")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def render_report(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """The Markdown text of report.md."""
    args = config["args"]
    main = metrics["main_metric"]
    lines = [
        f"# {metrics['task']} / {metrics['method']}",
        "",
        f"Best dev **{main} = {metrics['metric'][main]:.4f}** at step {metrics['best_step']} "
        f"(epoch {metrics['best_epoch']:.2f} of {args['epochs']}); artifact `{metrics['artifact']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| model | {metrics['model']} |",
        f"| dev metrics (best) | {', '.join(f'{k} {v:.4f}' for k, v in metrics['metric'].items())} |",
        f"| trainable adapter params | {metrics['trainable_params']:,} |",
        f"| head params (trained separately) | {metrics['head_params']:,} |",
        f"| artifact bytes | {metrics['adapter_bytes']:,} |",
        f"| adapter tensors (fp32, no head) | {metrics['adapter_tensor_bytes']:,} bytes |",
        f"| train / dev examples | {metrics['n_train']:,} / {metrics['n_eval']:,} |",
        f"| steps, processes | {metrics['total_steps']}, {metrics['world_size']} |",
        f"| wall time | {metrics['train_seconds']:.1f} s |",
        f"| learning rates | adapter {args['lr']:g}, head {args['head_lr']:g}, warmup {args['warmup_ratio']} |",
        f"| batch, max length, seed | {args['batch_size']}, {args['max_length']}, {args['seed']} |",
        "",
        "## Evaluations",
        "",
        f"| epoch | step | train loss | lr | {' | '.join(metrics['metric'])} |",
        "|---|---|---|---|" + "---|" * len(metrics["metric"]),
    ]
    for h in metrics["epochs"]:
        vals = " | ".join(f"{h['metrics'][k]:.4f}" for k in metrics["metric"])
        lines.append(f"| {h['epoch']:.2f} | {h['step']} | {h['train_loss']:.4f} | {h['lr']:.2e} | {vals} |")
    lines += ["", "![curve](curve.png)", "", "Method config:", "", "```json"]
    lines += [json.dumps(config["method"], indent=2), "```", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    """Write run_dir/report.md and run_dir/curve.png."""
    from ..fileformat import atomic_write_bytes

    run_dir = Path(run_dir)
    title = f"{metrics['task']} / {metrics['method']}"
    plot_curve(metrics["epochs"], metrics["main_metric"], run_dir / "curve.png", title, metrics.get("step_losses"))
    atomic_write_bytes(run_dir / "report.md", render_report(metrics, config).encode())

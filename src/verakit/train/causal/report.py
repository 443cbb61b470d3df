"""`report.md` of a causal-LM run: summary table, evaluations, curve, and sample generations before and
after training (the reader sees what the adapter changed, not only a loss)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..report import evaluation_row, scores_table

__all__ = ["render_causal_report", "write_causal_report"]


def _quote(text: str) -> str:
    """Text as a Markdown block quote, so newlines and leading '#' in generations stay literal."""
    return "\n".join(f"> {line}" if line else ">" for line in (text or "(empty)").splitlines())


def render_causal_report(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """The Markdown text of report.md, from train_causal's metrics.json and config.json contents."""
    args = config["args"]
    main = metrics["main_metric"]
    best = metrics["metric"]
    decoding = "greedy" if args["num_beams"] == 1 else f"beam search, {args['num_beams']} beams"
    lines = [
        f"# {metrics['task']} / {metrics['method']}",
        "",
        f"Best held-out **{main} = {best[main]:.4f}** at step {metrics['best_step']} "
        f"(epoch {metrics['best_epoch']:.2f} of {args['epochs']}); artifact `{metrics['artifact']}`.",
        "",
        *scores_table(metrics, list(best), split="held-out"),
        "",
        "## Run",
        "",
        "| | |",
        "|---|---|",
        f"| model | {metrics['model']} |",
        f"| trainable params | {metrics['trainable_params']:,} |",
        f"| artifact bytes | {metrics['adapter_bytes']:,} |",
        f"| train / held-out examples (generated) | {metrics['n_train']:,} / {metrics['n_eval']:,} "
        f"({metrics['n_generated']:,}) |",
        f"| completion tokens trained on per epoch | {metrics['train_tokens']:,} |",
        f"| steps, processes | {metrics['total_steps']}, {metrics['world_size']} |",
        f"| wall time | {metrics['train_seconds']:.1f} s |",
        f"| peak RSS | {metrics['peak_rss_mib']:,.0f} MiB |",
        f"| learning rate, warmup | {args['lr']:g}, {args['warmup_ratio']} |",
        f"| batch, max length, seed | {args['batch_size']}, {args['max_length']}, {args['seed']} |",
        f"| chat template, gradient checkpointing | {args['chat_template']}, {args['gradient_checkpointing']} |",
        f"| decoding | {decoding}, at most {args['max_new_tokens']} new tokens |",
        "",
        "## Evaluations",
        "",
        f"| epoch | step | train loss | lr | {' | '.join(best)} |",
        "|---|---|---|---|" + "---|" * len(best),
    ]
    lines += [evaluation_row(h, [h["metrics"][k] for k in best]) for h in metrics["epochs"]]
    lines += ["", "![curve](curve.png)", "", "## Sample generations (held-out prompts)", ""]
    if not metrics["samples"]:
        lines += ["None requested (report_samples = 0).", ""]
    for i, s in enumerate(metrics["samples"], 1):
        lines += [f"### Sample {i}", "", "Prompt:", "", _quote(s["prompt"]), "", "Reference:", "",
                  _quote(s["reference"]), "", "Before training:", "", _quote(s["before"]), "",
                  "After training (final weights):", "", _quote(s["after"]), ""]
    lines += ["Method config:", "", "```json", json.dumps(config["method"], indent=2), "```", ""]
    return "\n".join(lines)


def write_causal_report(run_dir: str | Path, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    """RUN_DIR/curve.png (train loss per step, held-out main metric per evaluation) and RUN_DIR/report.md."""
    from ...fileformat import atomic_write_bytes
    from ..report import plot_curve

    run_dir = Path(run_dir)
    plot_curve(metrics["epochs"], metrics["main_metric"], run_dir / "curve.png",
               f"{metrics['task']} / {metrics['method']}", metrics["step_losses"])
    atomic_write_bytes(run_dir / "report.md", render_causal_report(metrics, config).encode())

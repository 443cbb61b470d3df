"""report.md and curve.png put the best score beside what it must beat: the trivial baseline and the
model before its first step (step 0); the curve starts at step 0 (x = optimizer steps) with the baseline
dashed, so a one-evaluation run gets an honest two-point line, not one point on a meaningless axis."""

from __future__ import annotations

import pytest

from verakit.train.report import plot_curve, render_report


def _metrics(best: float, start: float, baseline: float | None) -> dict:
    history = [
        {"epoch": 0.0, "step": 0, "train_loss": None, "lr": 0.0, "seconds": 0.1, "metrics": {"accuracy": start, "f1": 0.1}},
        {"epoch": 1.0, "step": 6, "train_loss": 0.5, "lr": 1e-3, "seconds": 2.0, "metrics": {"accuracy": best, "f1": 0.7}},
    ]
    return {
        "task": "csv", "method": "vera", "model": "tiny", "metric": history[1]["metrics"], "main_metric": "accuracy",
        "best_step": 6, "best_epoch": 1.0, "trainable_params": 10, "head_params": 5, "adapter_bytes": 100,
        "adapter_tensor_bytes": 40, "artifact": "adapter.safetensors", "train_seconds": 2.0, "total_steps": 6,
        "world_size": 1, "baseline": None if baseline is None else {"accuracy": baseline, "f1": 0.6667},
        "n_train": 96, "n_eval": 48, "epochs": history, "step_losses": [0.7, 0.6, 0.6, 0.5, 0.5, 0.4],
    }


CONFIG = {"args": {"epochs": 1, "lr": 1e-2, "head_lr": 1e-2, "warmup_ratio": 0.06, "batch_size": 16, "max_length": 128,
                   "seed": 0}, "method": {"r": 16}}


def test_report_shows_baseline_step_zero_best_and_final():
    text = render_report(_metrics(best=0.8125, start=0.5, baseline=0.5208), CONFIG)
    assert "| | step | accuracy | f1 |" in text
    assert "| trivial baseline (constant prediction: the most frequent class, or the mean score) | - | 0.5208 | 0.6667 |" in text
    assert "| before training | 0 | 0.5000 | 0.1000 |" in text
    assert "| best (saved artifact) | 6 | 0.8125 | 0.7000 |" in text
    assert "| final evaluation | 6 | 0.8125 | 0.7000 |" in text
    assert "| 0.00 | 0 | - | 0.00e+00 | 0.5000 | 0.1000 |" in text  # step 0 in the evaluations, no train loss yet
    assert "Warning" not in text


@pytest.mark.parametrize(("best", "start", "beaten"), [
    (0.5, 0.4, "does not beat the trivial baseline (0.5208)"),
    (0.6, 0.7, "does not beat the model before training (0.7000)"),
    (0.5, 0.6, "does not beat the trivial baseline (0.5208) nor the model before training (0.6000)"),
])
def test_report_says_plainly_when_training_did_not_help(best, start, beaten):
    text = render_report(_metrics(best=best, start=start, baseline=0.5208), CONFIG)
    assert f"**Warning:** the best trained dev accuracy ({best:.4f}) {beaten}" in text


def test_report_without_a_baseline_has_no_baseline_row():
    text = render_report(_metrics(best=0.8, start=0.5, baseline=None), CONFIG)
    assert "trivial baseline" not in text and "| before training | 0 |" in text


def test_one_evaluation_run_curve_goes_from_step_zero_with_a_dashed_baseline(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    m = _metrics(best=0.8125, start=0.5, baseline=0.5208)
    plot_curve(m["epochs"], "accuracy", tmp_path / "curve.png", "t", m["step_losses"], m["baseline"])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_loss, ax_metric = figures[0].axes
    dev, base = ax_metric.get_lines()
    assert list(dev.get_xdata()) == [0, 6] and list(dev.get_ydata()) == [0.5, 0.8125]
    assert list(base.get_ydata()) == [0.5208, 0.5208] and base.get_linestyle() == "--"
    assert ax_metric.get_xlabel() == ax_loss.get_xlabel() == "optimizer step"
    per_step, window = ax_loss.get_lines()
    assert list(window.get_xdata()) == [6]  # step 0 has no train loss to draw

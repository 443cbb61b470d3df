"""The one summary line `verakit train` and `verakit tune` print says when the result is no better than the
trivial baseline (one constant answer), as report.md does: a grouped csv run and a 2-trial MRPC search
ended exactly there (mean group accuracy 0.6353, F1 0.8122) and their lines read like results."""

import math

import pytest

from verakit.cli import main
from verakit.cli.common import baseline_note


def test_baseline_note_only_when_the_constant_answer_is_as_good():
    base = {"f1": 0.8122, "accuracy": 0.6838}
    assert "no better than the trivial baseline (f1 0.8122" in baseline_note(0.8122, base, "f1")
    assert "no better" in baseline_note(0.70, base, "f1")
    assert baseline_note(0.8349, {"accuracy": 0.5092}, "accuracy") == ""
    assert baseline_note(0.9, None, "accuracy") == ""  # recipes without a baseline (causal LMs)
    assert baseline_note(0.9, {"accuracy": 0.5}, "pearson") == ""  # no baseline for that metric
    assert baseline_note(0.1, {"pearson": math.nan}, "pearson") == ""  # a constant's correlation is undefined


def _classify_metrics(value: float, baseline: float) -> dict:
    return {"task": "sst2", "method": "vera", "main_metric": "accuracy", "metric": {"accuracy": value},
            "best_step": 19, "trainable_params": 18304, "head_params": 770, "adapter_bytes": 84312,
            "train_seconds": 1.0, "baseline": {"accuracy": baseline}}


@pytest.mark.parametrize(("value", "flagged"), [(0.6364, True), (0.8349, False)])
def test_train_summary_line_names_a_baseline_result(monkeypatch, tmp_path, capsys, value, flagged):
    import verakit.train.classify as classify

    monkeypatch.setattr(classify, "train_classifier", lambda args: _classify_metrics(value, 0.6364))
    assert main(["train", "--task", "sst2", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"sst2 vera: best dev accuracy {value:.4f} (step 19)")
    assert ("no better than the trivial baseline (accuracy 0.6364" in line) is flagged, line


def test_grouped_summary_line_names_a_baseline_result(monkeypatch, tmp_path, capsys):
    import verakit.train.grouped as grouped

    metrics = {"task": "csv", "n_groups": 3, "main_metric": "mean_group_accuracy",
               "metric": {"accuracy": 0.6364, "mean_group_accuracy": 0.6353}, "best_step": 19,
               "trainable_params": 18304, "head_params": 770, "adapters_total_bytes": 253200, "train_seconds": 1.0,
               "baseline": {"accuracy": 0.6364, "mean_group_accuracy": 0.6353}}
    monkeypatch.setattr(grouped, "train_grouped", lambda args: metrics)
    assert main(["train", "--task", "csv", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--group-column", "customer"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "best dev mean_group_accuracy 0.6353 (step 19); no better than the trivial baseline " \
           "(mean_group_accuracy 0.6353" in line, line


def test_tune_summary_line_names_a_baseline_result(monkeypatch, tmp_path, capsys):
    import verakit.train.tune as tune

    summary = {"n_trials": 2, "states": {"COMPLETE": 2, "PRUNED": 0, "FAIL": 0}, "split": "dev", "main_metric": "f1",
               "best": {"value": 0.8122, "number": 0, "params": {"lr": 0.008559, "r": 256}},
               "baseline": {"f1": 0.8122, "accuracy": 0.6838}, "report": str(tmp_path / "report.md")}
    monkeypatch.setattr(tune, "tune", lambda args: summary)
    assert main(["tune", "--task", "mrpc", "--data-dir", str(tmp_path), "--out", str(tmp_path / "t"),
                 "--trials", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("2 trials (2 complete, 0 pruned, 0 failed); best dev f1 0.8122 (trial 0: lr=0.008559, "
                           "r=256); no better than the trivial baseline (f1 0.8122"), line


@pytest.mark.parametrize("resume", [False, True])
def test_train_into_a_finished_run_says_so(tmp_path, capsys, resume):
    """Rerunning the README's `verakit train ... --out runs/sst2` said "pass --resume or choose another --out",
    and --resume then said "no checkpoint to resume": a finished run is named as one, exit 2, nothing touched."""
    run = tmp_path / "runs" / "sst2"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "adapter.safetensors").write_bytes(b"x")
    data = tmp_path / "SST-2"
    data.mkdir()
    argv = ["train", "--task", "sst2", "--data-dir", str(data), "--out", str(run)] + (["--resume"] if resume else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"verakit train: error: {run}: holds a finished run (metrics.json, adapter.safetensors)" in err, err
    assert "--resume" not in err
    assert (run / "adapter.safetensors").read_bytes() == b"x"

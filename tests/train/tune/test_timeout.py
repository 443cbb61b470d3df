"""`verakit tune --timeout S` as the only budget (docs/tuning.md, Budget): this invocation starts no trial
after S seconds, the running one finishes, and the clock starts again with each invocation."""

from __future__ import annotations

import json
import time

import pytest

from verakit.cli import main
from verakit.train.classify import TrainArgs
from verakit.train.classify import recipe as classify_recipe
from verakit.train.tune import SearchDim, TuneArgs, tune

optuna = pytest.importorskip("optuna", reason="pip install optuna (the tune extra) for verakit tune")

pytestmark = pytest.mark.usefixtures("one_thread")


def _counting(monkeypatch, limit: int) -> list[float]:
    """Wrap train_classifier (what each trial runs): record each trial's start time, and fail the test
    instead of looping forever if more than `limit` trials start (a timeout that is ignored never ends)."""
    starts: list[float] = []
    real = classify_recipe.train_classifier

    def train(args, **kw):
        starts.append(time.monotonic())
        if len(starts) > limit:
            raise AssertionError(f"trial {len(starts)} started: the timeout did not stop the study")
        return real(args, **kw)

    monkeypatch.setattr(classify_recipe, "train_classifier", train)
    return starts


def test_timeout_alone_lets_the_running_trial_finish_and_counts_per_invocation(tmp_path, capsys, monkeypatch,
                                                                             tiny_bert_dir, tiny_task):
    """A timeout far shorter than one trial: the first trial starts (nothing has elapsed yet), runs to its
    end (complete, both evaluations reported, metrics.json written), and no second trial starts. The same
    command again runs exactly one more trial: the timeout is per invocation, not per study."""
    run_dir = tmp_path / "study"
    argv = ["tune", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(run_dir), "--model", tiny_bert_dir,
            "--r", "16", "--epochs", "2", "--batch-size", "32", "--max-train-samples", "64",
            "--param", "lr=float:1e-3:5e-2:log", "--timeout", "0.001"]
    starts = _counting(monkeypatch, limit=2)
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("1 trials (")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(starts) == 1 and summary["n_trials"] == 1
    assert summary["states"] == {"COMPLETE": 1, "PRUNED": 0, "FAIL": 0, "RUNNING": 0}
    study = optuna.load_study(study_name="verakit-tune", storage=f"sqlite:///{run_dir / 'study.db'}")
    (trial,) = study.trials
    assert sorted(trial.intermediate_values) == [64, 128]  # both epochs' evaluations: it was not cut short
    metrics = json.loads((run_dir / "trials" / "0000" / "metrics.json").read_text())
    assert trial.value == metrics["metric"]["accuracy"] and metrics["total_steps"] == 4

    starts.clear()
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(starts) == 1 and summary["n_trials"] == 2
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE", "COMPLETE"]
    assert (run_dir / "trials" / "0001" / "metrics.json").is_file()


def test_timeout_starts_trials_until_it_has_passed_and_none_after(tmp_path, monkeypatch, tiny_bert_dir, tiny_task):
    """Trials of a fixed 0.5 s (the trial's own training replaced by a sleep) under a 2 s timeout: every
    trial starts within 2 s of the first, more than one starts, the last ends after the 2 s (the study ran
    until the timeout had passed, not fewer trials), and not one starts beyond it."""
    timeout, trial_s = 2.0, 0.5
    starts: list[float] = []
    ends: list[float] = []

    def fake_train(args, **kw):
        starts.append(time.monotonic())
        if len(starts) > 20:
            raise AssertionError("20 trials of 0.5 s started under a 2 s timeout: it did not stop the study")
        time.sleep(trial_s)
        ends.append(time.monotonic())
        return {"metric": {"accuracy": 0.5, "macro_f1": 0.5}, "train_seconds": trial_s}

    monkeypatch.setattr(classify_recipe, "train_classifier", fake_train)
    base = TrainArgs(task="csv", data_dir=str(tiny_task), out=str(tmp_path / "study"), model=tiny_bert_dir, r=16,
                     max_train_samples=64)
    t0 = time.monotonic()  # before tune(): no later than the moment Optuna's clock starts
    summary = tune(TuneArgs(base, (SearchDim("lr", "float", 1e-3, 1e-2, log=True),), timeout=timeout))
    assert summary["n_trials"] == len(starts) >= 2
    assert all(s - starts[0] <= timeout for s in starts)  # Optuna's clock starts before the first trial
    assert ends[-1] - t0 >= timeout
    # The trial after the last would have started at the last one's end, past the timeout: it never did.
    assert summary["states"]["COMPLETE"] == len(starts)

"""`verakit tune` end to end on the tiny random BERT and task: a 3-trial study writes its trials, report,
importance plot and summary; rerunning resumes the same SQLite storage (the first trials untouched, only
the missing ones run); a pruner stops trials after their first evaluation; bad budgets, empty or invalid
spaces and resumes with other settings fail naming the culprit, before anything is written."""

from __future__ import annotations

import json

import pytest

from verakit.cli import main
from verakit.train.classify import TrainArgs
from verakit.train.tune import SearchDim, SpaceError, TuneArgs, load_space, parse_dim, tune

optuna = pytest.importorskip("optuna", reason="pip install optuna (the tune extra) for verakit tune")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(run_dir, tiny_bert_dir, tiny_task, *extra, d_choices="1e-7,0.1,1.0"):
    return ["tune", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(run_dir), "--model", tiny_bert_dir,
            "--r", "16", "--epochs", "2", "--batch-size", "32", "--eval-every", "2", "--max-train-samples", "64",
            "--param", "lr=float:1e-3:5e-2:log", "--param", f"d_initial=choice:{d_choices}", *extra]


def test_three_trial_search_reports_and_resumes(tmp_path, capsys, caplog, tiny_bert_dir, tiny_task):
    import logging

    caplog.set_level(logging.INFO, logger="verakit")
    run_dir = tmp_path / "study"
    assert main(_cli(run_dir, tiny_bert_dir, tiny_task, "--trials", "3")) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("3 trials (") and "best dev accuracy" in out
    # Progress: a line as each trial starts (its settings) and ends (score, time, best so far, time left),
    # and each trial's own training plan in between.
    lines = [r.getMessage() for r in caplog.records if r.name in ("verakit.tune", "verakit.train")]
    starts = [line for line in lines if " starts: " in line]
    assert [line.split(" starts: ")[0] for line in starts] == ["trial 1/3 (#0)", "trial 2/3 (#1)", "trial 3/3 (#2)"]
    assert all("lr=" in line and "d_initial=" in line for line in starts)
    ends = [line for line in lines if " ends: " in line]
    assert len(ends) == 3 and all("best so far " in line for line in ends)
    assert "left" in ends[0] and "left" not in ends[2]  # the last trial has nothing left after it
    assert lines[lines.index(starts[0]) + 1].startswith("plan: 64 training rows, 2 epochs x 2 steps of batch 32")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_trials"] == 3 and summary["states"]["FAIL"] == 0
    assert summary["states"]["COMPLETE"] + summary["states"]["PRUNED"] == 3
    first = {t["number"]: t for t in summary["trials"]}

    study = optuna.load_study(study_name="verakit-tune", storage=f"sqlite:///{run_dir / 'study.db'}")
    for t in study.trials:
        assert 1e-3 <= t.params["lr"] <= 5e-2 and t.params["d_initial"] in (1e-7, 0.1, 1.0)
        # Reported after every evaluation at step = examples seen: 64 rows, 2 steps of 32 per epoch,
        # eval every 2 steps and at each epoch end (the same step here).
        # A trial is never pruned at its final evaluation (training is over by then).
        assert sorted(t.intermediate_values) == ([64, 128] if t.state.name == "COMPLETE" else [64])
        trial_dir = run_dir / "trials" / f"{t.number:04d}"
        if t.state.name == "COMPLETE":
            m = json.loads((trial_dir / "metrics.json").read_text())
            assert t.value == m["metric"]["accuracy"] == max(t.intermediate_values.values())
            cfg = json.loads((trial_dir / "config.json").read_text())["args"]
            assert (cfg["lr"], cfg["d_initial"], cfg["r"]) == (t.params["lr"], t.params["d_initial"], 16)
    best = summary["best"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert best["value"] == max(t.value for t in complete)
    assert f"--lr {best['params']['lr']}" in best["command"] and "--r 16" in best["command"]
    report = (run_dir / "report.md").read_text()
    assert f"**{best['value']:.4f}**" in report and "| # | state | dev accuracy | lr | d_initial |" in report
    # The searched settings are listed as searched, never as fixed; the fixed ones hold what every trial shares.
    fixed = report.split("Fixed (the same in every trial; defaults left out): `")[1].split("`")[0]
    assert "--lr" not in fixed and "--d-initial" not in fixed and "--r 16" in fixed and "--epochs 2" in fixed
    assert summary["searched"] == ["lr", "d_initial"] and summary["fixed"] == fixed
    # The trivial baseline: the tiny dev set is balanced, so always one class scores 0.5.
    assert summary["baseline"] == {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)}  # macro F1: (2/3 + 0) / 2
    assert "trivial baseline (a constant prediction) scores dev `accuracy` 0.5000" in report
    if len(complete) >= 2:
        assert set(summary["importance"]) == {"lr", "d_initial"}
        assert sum(summary["importance"].values()) == pytest.approx(1.0)
        assert (run_dir / "importance.png").stat().st_size > 1000

    # Same command again: the study already holds 3 finished trials, nothing runs.
    assert main(_cli(run_dir, tiny_bert_dir, tiny_task, "--trials", "3")) == 0
    assert json.loads((run_dir / "summary.json").read_text())["n_trials"] == 3
    # A larger budget resumes the same storage: 4 trials, the first 3 unchanged, a new folder for the 4th.
    assert main(_cli(run_dir, tiny_bert_dir, tiny_task, "--trials", "4")) == 0, capsys.readouterr().err
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["n_trials"] == 4
    for t in resumed["trials"][:3]:
        assert {k: t[k] for k in ("state", "value", "params")} == {k: first[t["number"]][k] for k in ("state", "value", "params")}
    assert resumed["trials"][3]["params"] != first[0]["params"]  # the sampler was reseeded, not replayed
    assert (run_dir / "trials" / "0003" / "config.json").is_file()

    # Resuming with other fixed settings or another space is refused, naming the storage and the field.
    assert main(_cli(run_dir, tiny_bert_dir, tiny_task, "--trials", "5", d_choices="0.1,1.0")) == 2
    err = capsys.readouterr().err
    assert "study.db: the study was started with other settings (space: changed)" in err
    args = _cli(run_dir, tiny_bert_dir, tiny_task, "--trials", "5")
    args[args.index("--batch-size") + 1] = "16"
    assert main(args) == 2
    assert "batch_size: 32 -> 16" in capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["n_trials"] == 4


def test_resume_over_other_data_is_refused(tmp_path, capsys, tiny_bert_dir, tiny_task):
    """Trials scored on other rows would not compare: a study whose train or dev file changed since it
    started refuses new trials by name and keeps what it holds; with the files restored it goes on."""
    import shutil

    task = shutil.copytree(tiny_task, tmp_path / "task")
    run_dir = tmp_path / "study"
    assert main(_cli(run_dir, tiny_bert_dir, task, "--trials", "1")) == 0, capsys.readouterr().err
    before = (run_dir / "summary.json").read_text()
    dev = task / "dev.csv"
    original = dev.read_text()
    dev.write_text(original.replace(",pos\n", ",neg\n", 1))  # one dev label flipped
    assert main(_cli(run_dir, tiny_bert_dir, task, "--trials", "2")) == 2
    assert "study.db: the study was started over other data (examples' sha256" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == before and not (run_dir / "trials" / "0001").exists()
    dev.write_text(original)
    assert main(_cli(run_dir, tiny_bert_dir, task, "--trials", "2")) == 0, capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["n_trials"] == 2


def test_pruned_trials_stop_after_their_first_evaluation(tmp_path, tiny_bert_dir, tiny_task):
    """A pruner that prunes any score (ThresholdPruner above 1.01 never holds for accuracy) stops each
    trial at its first evaluation: 1 report of 2, no metrics.json, the best-so-far artifact kept."""
    base = TrainArgs(task="csv", data_dir=str(tiny_task), out=str(tmp_path / "study"), model=tiny_bert_dir, r=16,
                     epochs=2, batch_size=32, max_train_samples=64)
    summary = tune(TuneArgs(base, (SearchDim("lr", "float", 1e-3, 1e-2, log=True),), trials=2,
                            pruner=optuna.pruners.ThresholdPruner(lower=1.01)))
    assert summary["states"] == {"COMPLETE": 0, "PRUNED": 2, "FAIL": 0, "RUNNING": 0}
    assert summary["best"] is None and "needs at least 2 completed trials, the study has 0" in summary["importance_note"]
    for t in summary["trials"]:
        assert t["examples_at_last_report"] == 64
        trial_dir = tmp_path / "study" / "trials" / f"{t['number']:04d}"
        assert (trial_dir / "adapter.safetensors").is_file() and not (trial_dir / "metrics.json").exists()
    assert "No trial has completed yet." in (tmp_path / "study" / "report.md").read_text()


def test_budget_paper_reaches_every_trial_and_is_part_of_the_study(tmp_path, capsys, tiny_bert_dir, tiny_task):
    """--budget paper: each trial resolves the paper preset (csv: 10 epochs, VeRA lr 4e-3, head 4e-3; the
    cpu preset would give 3 epochs and lr 2e-2); the best trial's command repeats it, and resuming the
    study with another budget is refused."""
    run_dir = tmp_path / "study"
    argv = ["tune", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(run_dir), "--model", tiny_bert_dir,
            "--r", "16", "--batch-size", "32", "--max-train-samples", "32", "--param", "d_initial=choice:0.1,1.0",
            "--trials", "1"]
    assert main([*argv, "--budget", "paper"]) == 0, capsys.readouterr().err
    cfg = json.loads((run_dir / "trials" / "0000" / "config.json").read_text())["args"]
    assert (cfg["budget"], cfg["epochs"], cfg["lr"], cfg["head_lr"]) == ("paper", 10, 4e-3, 4e-3)
    m = json.loads((run_dir / "trials" / "0000" / "metrics.json").read_text())
    assert m["total_steps"] == 10  # 32 rows, batch 32, 10 epochs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "--budget paper" in summary["best"]["command"] and "--budget paper" in summary["fixed"]
    capsys.readouterr()
    assert main([*argv, "--budget", "cpu", "--trials", "2"]) == 2
    assert "budget: 'paper' -> 'cpu'" in capsys.readouterr().err


def test_tune_help_shows_both_budgets_defaults():
    """tune's fixed-setting defaults are shown per --budget, as train's are (cli.common.defaults_help)."""
    import argparse

    from verakit.cli import build_parser
    from verakit.train.hparams import TASK_BUDGETS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["tune"]._actions}
    assert "cpu" in helps["budget"] and "paper" in helps["budget"]
    paper_rte = TASK_BUDGETS["paper"]["rte"]
    assert helps["epochs"].startswith("training epochs (default: cpu budget: ")
    assert f"; paper budget: vera/full/head (sst2 {TASK_BUDGETS['paper']['sst2'].epochs}" in helps["epochs"]
    assert f"rte {paper_rte.epochs}" in helps["epochs"] and f"rte {paper_rte.lora_epochs}" in helps["epochs"]


BAD = {
    # case -> (extra CLI flags, message that must appear in stderr)
    "no budget": ([], "tune budget: give a number of trials (--trials N) and/or a timeout (--timeout SECONDS)"),
    "zero trials": (["--trials", "0"], "tune budget: --trials must be an integer >= 1, got 0"),
    "negative timeout": (["--timeout", "-5"], "tune budget: --timeout must be a number of seconds > 0, got -5.0"),
    "inverted range": (["--trials", "2", "--param", "head_lr=float:0.1:0.01"],
                       "search space: head_lr: low 0.1 must be below high 0.01"),
    "log of zero": (["--trials", "2", "--param", "warmup_ratio=float:0:0.2:log"],
                    "search space: warmup_ratio: a log range needs low > 0, got 0.0"),
    "one choice": (["--trials", "2", "--param", "r=choice:16"], "search space: r: needs at least two distinct choices"),
    "unknown field": (["--trials", "2", "--param", "momentum=float:0.1:0.9"], "search space: momentum: not a tunable field"),
    "bad choice": (["--trials", "2", "--param", "distribution=choice:kaiming_uniform,gaussian"],
                   "search space: distribution: 'gaussian' is not one of"),
    "twice": (["--trials", "2", "--param", "lr=float:1e-3:1e-2"], "search space: lr given more than once"),
    "vera option for lora": (["--trials", "2", "--method", "lora", "--param", "train_b=choice:true,false"],
                             "search space: d_initial, train_b: VeRA options, but the method is 'lora'"),
    "lr of head": (["--trials", "2", "--method", "head"], "search space: lr: method 'head' trains the head only"),
    "zero frozen d": (["--trials", "2", "--no-train-d", "--param", "d_initial=choice:0,1"],
                      "train_d=False with d_initial=0 trains nothing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_budgets_and_spaces_fail_clearly_and_write_nothing(tmp_path, capsys, tiny_bert_dir, tiny_task, case):
    flags, message = BAD[case]
    run_dir = tmp_path / "study"
    argv = ["tune", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(run_dir), "--model", tiny_bert_dir,
            "--param", "lr=float:1e-3:5e-2:log", *flags]
    if case == "vera option for lora":
        argv += ["--param", "d_initial=float:1e-3:1"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_empty_space_file_and_spec_syntax(tmp_path):
    empty = tmp_path / "space.json"
    empty.write_text("{}")
    with pytest.raises(SpaceError, match="space.json: the search space is empty"):
        load_space(empty)
    with pytest.raises(SpaceError, match="search space is empty"):
        TuneArgs(TrainArgs(task="csv", data_dir=None, out=str(tmp_path)), (), trials=1)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                "epochs": {"type": "int", "low": 1, "high": 3},
                                "train_b": {"type": "categorical", "choices": [True, False]}}))
    assert load_space(good) == (SearchDim("lr", "float", 1e-4, 1e-2, log=True), SearchDim("epochs", "int", 1, 3),
                                SearchDim("train_b", "categorical", choices=(True, False)))
    assert parse_dim("head-lr=float:1e-3:1e-2:log") == SearchDim("head_lr", "float", 1e-3, 1e-2, log=True)
    assert parse_dim("r=choice:256,1024") == SearchDim("r", "categorical", choices=(256, 1024))
    assert parse_dim("train_d=choice:true,false").choices == (True, False)
    for spec, message in (("lr=1e-3", "expected NAME=float"), ("lr=float:a:b", "bounds must be numbers"),
                          ("epochs=int:1.5:3", "int bounds must be integers"), ("r=choice:8,x", "'x' is not a valid int")):
        with pytest.raises(SpaceError, match=message):
            parse_dim(spec)


def test_ctrl_c_in_a_trial_says_how_to_continue_and_the_rerun_does(tmp_path, capsys, monkeypatch, tiny_bert_dir,
                                                                    tiny_task):
    """Ctrl-C in trial #1: exit 130 with a message that says to rerun the same command (there is no
    --resume for tune), no checkpoint left to suggest one, no Optuna traceback; the rerun continues the
    study with a new trial in place of the failed one."""
    import logging
    import os
    import signal

    from verakit.train import runner

    real_run_loop, calls = runner.run_loop, []

    def ctrl_c_in_second_trial(recipe, config, run_dir, **kw):
        calls.append(run_dir)

        def on_step(info):
            if len(calls) == 2 and info.step == 1:
                os.kill(os.getpid(), signal.SIGINT)

        return real_run_loop(recipe, config, run_dir, on_step=on_step, **kw)

    monkeypatch.setattr(runner, "run_loop", ctrl_c_in_second_trial)
    optuna_records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = optuna_records.append
    logging.getLogger("optuna").addHandler(handler)
    run_dir = tmp_path / "study"
    argv = _cli(run_dir, tiny_bert_dir, tiny_task, "--trials", "2", "--pruner", "none")
    try:
        assert main(argv) == 130
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    err = capsys.readouterr().err
    assert "verakit tune: interrupted during trial 1, which is recorded as failed and not continued" in err
    assert "run the same `verakit tune` command again to continue it" in err
    assert "--resume" not in err and "Traceback" not in err and "Loading weights" not in err
    assert not any("Trial 1 failed" in r.getMessage() for r in optuna_records)
    assert not (run_dir / "trials" / "0001" / "checkpoint").exists()

    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE", "FAIL", "COMPLETE"]


def test_study_creation_prints_no_optuna_info(tmp_path, monkeypatch, tiny_bert_dir, tiny_task):
    """Optuna announces 'A new study created in RDB ...' at INFO; tune's own lines replace it."""
    seen = []
    real = optuna.create_study

    def spy(*args, **kwargs):
        seen.append(optuna.logging.get_verbosity())
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna, "create_study", spy)
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        assert main(_cli(tmp_path / "study", tiny_bert_dir, tiny_task, "--trials", "1")) == 0
    finally:
        optuna.logging.set_verbosity(before)
    assert seen == [optuna.logging.WARNING]


def test_selection_rows_choose_trials_on_carved_rows_and_report_dev_once(tmp_path, capsys, tiny_bert_dir, tiny_task):
    """--selection-rows: trials are scored (and pruned) on rows carved from the training set, the baseline is
    computed on those rows, and the best trial's dev score, never used to choose, is reported beside it."""
    from verakit.train.classify.data import carve_selection, load_task
    from verakit.train.classify.metrics import trivial_baseline

    run_dir = tmp_path / "held"
    assert main(_cli(run_dir, tiny_bert_dir, tiny_task, "--trials", "2", "--selection-rows", "16")) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]
    assert summary["split"] == "held-out (16 training rows)"
    m = json.loads((tmp_path / "held" / "trials" / f"{best['number']:04d}" / "metrics.json").read_text())
    assert best["value"] == m["metric"]["accuracy"] and best["dev"] == m["dev"] and m["n_eval"] == 16
    data = load_task("csv", tiny_task, max_train_samples=64)
    carved = carve_selection(data.train, 16, 0)[1]
    assert summary["baseline"] == trivial_baseline(data.spec, [e.label for e in carved])
    # dev's own floor, not the carved rows' (their majority shares differ)
    dev_floor = trivial_baseline(data.spec, [e.label for e in data.dev])["accuracy"]
    assert best["dev_baseline"]["accuracy"] == dev_floor
    assert f"best held-out accuracy {best['value']:.4f}" in out
    assert f"dev accuracy {best['dev']['accuracy']:.4f} (scored once; trivial baseline {dev_floor:.4f})" in out
    report = (run_dir / "report.md").read_text()
    assert "objective: best held-out (16 training rows) `accuracy`" in report
    assert (f"Dev, scored once by its adapter (never used to choose): **accuracy = {best['dev']['accuracy']:.4f}** "
            f"(trivial baseline on dev {dev_floor:.4f})") in report
    assert "| # | state | held-out accuracy |" in report and "optimistic" not in report

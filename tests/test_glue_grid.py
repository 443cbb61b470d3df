"""experiments/glue_grid.py's logic without training anything: the command lines (read back by
`verakit train`'s own parser), the cell order, the learning-rate choice, the bootstrap and the
report (status, --until, pauses: test_glue_grid_time.py), on fake RUN_DIRs holding only metrics.json. The grid itself never runs in tests or CI."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pytest

from glue_grid_fixtures import write_metrics  # the fixtures: tests/conftest.py's pytest_plugins

REPO = Path(__file__).resolve().parents[1]


def _resolved(args: list[str]):
    """TrainArgs as `verakit train` would build them from `args` (parsed by its real parser, then resolved)."""
    from verakit.cli.common import fields_of
    from verakit.cli.train import add_parsers
    from verakit.train.classify import TrainArgs

    sub = argparse.ArgumentParser().add_subparsers()
    add_parsers(sub)
    ns = sub.choices["train"].parse_args(args)
    return TrainArgs(**fields_of(TrainArgs, ns)).resolved()


def test_seeds_commands_train_the_full_set_at_the_table_budget(grid, tmp_path):
    cell = grid.Cell("seeds", "rte", "vera-256", 2, "5e-2")
    args = grid.command(cell, "vera", tmp_path)
    a = _resolved(args)
    assert (a.task, a.method, a.r, a.head, a.lr, a.head_lr, a.seed) == ("rte", "vera", 256, "vera", 5e-2, 4e-3, 2)
    assert (a.epochs, a.batch_size, a.max_length) == (grid.EPOCHS["rte"], 32, 128)
    assert a.max_train_samples is None and a.max_eval_samples is None  # every training row, the whole dev set
    assert a.data_dir == str(grid.GLUE / "RTE")
    assert a.out == str(tmp_path / "head-vera" / "seeds" / "rte-vera-256-lr5e-2-s2")
    p = _resolved(grid.command(grid.Cell("seeds", "cola", "peft-vera-1024", 0, "1e-1"), "full", tmp_path))
    assert (p.method, p.r, p.head, p.lr, p.epochs) == ("peft-vera", 1024, "full", 0.1, grid.EPOCHS["cola"])
    lora = _resolved(grid.command(grid.Cell("seeds", "stsb", "lora-8", 1, "2e-3"), "vera", tmp_path))
    assert (lora.method, lora.r, lora.head, lora.lr) == ("lora", 8, "vera", 2e-3)
    dv = _resolved(grid.command(grid.Cell("seeds", "mrpc", "dvora-1024", 0, "5e-2"), "vera", tmp_path))
    assert (dv.method, dv.r, dv.magnitude, dv.head, dv.lr) == ("vera", 1024, True, "vera", 5e-2)
    assert not lora.magnitude


def test_head_only_is_the_vera_head_alone_or_method_head(grid, tmp_path):
    v = _resolved(grid.command(grid.Cell("seeds", "mrpc", "head", 0, "2e-2"), "vera", tmp_path))
    assert (v.method, v.target_modules, v.head, v.lr, v.head_lr) == ("vera", ("pooler.dense",), "vera", 2e-2, 4e-3)
    f = _resolved(grid.command(grid.Cell("seeds", "mrpc", "head", 0, "2e-3"), "full", tmp_path))
    assert (f.method, f.head, f.head_lr) == ("head", "full", 2e-3)  # the swept rate is the head's
    assert grid.lrs("head", "full") == grid.HEAD_FULL_LRS and grid.lrs("head", "vera") == grid.VERA_LRS


def test_sweep_commands_use_the_carved_split_and_their_budget(grid, tmp_path, fake_carve):
    s = _resolved(grid.command(grid.Cell("sweep", "sst2", "lora-8", 0, "1e-3"), "vera", tmp_path))
    assert (s.data_dir, s.max_train_samples, s.epochs, s.seed) == (str(tmp_path / "data" / "SST-2"), 20_000, 1, 0)
    m = _resolved(grid.command(grid.Cell("sweep", "mrpc", "vera-1024", 0, "1e-2"), "vera", tmp_path))
    assert (m.data_dir, m.max_train_samples, m.epochs) == (str(tmp_path / "data" / "MRPC"), None, 10)
    cells = grid.sweep_cells(list(grid.METHODS), "vera")
    assert len(cells) == 2 * sum(len(grid.lrs(x, "vera")) for x in grid.METHODS)
    assert {(c.task, c.method) for c in cells[:2 * len(grid.METHODS)]} == {(t, x) for t in ("sst2", "mrpc") for x in grid.METHODS}


def test_lr_choice_is_the_best_mean_of_the_held_out_scores(grid, tmp_path):
    scores = {"1e-3": (0.80, 0.70), "2e-3": (0.90, 0.60), "5e-3": (0.85, 0.72), "1e-2": (0.50, 0.50)}
    for i, (lr, (sst2, mrpc)) in enumerate(scores.items()):
        write_metrics(grid, grid.Cell("sweep", "sst2", "lora-8", 0, lr), "vera", tmp_path, sst2)
        if i < 3:  # the last MRPC cell comes below
            write_metrics(grid, grid.Cell("sweep", "mrpc", "lora-8", 0, lr), "vera", tmp_path, mrpc, main="f1")
    assert grid.choose_lr("lora-8", "vera", tmp_path) is None  # unfinished sweep: no choice yet
    cells = grid.seed_cells(["lora-8", "vera-256"], ["sst2"], [0], "vera", tmp_path)
    assert [c.lr for c in cells] == [grid.PENDING, grid.PENDING]
    write_metrics(grid, grid.Cell("sweep", "mrpc", "lora-8", 0, "1e-2"), "vera", tmp_path, 0.5, main="f1")
    assert grid.choose_lr("lora-8", "vera", tmp_path) == "5e-3"  # mean 0.785 beats 0.75 and 0.75
    assert grid.choose_lr("lora-8", "full", tmp_path) is None  # another head: another sweep
    cells = grid.seed_cells(["lora-8"], ["sst2", "rte"], [0, 1], "vera", tmp_path)
    assert [(c.seed, c.task, c.lr) for c in cells] == [(0, "sst2", "5e-3"), (0, "rte", "5e-3"), (1, "sst2", "5e-3"),
                                                        (1, "rte", "5e-3")]  # seed-major


def test_edge_rule_sweeps_past_an_edge_best_then_chooses(grid, tmp_path):
    """A best at the lowest rate adds the ladder's next lower rate (both sweep tasks), the choice waits for it,
    and the rule stops after EXTEND_MAX rates even if the best is still at the edge; an inside best adds none."""
    def sweep(method, scores):
        for lr, v in scores.items():
            for t in ("sst2", "mrpc"):
                write_metrics(grid, grid.Cell("sweep", t, method, 0, lr), "vera", tmp_path, v,
                               main="f1" if t == "mrpc" else "accuracy")

    sweep("vera-256", {"1e-2": 0.86, "2e-2": 0.85, "5e-2": 0.84, "1e-1": 0.80})  # best at the lowest rate
    assert grid.lrs("vera-256", "vera") == grid.VERA_LRS  # without results: the base rates
    assert grid.lrs("vera-256", "vera", tmp_path) == ("5e-3", *grid.VERA_LRS)
    assert grid.choose_lr("vera-256", "vera", tmp_path) is None  # waits for 5e-3
    todo = [c for c in grid.sweep_cells(["vera-256"], "vera", tmp_path) if grid.read_metrics(c, "vera", tmp_path) is None]
    assert sorted((c.task, c.lr) for c in todo) == [("mrpc", "5e-3"), ("sst2", "5e-3")]
    sweep("vera-256", {"5e-3": 0.87})  # better again: one more below, then the cap
    assert grid.lrs("vera-256", "vera", tmp_path) == ("2e-3", "5e-3", *grid.VERA_LRS)
    sweep("vera-256", {"2e-3": 0.88})
    assert grid.lrs("vera-256", "vera", tmp_path) == ("2e-3", "5e-3", *grid.VERA_LRS)  # EXTEND_MAX = 2 reached
    assert grid.choose_lr("vera-256", "vera", tmp_path) == "2e-3"
    sweep("lora-8", {"1e-3": 0.80, "2e-3": 0.80, "5e-3": 0.85, "1e-2": 0.90})  # best at the highest rate
    assert grid.lrs("lora-8", "vera", tmp_path) == (*grid.METHODS["lora-8"][2], "2e-2")
    sweep("lora-8", {"2e-2": 0.70})  # worse: 1e-2 is now inside
    assert grid.choose_lr("lora-8", "vera", tmp_path) == "1e-2"
    sweep("vera-1024", {"1e-2": 0.85, "2e-2": 0.86, "5e-2": 0.84, "1e-1": 0.80})  # inside from the start
    assert grid.lrs("vera-1024", "vera", tmp_path) == grid.VERA_LRS
    assert grid.choose_lr("vera-1024", "vera", tmp_path) == "2e-2"
    assert grid.lrs("head", "full", tmp_path) == grid.HEAD_FULL_LRS  # nothing measured: nothing added


def test_bootstrap_interval(grid, rep):
    assert rep.bootstrap_ci([1.5, 1.5, 1.5]) == (1.5, 1.5)
    lo, hi = rep.bootstrap_ci([0.0, 1.0, 2.0])
    assert 0.0 <= lo < 1.0 < hi <= 2.0
    assert (lo, hi) == rep.bootstrap_ci([0.0, 1.0, 2.0])  # seeded
    lo, hi = rep.bootstrap_ci([2.0, 3.0, 2.5, 3.5])
    assert 2.0 <= lo and hi <= 3.5 and lo < 2.75 < hi


def test_report_writes_results_json_table_and_plot(grid, tmp_path, capsys, fake_carve):
    root = tmp_path / "runs"
    for method, best in (("vera-256", "2e-2"), ("lora-8", "2e-3")):
        for lr in grid.lrs(method, "vera"):
            for t in ("sst2", "mrpc"):
                write_metrics(grid, grid.Cell("sweep", t, method, 0, lr), "vera", root, 0.8 if lr == best else 0.7)
    values = {"vera-256": (0.90, 0.91, 0.89), "lora-8": (0.88, 0.90, 0.90)}
    for method, lr in (("vera-256", "2e-2"), ("lora-8", "2e-3")):
        for seed, v in enumerate(values[method]):
            write_metrics(grid, grid.Cell("seeds", "sst2", method, seed, lr), "vera", root, v, seconds=10.0 + seed,
                           params=6912 if method == "vera-256" else 18432, baseline=0.509)
    out, png = tmp_path / "results.json", tmp_path / "grid.png"
    grid.main(["report", "--root", str(root), "--json", str(out), "--plot", str(png), "--tasks", "sst2",
               "--methods", "vera-256", "lora-8"])
    records = json.loads(out.read_text())
    assert len(records) == 16 + 6  # every finished cell: 2 methods x 4 rates x 2 tasks swept, 2 x 3 seeds
    seeds = [r for r in records if r["stage"] == "seeds"]
    r = next(r for r in seeds if r["method"] == "vera-256" and r["seed"] == 1)
    assert r == {"stage": "seeds", "task": "sst2", "method": "vera-256", "verakit_method": "vera", "rank": 256,
                 "head": "vera", "seed": 1, "lr": 0.02, "metric": "accuracy", "value": 0.91, "last_epoch_value": 0.9,
                 "baseline": 0.509, "other_metrics": {"f1": 0.455}, "other_baselines": {"f1": 0.25}, "best_epoch": 1.0,
                 "epochs": grid.EPOCHS["sst2"], "adapter_params": 6912, "head_params": 770, "file_bytes": 5000, "train_seconds": 11.0, "paused_seconds": 0.0,
                 "command": r["command"], "cpu": None}  # fake cells: no NAME.cpu
    assert r["command"].startswith("verakit train --task sst2 --data-dir ") and "--r 256 --lr 2e-2" in r["command"]
    assert png.stat().st_size > 0
    text = capsys.readouterr().out
    assert "Processors: 22 cells on the first machine (processor not recorded; cells before 2026-12-06)." in text
    assert "| sst2 (accuracy, 50.9) | vera-256 | 0.02 | 90.00 | 89.00-91.00 | 3 | 89.00 | 6,912 | 5,000 | 11 |" in text
    assert "| vera-256 - lora-8 | +0.67 [-1.00, +2.00] (n=3) | +0.67 over 1 |" in text  # +2, +1, -1 points
    assert f"| sst2 | accuracy | 50.9 | 90.00 (n=3) | >= 55.9 | yes | 1 of {grid.EPOCHS['sst2']} |" in text


def test_budget_check_applies_issue_16s_bar(grid, rep):
    def rec(task, metric, value, baseline, method="lora-8", seed=0, **extra):
        return {"stage": "seeds", "task": task, "method": method, "metric": metric, "value": value,
                "baseline": baseline, "seed": seed, **extra}

    acc = {"other_baselines": {"accuracy": 0.684}, "epochs": 10}
    records = [rec("mrpc", "f1", 0.85, 0.812, other_metrics={"accuracy": 0.77}, best_epoch=3.0, **acc),
               rec("mrpc", "f1", 0.87, 0.812, seed=1, other_metrics={"accuracy": 0.79}, best_epoch=4.0, **acc),
               rec("rte", "accuracy", 0.60, 0.527), rec("stsb", "pearson", 0.49, 0.0),
               rec("sst2", "accuracy", 0.52, 0.509, other_metrics={"f1": 0.53}, other_baselines={"f1": 0.51}),
               rec("cola", "matthews_correlation", 0.30, 0.0), rec("cola", "matthews_correlation", 0.9, 0.0, "vera-256")]
    text = rep.budget_check(records, ["mrpc", "rte", "stsb", "cola", "sst2", "qnli"])
    # median F1 86.0 < 86.2: the main metric misses; accuracy (median 78.0) clears 68.4 + 5; best epochs 3 and 4
    # of a 10-epoch budget: training had peaked before the budget ended
    assert "| mrpc | f1 | 81.2 | 86.00 (n=2) | >= 86.2 | **no**; on accuracy: yes (78.0 vs trivial 68.4) | 3.5 of 10 |" in text
    assert "| rte | accuracy | 52.7 | 60.00 (n=1) | >= 57.7 | yes | - |" in text
    assert "| stsb | pearson | 0.0 | 49.00 (n=1) | >= 50 | **no** | - |" in text  # Pearson's own bar, not baseline + 5
    assert "| cola | matthews_correlation | 0.0 | 30.00 (n=1) | >= 5.0 | yes | - |" in text  # other methods ignored
    assert "| sst2 | accuracy | 50.9 | 52.00 (n=1) | >= 55.9 | **no**; on f1: no (53.0 vs trivial 51.0) | - |" in text
    assert "| qnli | | | not yet measured | | | |" in text


def test_run_skips_finished_cells_and_runs_this_checkouts_code(grid, tmp_path, monkeypatch):
    started = []

    class FakeProc:
        returncode = 0

        def __init__(self, argv, stdout, stderr, env, start_new_session):
            started.append((argv, env))

        def poll(self):
            return 0

    monkeypatch.setattr(grid.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(grid.time, "sleep", lambda s: None)
    done = grid.Cell("seeds", "rte", "lora-8", 0, "2e-3")
    todo = grid.Cell("seeds", "rte", "lora-8", 1, "2e-3")
    write_metrics(grid, done, "vera", tmp_path, 0.6)
    stale = grid.run_dir(todo, "vera", tmp_path)
    stale.mkdir(parents=True)
    (stale / "partial").write_text("interrupted")
    grid.run_cells([done, todo], "vera", tmp_path, jobs=2)
    assert len(started) == 1
    argv, env = started[0]
    assert argv[:4] == [sys.executable, "-m", "verakit.cli", "train"] and "--seed" in argv and argv[argv.index("--seed") + 1] == "1"
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONPATH"].split(":")[0] == str(REPO / "src")
    assert not stale.exists()  # an interrupted cell restarts from nothing
    assert (stale.parent / f"{todo.name}.cmd").read_text().startswith("verakit train --task rte ")
    assert (stale.parent / f"{todo.name}.cpu").read_text() == grid.cpu_name() + "\n"


def test_run_resumes_checkpointed_cells_and_stops_them_on_sigterm(grid, tmp_path, monkeypatch):
    """A RUN_DIR holding checkpoint/ continues with --resume (its files and NAME.cmd kept); SIGTERM to the
    runner starts nothing more, SIGINTs the running cells (so `verakit train` checkpoints) and exits."""
    import signal

    started, signalled = [], []

    class FakeProc:
        returncode = None

        def __init__(self, argv, stdout, stderr, env, start_new_session):
            assert start_new_session  # a terminal's Ctrl-C must reach the runner alone
            started.append((argv, env))
            self.index = len(started) - 1

        def poll(self):
            return self.returncode

        def send_signal(self, sig):
            signalled.append((self.index, sig))
            self.returncode = 130

    def sleep(seconds):  # the first wait of the loop: the session ends
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    monkeypatch.setattr(grid.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(grid.time, "sleep", sleep)
    cells = [grid.Cell("seeds", "rte", "lora-8", s, "2e-3") for s in range(3)]
    paused = grid.run_dir(cells[0], "vera", tmp_path)
    (paused / "checkpoint").mkdir(parents=True)
    (paused.parent / f"{cells[0].name}.cmd").write_text("verakit train (as first started)\n")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="stopped by signal 15; running cells checkpointed"):
        grid.run_cells(cells, "vera", tmp_path, jobs=2, code=tmp_path / "wt")
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert len(started) == 2 and signalled == [(0, signal.SIGINT), (1, signal.SIGINT)]  # the third never started
    (argv0, env), (argv1, _) = started
    assert argv0[-1] == "--resume" and "--resume" not in argv1
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path / "wt" / "src")
    assert (paused / "checkpoint").is_dir()  # kept for --resume
    assert (paused.parent / f"{cells[0].name}.cmd").read_text() == "verakit train (as first started)\n"


def test_commands_are_the_ones_the_grid_started_with(grid, fake_carve):
    """Golden: the commands the grid's first cells ran (their NAME.cmd files, 2026-12-05). The runner of a
    later commit drives the grid's commit (--code), so the commands it builds must not drift."""
    root = Path("/work/runs_glue_grid")
    got = {c: shlex.join(["verakit", "train", *grid.command(c, "vera", root)]) for c in (
        grid.Cell("sweep", "mrpc", "dvora-1024", 0, "1e-2"), grid.Cell("sweep", "sst2", "lora-8", 0, "1e-3"),
        grid.Cell("sweep", "sst2", "head", 0, "1e-2"))}
    tail = "--budget paper --epochs {} --batch-size 32 --max-length 128 --seed 0 --group-by-length --mixed-precision bf16 --quiet"
    assert list(got.values()) == [
        "verakit train --task mrpc --data-dir /work/runs_glue_grid/data/MRPC --out /work/runs_glue_grid/head-vera/sweep/"
        "mrpc-dvora-1024-lr1e-2-s0 --method vera --magnitude --head vera --r 1024 --lr 1e-2 --head-lr 0.004 "
        + tail.format(10),
        "verakit train --task sst2 --data-dir /work/runs_glue_grid/data/SST-2 --max-train-samples 20000 --out "
        "/work/runs_glue_grid/head-vera/sweep/sst2-lora-8-lr1e-3-s0 --method lora --head vera --r 8 --lr 1e-3 "
        "--head-lr 0.004 " + tail.format(1),
        "verakit train --task sst2 --data-dir /work/runs_glue_grid/data/SST-2 --max-train-samples 20000 --out "
        "/work/runs_glue_grid/head-vera/sweep/sst2-head-lr1e-2-s0 --method vera --target-modules pooler.dense "
        "--head vera --r 1024 --lr 1e-2 --head-lr 0.004 " + tail.format(1),
    ]


def test_report_sweep_table_progress_and_results_md(grid, tmp_path, capsys, fake_carve):
    root = tmp_path / "runs"
    for lr in grid.lrs("vera-256", "vera"):
        for t in ("sst2", "mrpc"):
            write_metrics(grid, grid.Cell("sweep", t, "vera-256", 0, lr), "vera", root, 0.8 if lr == "5e-2" else 0.7)
    write_metrics(grid, grid.Cell("sweep", "sst2", "lora-8", 0, "1e-3"), "vera", root, 0.75)
    md = tmp_path / "results.md"
    md.write_text("# Results\n\n## GLUE at learnable budgets: the grid (issue 16)\n\nold\n\n## Vision\n\nkept\n")
    grid.main(["report", "--root", str(root), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "g.png"),
               "--methods", "vera-256", "lora-8", "--results-md", str(md)])
    text = capsys.readouterr().out
    assert "Cells measured: sweep 9/16, seeds 0/30 (**partial**;" in text
    assert "| vera-256 | 1e-2: 70.0, 2e-2: 70.0, **5e-2: 80.0**, 1e-1: 70.0 | 1e-2: 70.0, 2e-2: 70.0, **5e-2: 80.0**, " \
           "1e-1: 70.0 | 5e-2 |" in text
    assert "| lora-8 | 1e-3: 75.0 | - | sweep unfinished |" in text
    out = md.read_text()
    assert out.startswith("# Results\n\n## GLUE at learnable budgets: the grid (issue 16)\n\nall-MiniLM-L6-v2")
    assert "old" not in out and out.endswith("## Vision\n\nkept\n") and "| vera-256 |" in out


def test_goal_check_reads_issue_16s_goals(rep):
    def rec(task, method, seed, value, params, baseline=0.5):
        return {"stage": "seeds", "task": task, "method": method, "seed": seed, "value": value,
                "adapter_params": params, "metric": "accuracy", "baseline": baseline}

    records = []
    for s, (v, lo, pv) in enumerate([(0.80, 0.82, 0.81), (0.81, 0.82, 0.82), (0.79, 0.80, 0.80)]):
        records += [rec("sst2", "vera-256", s, v, 8_320), rec("sst2", "lora-8", s, lo, 79_872),
                    rec("sst2", "peft-vera-256", s, pv, 8_320)]
    records += [rec("mrpc", "vera-256", 0, 0.90, 8_320), rec("mrpc", "lora-8", 0, 0.90, 79_872)]
    text = rep.goal_check(records, ["sst2", "mrpc"])
    # sst2: -2, -1, -1 (mean -1.33); mrpc: 0 -> -0.67 over the two tasks; 79,872 / 8,320 = 9.6x
    assert "- vera-256 - lora-8: -0.67 points averaged over the tasks, with 9.6x fewer adapter parameters: " \
           "goal (>= -1.0 at >= 6x) met." in text
    # against PEFT VeRA: -1, -1, -1 on sst2: the interval [-1, -1] lies under 0
    assert "- vera-256 against peft-vera-256 on 1 task(s): below beyond seed noise on sst2." in text
    assert "vera-1024" not in text  # nothing measured for it
    text = rep.goal_check(records, ["sst2", "mrpc", "rte"])
    assert "(on 2 of 3 tasks so far)" in text and "met so far." in text
    assert rep.goal_check([], ["sst2"]) == "- not yet measured"
    # a task LoRA does not learn (55.0 < 52.7 + 5) counts in the mean over the tasks, and a second mean leaves it out
    records += [rec("rte", "vera-256", 0, 0.50, 8_320, 0.527), rec("rte", "lora-8", 0, 0.55, 79_872, 0.527)]
    assert rep.learned_tasks(records, ["sst2", "mrpc", "rte"]) == ["sst2", "mrpc"]
    text = rep.goal_check(records, ["sst2", "mrpc", "rte"])
    # (-1.33 + 0 - 5) / 3 = -2.11; without rte: -0.67
    assert ("- vera-256 - lora-8: -2.11 points averaged over the tasks, with 9.6x fewer adapter parameters: goal "
            "(>= -1.0 at >= 6x) **not met**. Over the tasks LoRA learns at their budget (sst2, mrpc): -0.67, goal met.") in text


def test_dvora_check_looks_where_vera_trails_lora(rep):
    def rec(task, method, seed, value):
        return {"stage": "seeds", "task": task, "method": method, "seed": seed, "value": value}

    records = []
    for s in range(3):
        records += [rec("mrpc", "vera-1024", s, 0.85), rec("mrpc", "lora-8", s, 0.87), rec("mrpc", "dvora-1024", s, 0.86 + 0.01 * s),
                    rec("sst2", "vera-1024", s, 0.90), rec("sst2", "lora-8", s, 0.89)]
    text = rep.dvora_check(records, ["sst2", "mrpc", "rte"])
    assert "- vera-1024 trails lora-8 on: mrpc; level or ahead on: sst2." in text
    # dvora - vera: +1, +2, +3 (mean +2); dvora - lora: -1, 0, +1 (mean 0)
    assert "- mrpc (vera-1024 - lora-8 -2.00): dvora-1024 - vera-1024 +2.00 [" in text
    assert "dvora-1024 - lora-8 +0.00 [" in text and "sst2 (" not in text
    assert rep.dvora_check([], ["sst2"]) == "- not yet measured"

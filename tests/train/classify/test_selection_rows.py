"""`verakit train --selection-rows N`: the checkpoint is chosen on N rows carved from the training rows, and dev
is scored once by the chosen adapter, so the reported dev figure carries no selection bias."""

from __future__ import annotations

import json

import pytest

from verakit.cli import main
from verakit.train.classify import TrainArgs, evaluate_classifier, train_classifier
from verakit.train.classify.data import carve_selection, load_task
from verakit.train.classify.metrics import trivial_baseline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_carve_is_seeded_disjoint_and_in_file_order(tiny_task):
    train = load_task("csv", tiny_task).train
    rest, carved = carve_selection(train, 10, seed=3)
    assert len(carved) == 10 and len(rest) == len(train) - 10
    assert set(rest).isdisjoint(carved) and set(rest) | set(carved) == set(train)
    assert list(carved) == [e for e in train if e in set(carved)]  # file order kept
    assert carve_selection(train, 10, seed=3) == (rest, carved)
    assert carve_selection(train, 10, seed=4)[1] != carved
    for bad in (0, len(train), True, 2.5):
        with pytest.raises(ValueError, match=f"--selection-rows must be between 1 and {len(train) - 1}"):
            carve_selection(train, bad, seed=0)


def test_training_chooses_on_carved_rows_and_scores_dev_once(tmp_path, tiny_bert_dir, tiny_task):
    out = tmp_path / "run"
    args = TrainArgs(task="csv", data_dir=str(tiny_task), out=str(out), model=tiny_bert_dir, r=64, epochs=4,
                     batch_size=16, lr=1e-2, head_lr=1e-2, selection_rows=24, quiet=True)
    m = train_classifier(args)
    data = load_task("csv", tiny_task)
    assert (m["n_train"], m["n_eval"], m["n_dev"]) == (len(data.train) - 24, 24, len(data.dev))
    assert m["eval_split"] == "held-out (24 training rows)"
    # the saved adapter is the best held-out evaluation; its dev score is what `verakit eval` reproduces
    assert m["metric"] == max((h["metrics"] for h in m["epochs"][1:]), key=lambda x: x["accuracy"])
    assert m["dev"] == evaluate_classifier(out / "adapter.safetensors")["metric"]
    assert json.loads((out / "metrics.json").read_text())["dev"] == m["dev"]
    report = (out / "report.md").read_text()
    assert f"Best held-out **accuracy = {m['metric']['accuracy']:.4f}**" in report
    floor = trivial_baseline(data.spec, [e.label for e in data.dev])
    assert m["dev_baseline"] == floor  # dev's own floor (a held-out run's "baseline" is the carved rows')
    assert (f"dev, scored once by that adapter: **accuracy = {m['dev']['accuracy']:.4f}** ({len(data.dev):,} rows; "
            f"trivial baseline on dev {floor['accuracy']:.4f})") in report
    assert "## Held-out scores" in report


def test_cli_prints_both_and_refuses_where_not_wired(tmp_path, tiny_bert_dir, tiny_task, capsys):
    base = ["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--r", "16",
            "--epochs", "1", "--batch-size", "16", "--quiet"]
    argv = [*base, "--selection-rows", "16"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    line = capsys.readouterr().out
    assert "csv vera: best held-out accuracy " in line and ", dev accuracy " in line
    assert "(scored once; trivial baseline 0." in line
    assert main(["train", "--task", "e2e", "--data-dir", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--selection-rows", "8"]) == 2
    assert "--selection-rows is wired for text classification only" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "c"), "--group-column", "text"]) == 2
    assert "--selection-rows is not wired for --group-column" in capsys.readouterr().err
    assert main([*base, "--selection-rows", "-1", "--out", str(tmp_path / "d")]) == 2
    assert "--selection-rows must be a non-negative int (0: choose on dev), got -1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

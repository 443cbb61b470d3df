"""experiments/cnn_cifar.py (its report in cnn_cifar_report.py) and experiments/embed_minilm.py without
training anything: the data split, the cell order, BatchNorm kept frozen while training, the reports on
fake run folders holding only metrics.json (a reload mismatch must show), and results_section.py's
section replacement. The experiments themselves never run in tests or CI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import load_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cnn():
    yield load_experiment("cnn_cifar")
    sys.modules.pop("cnn_cifar", None)


@pytest.fixture(scope="module")
def helpers():
    yield load_experiment("results_section")
    sys.modules.pop("results_section", None)


@pytest.fixture(scope="module")
def report(cnn, helpers):
    yield load_experiment("cnn_cifar_report")
    sys.modules.pop("cnn_cifar_report", None)


@pytest.fixture(scope="module")
def embed(helpers):
    yield load_experiment("embed_minilm")
    sys.modules.pop("embed_minilm", None)


def test_members_split_classes_and_labels(cnn):
    names = ["train/", "train/dog/", "train/dog/0001.jpg", "train/dog/0000.jpg", "train/cat/0000.jpg",
             "test/truck/0000.jpg", "test/airplane/0000.jpg", "README.txt", "other/dog/0000.jpg"]
    got = cnn.members(names, cnn.ADAPT_CLASSES)
    assert got == {"train": [("train/dog/0000.jpg", 0), ("train/dog/0001.jpg", 0)], "test": [("test/truck/0000.jpg", 4)]}
    assert not set(cnn.PRETRAIN_CLASSES) & set(cnn.ADAPT_CLASSES)


def test_cells_are_seed_major_and_extra_runs_once(cnn):
    got = cnn.cells([0, 1], ["shots10", "full"], ["vera", "head", "vera-bntrain"])
    assert got == [("shots10", "vera", 0), ("shots10", "head", 0), ("full", "vera", 0), ("full", "head", 0),
                   ("full", "vera-bntrain", 0), ("shots10", "vera", 1), ("shots10", "head", 1),
                   ("full", "vera", 1), ("full", "head", 1)]


def test_shots_take_k_per_class(cnn):
    import torch

    labels = torch.tensor([0, 1, 2] * 10)
    idx = cnn.shots(labels, 2, seed=3)
    assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(idx, cnn.shots(labels, 2, seed=3))  # the seed fixes the shots
    assert sorted(cnn.shots(labels, None, seed=3).tolist()) == list(range(30))


def test_train_mode_keeps_batchnorm_statistics(cnn):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    cnn.train_mode(model)
    before = model[1].running_mean.clone()
    model(torch.randn(8, 3, 6, 6) + 5.0)
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, before)
    cnn.train_mode(model, bn_train=True)  # the library recipe's behaviour: statistics move
    model(torch.randn(8, 3, 6, 6) + 5.0)
    assert not torch.equal(model[1].running_mean, before)


def _cell(regime, method, seed, acc, reloaded=None, **kw):
    return {"regime": regime, "method": method, "seed": seed, "final_accuracy": acc,
            "reloaded_accuracy": acc if reloaded is None else reloaded, "adapter_params": kw.get("params", 5952),
            "head_params": 2565, "artifact_bytes": kw.get("bytes", 38860), "train_seconds": 100.0 + seed}


def test_cnn_report_on_fake_runs(cnn, report, tmp_path):
    for row in (_cell("full", "vera", 1, 0.70), _cell("full", "vera", 0, 0.60), _cell("full", "vera", 2, 0.80),
                _cell("full", "vera-bntrain", 0, 0.75, reloaded=0.50)):
        out = tmp_path / "adapt" / f"{row['regime']}-{row['method']}-s{row['seed']}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(row))
    text = report.section(None, report.load_cells(tmp_path))
    lines = text.splitlines()
    assert lines[0] == cnn.SECTION
    assert "| full | vera | 0, 1, 2 | 0.700 (0.600-0.800) | 0.600, 0.700, 0.800 | yes | 5,952 | 2,565 | 38,860 | 101 |" in lines
    assert "| full | vera-bntrain | 0 | 0.750 | 0.750 | no: 0.500 | 5,952 | 2,565 | 38,860 | 100 |" in lines
    assert "| shots10 | lora | 0 | not yet measured | | | | | | |" in lines
    assert not any(line.startswith("| shots10 | vera-bntrain") for line in lines)  # runs at full only
    assert not any(line.startswith(("Through the CLI", "Seconds per training step")) for line in lines)
    assert "Reading (runs of 2026-12-05):" in lines  # every seed of the grid is there
    assert not any(line.startswith("* full, mean difference") for line in lines)  # no pair measured yet
    rows = [_cell("full", "vera", 0, 0.60), _cell("full", "vera", 1, 0.70), _cell("full", "head", 1, 0.65),
            _cell("full", "head", 0, 0.50), _cell("full", "lora", 0, 0.55)]
    assert report.paired(rows) == ["* full, mean difference in points, paired by seed: vera − head +7.5 (seeds: +10.0, "
                                   "+5.0); lora − head +5.0 (seeds: +5.0); vera − lora +5.0 (seeds: +5.0)."]
    check = {"command": "verakit train X", "eval_command": "verakit eval Y", "best_epoch": 7.0, "recorded_accuracy": 0.5,
             "eval_accuracy": 0.4, "adapter_params": 5952, "head_params": 2565, "adapter_bytes": 39036}
    steps = {"seconds_per_step": {"vera": 0.15, "lora": 0.07, "head": 0.02}}
    text = report.section(None, report.load_cells(tmp_path), check, steps)
    assert ("Seconds per training step at batch 32, one thread, least of 15 (`python experiments/cnn_cifar.py "
            "steptime`): vera 0.150, lora 0.070, head 0.020.") in text.splitlines()
    assert ("Through the CLI (`python experiments/cnn_cifar.py cli-check`): `verakit train X` recorded test accuracy "
            "0.500 for its best epoch (7), and `verakit eval Y` scores the saved file 0.400 (5,952 adapter + 2,565 "
            "head parameters, 39,036 B).") in text.splitlines()


def test_replace_section_keeps_other_sections(helpers):
    old = "# Results\n\nintro\n\n## A\n\na text\n\n## B\n\nb text\n"
    new = helpers.replace_section(old, "## A", "## A\n\nnew a\n")
    assert new == "# Results\n\nintro\n\n## A\n\nnew a\n\n## B\n\nb text\n"
    assert helpers.replace_section(new, "## A", "## A\n\nnew a\n") == new  # idempotent
    added = helpers.replace_section(old, "## C", "## C\n\nc\n")
    assert added == old + "\n## C\n\nc\n"
    last = helpers.replace_section(old, "## B", "## B\n\nnew b")
    assert last == "# Results\n\nintro\n\n## A\n\na text\n\n## B\n\nnew b\n"


def test_embed_cells_subset_and_report(embed, tmp_path):
    assert embed.cells([0, 1], ["head", "vera-emb"]) == [("head", 0), ("vera-emb", 0), ("head", 1), ("vera-emb", 1)]
    drawn = embed.subset(100, 10, seed=5)
    assert len(set(drawn)) == 10 and drawn == embed.subset(100, 10, seed=5) and drawn != embed.subset(100, 10, seed=6)
    rows = []
    for method, seed, acc, reloaded in (("head", 0, 0.80, 0.80), ("head", 1, 0.78, 0.78),
                                        ("vera-emb", 0, 0.81, 0.81), ("vera-emb", 1, 0.79, 0.70)):
        rows.append({"method": method, "seed": seed, "accuracy": acc, "reloaded_accuracy": reloaded,
                     "adapter_params": 640 if method != "head" else 0, "adapter_bytes": 3480 if method != "head" else 0,
                     "head_bytes": 3216, "train_seconds": 50.0})
    lines = embed.section(rows).splitlines()
    assert lines[0] == embed.SECTION
    assert "| head | 0, 1 | 0.7900 (0.7800-0.8000) | 0.8000, 0.7800 | yes | 0 | 0 | 50 |" in lines
    assert "| vera-emb | 0, 1 | 0.8000 (0.7900-0.8100) | 0.8100, 0.7900 | no: 0.8100, 0.7000 | 640 | 3,480 | 50 |" in lines
    assert "* vera-emb − head, paired by seed: +1.00 points on average (seeds: +1.00, +1.00)." in lines
    assert "| lora-emb | 0 | not yet measured | | | | | |" in lines
    assert "Reading (runs of 2026-12-05):" not in lines  # written for the full grid only

"""`verakit train --head`: a VeRA head trains, saves only the output layer and evaluates the same; a head
the base checkpoint lacks falls back to (or refuses) "vera"; recipes without a text head refuse --head."""

from __future__ import annotations

import json

import pytest
import torch

from verakit.cli import main
from verakit.fileformat import read_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vera_head_trains_saves_only_the_output_layer_and_evaluates_the_same(tmp_path, capsys, tiny_bert_dir,
                                                                              tiny_task):
    out = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--out", str(out),
                 "--head", "vera", "--r", "32", "--epochs", "8", "--batch-size", "16", "--lr", "1e-2", "--head-lr", "1e-2",
                 "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["head"] == "vera"
    adapter = read_adapter(out / "adapter.safetensors")
    assert set(adapter.saved) == {"classifier.weight", "classifier.bias"}
    assert "bert.pooler.dense" in adapter.modules
    assert m["head_params"] == 32 * 2 + 2  # the tiny model's classifier: hidden 32 -> 2 labels
    # d (r) and b (hidden) for query and value in 2 layers, plus the pooler's pair
    assert m["trainable_params"] == 5 * (32 + 32)
    # it learns: above the majority share (0.5), and the loss falls (this head reaches 0.56-0.60 over seeds
    # and batch orders on the tiny task, so a higher bar would test the seed)
    assert m["metric"]["accuracy"] > 0.5
    losses = m["step_losses"]
    assert sum(losses[-6:]) < 0.9 * sum(losses[:6])
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == m["metric"]


def _roberta_without_head(tmp_path):
    """A saved RobertaModel: its classifier.dense and out_proj are 'newly initialized' in a classifier."""
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    torch.manual_seed(0)
    folder = tmp_path / "roberta"
    RobertaModel(RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=40)).save_pretrained(folder)
    model, info = RobertaForSequenceClassification.from_pretrained(folder, num_labels=2, output_loading_info=True)
    return model, tuple(info["missing_keys"])


def test_a_head_layer_missing_from_the_checkpoint_refuses_vera_or_falls_back(tmp_path, monkeypatch):
    from verakit.train import classify
    from verakit.train.classify import TrainArgs, resolve_head

    model, missing = _roberta_without_head(tmp_path)
    assert "classifier.dense.weight" in missing
    args = TrainArgs(task="csv", data_dir=None, out="x", head="vera").resolved()
    with pytest.raises(ValueError, match=r"--head vera: .*classifier\.dense are not in the base checkpoint"):
        resolve_head(args, model, missing)
    monkeypatch.setitem(classify.DEFAULT_HEAD, "vera", "vera")
    assert resolve_head(TrainArgs(task="csv", data_dir=None, out="x").resolved(), model, missing).head == "full"
    assert resolve_head(TrainArgs(task="csv", data_dir=None, out="x").resolved(), model, ()).head == "vera"


def test_head_vera_is_refused_for_methods_that_train_the_head_in_full():
    from verakit.train.classify import TrainArgs

    for method in ("full", "head"):
        with pytest.raises(ValueError, match=f"the method '{method}' trains"):
            TrainArgs(task="csv", data_dir=None, out="x", method=method, head="vera").resolved()


@pytest.mark.parametrize("task", ["e2e", "images"])
def test_recipes_without_a_text_head_refuse_head(task, tmp_path, capsys):
    assert main(["train", "--task", task, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--head", "vera"]) == 2
    assert "--head" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_base_head_of_another_label_count_is_replaced(tmp_path, tiny_bert_dir, tiny_task):
    """tiny_bert_dir is a saved 2-label classifier: a 3-class or a regression task on it was transformers'
    RuntimeError traceback (mismatched sizes). Its head is now a fresh one, as for a base without a head,
    and the run evaluates to the same number afterwards."""
    from verakit.train.classify import evaluate_classifier

    for name, labels in (("three", ("neg", "pos", "neu")), ("scores", ("0.5", "1.5", "2.25"))):
        data = tmp_path / name
        data.mkdir()
        for split in ("train", "dev"):
            rows = (tiny_task / f"{split}.csv").read_text().splitlines()
            out = [rows[0]] + [f"{r.rpartition(',')[0]},{labels[i % 3]}" for i, r in enumerate(rows[1:])]
            (data / f"{split}.csv").write_text("\n".join(out) + "\n")
        run = tmp_path / f"run-{name}"
        assert main(["train", "--task", "csv", "--data-dir", str(data), "--model", tiny_bert_dir, "--out", str(run),
                     "--r", "8", "--epochs", "1", "--batch-size", "16", "--quiet"]) == 0
        m = json.loads((run / "metrics.json").read_text())
        assert m["head_params"] == 32 * (1 if name == "scores" else 3) + (1 if name == "scores" else 3)
        assert evaluate_classifier(run / "adapter.safetensors")["metric"] == m["metric"]

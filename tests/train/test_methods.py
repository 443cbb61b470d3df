"""Each method (vera, lora via PEFT, full, head) end to end on a tiny random BERT: which parameters
train and how they are counted, what RUN_DIR holds, and that evaluating the saved artifact reproduces
the metric that selected it."""

from __future__ import annotations

import json

import pytest
import torch

from verakit.train.artifacts import ArtifactError, load_artifact, read_artifact_info
from verakit.train.classify import TrainArgs, evaluate_classifier, train_classifier

HIDDEN, LAYERS, LABELS = 32, 2, 2
HEAD = (HIDDEN * HIDDEN + HIDDEN) + (LABELS * HIDDEN + LABELS)  # pooler.dense + classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp_path, tiny_bert_dir, tiny_task, method, **kw):
    # The same full head for every method, so the counts below differ only by method (vera's default VeRA
    # head, with only the classifier saved, is tested in classify/test_heads.py).
    kw.setdefault("head", "full")
    args = TrainArgs(task="csv", data_dir=str(tiny_task), out=str(tmp_path / method), model=tiny_bert_dir,
                     method=method, epochs=8, batch_size=16, lr=1e-2 if method != "full" else 1e-3, head_lr=1e-2,
                     quiet=True, **kw)
    return train_classifier(args)


# adapter parameter counts, from the method's definition (targets: query and value of 2 layers)
EXPECTED_ADAPTER = {
    "vera": LAYERS * 2 * (64 + HIDDEN),  # r=64: d (r) + b (d_out) per adapted module
    "lora": LAYERS * 2 * (8 * HIDDEN + HIDDEN * 8),  # r=8: A (r x d_in) + B (d_out x r)
    "head": 0,
}
ARTIFACT = {"vera": "adapter.safetensors", "lora": "adapter", "full": "trained.safetensors", "head": "trained.safetensors"}


@pytest.mark.parametrize("method", ["vera", "lora", "full", "head"])
def test_method_trains_saves_and_eval_reproduces(tmp_path, tiny_bert_dir, tiny_task, method):
    r = {"vera": 64, "lora": 8}.get(method)
    m = _train(tmp_path, tiny_bert_dir, tiny_task, method, r=r)
    run = tmp_path / method
    assert {"task", "method", "metric", "trainable_params", "head_params", "adapter_bytes", "train_seconds",
            "epochs"} <= set(m)
    assert m == json.loads((run / "metrics.json").read_text())
    assert m["head_params"] == HEAD
    if method == "full":
        from transformers import AutoModelForSequenceClassification

        total = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).parameters())
        assert m["trainable_params"] == total - HEAD
    else:
        assert m["trainable_params"] == EXPECTED_ADAPTER[method]
    artifact = run / ARTIFACT[method]
    assert m["artifact"] == ARTIFACT[method]
    size = (artifact / "adapter_model.safetensors" if method == "lora" else artifact).stat().st_size
    assert m["adapter_bytes"] == size
    # 8 epoch-end evaluations after step 0's (before training, never the saved one): the metric is the
    # first best trained evaluation.
    assert len(m["epochs"]) == 9 and m["epochs"][0]["step"] == 0
    assert m["metric"] == max((h["metrics"] for h in m["epochs"][1:]), key=lambda x: x["accuracy"])
    # The task is learnable: a broken method would stay at chance (0.5 on the balanced dev set).
    assert m["metric"]["accuracy"] >= 0.6, m["epochs"]
    assert {p.name for p in run.iterdir()} == {ARTIFACT[method], "config.json", "metrics.json", "report.md", "curve.png"}
    again = evaluate_classifier(artifact)
    assert again["metric"] == m["metric"] and again["n_eval"] == 48


def test_vera_head_is_trained_separately_and_saved(tmp_path, tiny_bert_dir, tiny_task):
    from verakit import read_adapter

    m = _train(tmp_path, tiny_bert_dir, tiny_task, "vera", r=64)
    ad = read_adapter(tmp_path / "vera" / "adapter.safetensors")
    assert sum(t.numel() for t in (*ad.d.values(), *ad.b.values())) == m["trainable_params"]
    assert sum(t.numel() for t in ad.saved.values()) == m["head_params"]
    assert sorted(ad.saved) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    assert ad.extra["labels"] == ["neg", "pos"] and ad.extra["method"] == "vera"
    assert ad.extra["text_pair"] is False  # the server refuses pairs for it (tests/serve/test_app_truncation.py)
    assert all(bool((b != 0).any()) for b in ad.b.values())  # b starts at 0: it trained
    cfg = json.loads((tmp_path / "vera" / "config.json").read_text())
    assert cfg["args"]["lr"] == 1e-2 and cfg["args"]["head_lr"] == 1e-2 and cfg["method"]["r"] == 64


def test_lora_is_peft_with_the_same_head(tmp_path, tiny_bert_dir, tiny_task):
    _train(tmp_path, tiny_bert_dir, tiny_task, "lora", r=8)
    cfg = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["query", "value"]
    assert {"classifier", "pooler"} <= set(cfg["modules_to_save"])
    run_cfg = json.loads((tmp_path / "lora" / "config.json").read_text())["method"]
    # PEFT appends its SEQ_CLS defaults ("classifier", "score") to the list it was given: listed once each
    assert run_cfg["modules_to_save"] == sorted(set(run_cfg["modules_to_save"])) and "pooler" in run_cfg["modules_to_save"]


def test_full_and_head_artifacts_round_trip(tmp_path, tiny_bert_dir, tiny_task):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    _train(tmp_path, tiny_bert_dir, tiny_task, "head")
    path = tmp_path / "head" / "trained.safetensors"
    saved = load_file(path)
    assert sorted(saved) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    loaded = load_artifact(path, base)
    for k, t in saved.items():
        assert torch.equal(loaded.get_parameter(k), t)
    assert read_artifact_info(path)["method"] == "head"


def test_artifact_errors_name_the_path(tmp_path):
    with pytest.raises(ArtifactError, match="no such adapter"):
        read_artifact_info(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="junk.safetensors"):
        read_artifact_info(junk)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ArtifactError, match="not a verakit LoRA run folder"):
        read_artifact_info(tmp_path / "folder")


def test_a_peft_vera_folder_is_pointed_to_convert(tmp_path):
    # What PEFT's save_pretrained writes for VeRA: verakit cannot read it as a run artifact directly.
    folder = tmp_path / "peft-vera"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "VERA", "r": 256}')
    with pytest.raises(ArtifactError) as err:
        read_artifact_info(folder)
    assert str(err.value) == (f"{folder}: a PEFT VeRA folder, not a verakit artifact; convert it first with "
                              f"`verakit convert from-peft {folder} ADAPTER.safetensors`")


def test_a_pair_task_records_its_inputs_are_pairs(tmp_path, tiny_bert_dir):
    from verakit import read_adapter

    data = tmp_path / "pairs"
    data.mkdir()
    rows = "".join(f"good {i},fine {i},pos\nbad {i},poor {i},neg\n" for i in range(8))
    for split in ("train", "dev"):
        (data / f"{split}.csv").write_text("text,text_pair,label\n" + rows)
    train_classifier(TrainArgs(task="csv", data_dir=str(data), out=str(tmp_path / "run"), model=tiny_bert_dir,
                               epochs=1, batch_size=16, r=8, quiet=True))
    assert read_adapter(tmp_path / "run" / "adapter.safetensors").extra["text_pair"] is True

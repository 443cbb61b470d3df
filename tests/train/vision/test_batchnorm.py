"""A frozen base's BatchNorm layers stay in eval mode while adapters train (train.loop.train_mode): their
running statistics belong to the base and no adapter file carries them."""

from __future__ import annotations

import json

import pytest
import torch

from image_helpers import write_images
from verakit import VeraConfig, attach
from verakit.cli import main
from verakit.train.loop import train_mode


def _resnet(num_labels: int = 3):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=num_labels,
                       id2label={0: "blue", 1: "green", 2: "red"}, label2id={"blue": 0, "green": 1, "red": 2})
    return ResNetForImageClassification(cfg)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    model = attach(_resnet(), VeraConfig(r=4, target_modules="all-conv"))
    norms = _norms(model)
    assert len(norms) >= 5 and all(not p.requires_grad for m in norms for p in m.parameters())
    before = [m.running_mean.clone() for m in norms]
    train_mode(model)
    assert all(not m.training for m in norms)
    assert model.training and model.classifier.training  # everything else trains (dropout etc.)
    model(pixel_values=torch.randn(4, 3, 16, 16) * 3 + 1)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))


def test_trainable_batchnorm_trains():
    model = _resnet()  # full fine-tuning: the norms' weight and bias train, so do their statistics
    norms = _norms(model)
    assert len(norms) >= 5 and all(p.requires_grad for m in norms for p in m.parameters())
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
    train_mode(model)
    assert all(m.training for m in norms)
    model(pixel_values=torch.randn(4, 3, 16, 16) * 3 + 1)  # the frozen test's batch: mean ~1, variance ~9
    for m, (mean, var, seen) in zip(norms, before, strict=True):
        assert int(m.num_batches_tracked) == seen + 1
        assert (m.running_mean - mean).abs().max() > 1e-3 and (m.running_var - var).abs().max() > 1e-3


@pytest.mark.usefixtures("one_thread")
def _resnet_run(tmp_path, capsys, *flags):
    """(model folder, data, RUN_DIR) of `verakit train --task images` on a tiny ResNet's convolutions."""
    from transformers import ViTImageProcessor

    folder = tmp_path / "resnet"
    _resnet().save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    data = write_images(tmp_path / "img", n_train=12, n_test=6)
    run = tmp_path / "run"
    assert main(["train", "--task", "images", "--data-dir", str(data), "--model", str(folder), "--out", str(run),
                 "--target-modules", "all-conv", "--r", "8", "--batch-size", "8", "--lr", "0.05", *flags,
                 "--quiet"]) == 0, capsys.readouterr().err
    return folder, data, run


def test_cli_image_run_on_a_resnet_evaluates_as_recorded(tmp_path, capsys):
    """`verakit train --task images` on a ResNet's convolutions, then `verakit eval` of its file: the same
    metrics (with the statistics drifting in training they differed: 0.576 recorded, 0.568 from the file)."""
    folder, data, run = _resnet_run(tmp_path, capsys, "--epochs", "3")
    recorded = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter.safetensors")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == recorded["metric"] and result["confusion_matrix"] == recorded["confusion_matrix"]


def test_cli_dvora_image_run_on_a_resnet_trains_magnitudes_and_evaluates_as_recorded(tmp_path, capsys):
    """`--magnitude` with `--task images` was refused ("wired for classification tasks only"); DVoRA now adapts
    convolutions too: the file carries one magnitude per output channel of every adapted convolution."""
    from verakit import read_adapter

    folder, data, run = _resnet_run(tmp_path, capsys, "--epochs", "2", "--magnitude")
    adapter = read_adapter(run / "adapter.safetensors")
    assert adapter.config.magnitude and adapter.m and set(adapter.m) == set(adapter.modules)
    assert all(m.shape == (adapter.modules[n][0],) for n, m in adapter.m.items())  # (d_out,) per module
    recorded = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == recorded["metric"]
    assert main(["train", "--task", "images", "--data-dir", str(data), "--model", str(folder), "--out",
                 str(tmp_path / "lora"), "--method", "lora", "--magnitude", "--quiet"]) == 2
    assert "magnitude: VeRA options, but the method is 'lora'" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()

"""`--augment` and `--resume` on the image recipe (docs/vision.md: augmentation is "seeded by the run seed
and restored on `--resume`"): a run with --augment stopped by Ctrl-C mid-epoch and resumed draws the
same flips and shifts as an uninterrupted run, so it ends with the same losses, metrics and adapter."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from image_helpers import save_tiny_vit, write_images
from verakit import read_adapter
from verakit.cli import main
from verakit.train.vision.recipe import ImageRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_augment_is_restored_on_resume(tmp_path, capsys, monkeypatch):
    vit_dir = str(save_tiny_vit(tmp_path / "vit"))
    data = write_images(tmp_path / "data", n_train=4, n_test=2)  # 3 classes: 12 training images

    def train(out: Path, *extra: str) -> int:
        # 12 images, batch 4: 3 steps per epoch, 6 in all; the tiny ViT has no dropout, so augmentation is
        # the only draw from the RNG during training.
        return main(["train", "--task", "images", "--data-dir", str(data), "--model", vit_dir, "--out", str(out),
                     "--r", "16", "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--quiet", *extra])

    assert train(tmp_path / "full", "--augment") == 0, capsys.readouterr().err
    assert train(tmp_path / "plain") == 0, capsys.readouterr().err
    want, plain = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "plain"))
    assert [e["step"] for e in want["epochs"]] == [0, 3, 6]
    # Augmentation changes what is trained on: each epoch's mean training loss differs from a plain run.
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(want["epochs"][1:], plain["epochs"][1:], strict=True))

    loss, steps = ImageRecipe.loss, []

    def ctrl_c_at_step_2(recipe, model, batch):
        steps.append(len(steps) + 1)
        # Mid epoch 1: steps 3 to 6 run after the resume, before either evaluation (steps 3 and 6) whose
        # adapter may be kept, so the saved adapter was trained on resumed augmented batches.
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(recipe, model, batch)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(ImageRecipe, "loss", ctrl_c_at_step_2)
        assert train(run_dir, "--augment") == 130
    before = _files(run_dir)
    assert "checkpoint/state.pt" in before and json.loads(before["config.json"])["args"]["augment"] is True
    capsys.readouterr()
    # The flag is part of the run's settings: resuming without it is refused, naming it, RUN_DIR untouched.
    assert train(run_dir, "--resume") == 2
    assert "--resume with different settings (augment: True -> False)" in capsys.readouterr().err
    assert _files(run_dir) == before

    # Images edited since the run started: the resume is refused by name (the data's fingerprint), RUN_DIR
    # untouched; restored, it goes on.
    edited = data / "train" / "red" / "00.png"
    original = edited.read_bytes()
    from PIL import Image
    Image.new("RGB", (16, 16), (0, 0, 255)).save(edited)
    assert train(run_dir, "--augment", "--resume") == 2
    assert "--resume over other data than the interrupted run's" in capsys.readouterr().err
    assert _files(run_dir) == before
    edited.write_bytes(original)

    assert train(run_dir, "--augment", "--resume") == 0, capsys.readouterr().err
    got = json.loads((run_dir / "metrics.json").read_text())
    assert [e["train_loss"] for e in got["epochs"]] == [e["train_loss"] for e in want["epochs"]]
    assert [e["metrics"] for e in got["epochs"]] == [e["metrics"] for e in want["epochs"]]
    assert (got["metric"], got["best_step"]) == (want["metric"], want["best_step"])
    x, y = read_adapter(run_dir / "adapter.safetensors"), read_adapter(tmp_path / "full" / "adapter.safetensors")
    assert all(torch.equal(x.d[n], y.d[n]) and torch.equal(x.b[n], y.b[n]) for n in y.d)
    assert x.saved and sorted(x.saved) == sorted(y.saved)  # the trained head
    assert all(torch.equal(x.saved[n], y.saved[n]) for n in y.saved)
    assert not (run_dir / "checkpoint").exists()

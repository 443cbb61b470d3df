"""VeRA on image classifiers: attach/merge parity on a ViT (vs a slow reference and vs PEFT), the image
recipe end to end through `verakit train --task images` / `verakit eval`, every method, preprocessing
fallback, head initialisation, augmentation, and bad data at the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import randomize_vectors
from image_helpers import save_tiny_vit, write_images, zip_tree
from verakit import VeraConfig, attach, detach, load_adapter, merge, save_adapter, unmerge, vera_layers
from verakit.cli import main
from verakit.projection import Projection

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> str:
    return str(save_tiny_vit(tmp_path_factory.mktemp("vit") / "model"))


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("colors") / "data", n_train=12, n_test=6)


def _vit(vit_dir: str, classes=("blue", "green", "red")):
    from verakit.train.vision import build_image_classifier

    torch.manual_seed(0)
    return build_image_classifier(vit_dir, classes)


def _logits(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def test_attach_merge_parity_on_vit(vit_dir, tmp_path):
    model, _ = _vit(vit_dir)
    model.eval()
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    base_logits = _logits(model, pixels)
    reference = copy.deepcopy(model)
    cfg = VeraConfig(r=16, seed=3)
    attach(model, cfg)
    layers = vera_layers(model)
    # the paper's targets, query and value, in every layer (transformers 5 spells them q_proj / v_proj)
    assert sorted(n.rsplit(".", 1)[1] for n in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    randomize_vectors(model, seed=2)
    # slow reference: W0 + diag(b) B diag(s d) A written into a plain copy of the model
    proj = Projection(3, "kaiming_uniform", 16, 32, 32)
    with torch.no_grad():
        for name, layer in layers.items():
            w = reference.get_submodule(name).weight
            scale = proj.scale(32, 16)
            w += (layer.vera_b[:, None] * proj.B[:32, :16]) @ ((scale * layer.vera_d)[:, None] * proj.A[:16, :32])
            reference.get_submodule("classifier").load_state_dict(model.classifier.state_dict())
    want = _logits(reference, pixels)
    got = _logits(model, pixels)
    assert (got - want).abs().max() < 1e-5
    assert (got - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    merge(model)
    assert (_logits(model, pixels) - got).abs().max() < 1e-5
    unmerge(model)
    assert (_logits(model, pixels) - got).abs().max() < 1e-5
    # the adapter file round trip on a fresh model
    save_adapter(model, tmp_path / "vit.safetensors")
    fresh, _ = _vit(vit_dir)
    assert torch.equal(_logits(load_adapter(fresh.eval(), tmp_path / "vit.safetensors"), pixels), got)
    detach(model)  # after a merge/unmerge cycle the base weights are restored up to fp32 rounding
    assert (_logits(model, pixels) - base_logits).abs().max() < 1e-6


def test_vit_adapter_matches_peft_vera(vit_dir, tmp_path):
    from peft import PeftModel

    from verakit.fileformat import adapter_from_model
    from verakit.interop import to_peft

    model, _ = _vit(vit_dir)
    attach(model.eval(), VeraConfig(r=16))
    randomize_vectors(model, seed=5)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = to_peft(adapter_from_model(model), tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(_vit(vit_dir)[0].eval(), out).eval()
    assert (_logits(peft_model, pixels) - _logits(model, pixels)).abs().max() < 1e-5


def test_train_and_eval_images_from_the_cli(vit_dir, colors, tmp_path, capsys):
    archive = zip_tree(colors, tmp_path / "colors.zip")
    run = tmp_path / "run"
    rc = main(["train", "--task", "images", "--data-dir", str(archive), "--model", vit_dir, "--out", str(run),
               "--r", "16", "--epochs", "3", "--batch-size", "8", "--lr", "0.02", "--augment", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "images vera: best test accuracy" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["adapter.safetensors", "config.json", "curve.png",
                                                     "metrics.json", "report.md"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["classes"] == ["blue", "green", "red"] and m["n_train"] == 36 and m["n_eval"] == 18
    # colour classes are learnable: well above chance (1/3) after 3 epochs
    assert m["metric"]["accuracy"] >= 0.8
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 18 and cm.trace() / 18 == pytest.approx(m["metric"]["accuracy"])
    assert [m["per_class_accuracy"][c] for c in m["classes"]] == pytest.approx(cm.diagonal() / cm.sum(1))
    assert m["trainable_params"] == 2 * 2 * (16 + 32)  # 2 layers x (q, v) x (d + b)
    assert m["head_params"] == 3 * 32 + 3
    report = (run / "report.md").read_text()
    assert "## Per-class accuracy" in report and "| red | 6 |" in report
    # eval reproduces the selected evaluation exactly, from the run info stored in the adapter
    assert main(["eval", "--adapter", str(run / "adapter.safetensors")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == m["metric"] and result["confusion_matrix"] == m["confusion_matrix"]
    # the same data as a folder scores the same
    assert main(["eval", "--adapter", str(run / "adapter.safetensors"), "--data-dir", str(colors)]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == m["metric"]
    # the merged folder works in transformers' image-classification pipeline as is: the class names as labels,
    # and the same confusion matrix as the run's evaluation over every test image
    from PIL import Image
    from transformers import pipeline

    assert main(["merge", "--adapter", str(run / "adapter.safetensors"), "--out", str(tmp_path / "merged")]) == 0
    files = sorted(p for p in (colors / "test").rglob("*") if p.is_file())
    got = pipeline("image-classification", model=str(tmp_path / "merged"))([Image.open(f).convert("RGB") for f in files])
    piped = np.zeros((3, 3), dtype=int)
    for f, preds in zip(files, got, strict=True):
        piped[m["classes"].index(f.parent.name), m["classes"].index(preds[0]["label"])] += 1
    assert piped.tolist() == m["confusion_matrix"]


def test_baseline_is_the_most_frequent_test_class(vit_dir, tmp_path, capsys):
    """metrics.json "baseline": always answering the most frequent test class scores its share as accuracy
    and 1/3 as mean class accuracy (right on one class of the three, wrong on the others); report.md shows it.
    Test split: blue 5, green 2, red 1 images."""
    data = write_images(tmp_path / "data", n_train=8, n_test=5)
    for cls, keep in (("green", 2), ("red", 1)):
        for path in sorted((data / "test" / cls).iterdir())[keep:]:
            path.unlink()
    run = tmp_path / "run"
    rc = main(["train", "--task", "images", "--data-dir", str(data), "--model", vit_dir, "--out", str(run),
               "--r", "8", "--epochs", "1", "--batch-size", "12", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_eval"] == 8
    assert m["baseline"] == pytest.approx({"accuracy": 5 / 8, "mean_class_accuracy": 1 / 3})
    assert "| trivial baseline (constant prediction: the most frequent class, or the mean score) | - | 0.6250 | " \
           "0.3333 |" in (run / "report.md").read_text()


@pytest.mark.parametrize("method", ["lora", "head", "full"])
def test_other_methods_train_and_reload(vit_dir, colors, tmp_path, method):
    from verakit.train.vision import ImageArgs, evaluate_images, train_images

    m = train_images(ImageArgs(data_dir=str(colors), out=str(tmp_path / method), model=vit_dir, method=method,
                               epochs=1, batch_size=12, shots=4, quiet=True))
    assert m["n_train"] == 12 and m["shots"] == 4
    # full: embeddings 3*16*32 + 32 + 32 + 17*32, per layer 2 LN 128 + q,k,v,o 4*1056 + fc1 2112 + fc2 2080, final LN 64
    assert m["trainable_params"] == {"lora": 2 * 2 * 8 * (32 + 32), "head": 0, "full": 19_296}[method]
    again = evaluate_images(tmp_path / method / m["artifact"])
    assert again["metric"] == m["metric"]


def test_missing_processor_falls_back_to_resize_and_half_normalisation(tmp_path):
    from PIL import Image

    from verakit.train.vision import build_image_classifier

    folder = save_tiny_vit(tmp_path / "bare", processor=False)
    _, processor = build_image_classifier(str(folder), ("a", "b"))
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    got = processor(images=[image], return_tensors="pt")["pixel_values"][0]  # (3, 16, 16)
    resized = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR), dtype=np.float32)
    want = torch.from_numpy((resized / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
    assert got.shape == (3, 16, 16) and (got - want).abs().max() < 1e-5


def test_head_is_new_unless_trained_on_the_same_classes(tmp_path):
    from safetensors.torch import load_file

    from verakit.train.vision import build_image_classifier

    same_size = save_tiny_vit(tmp_path / "other", labels=("cat", "dog"))
    saved = load_file(same_size / "model.safetensors")["classifier.weight"]
    fresh, _ = build_image_classifier(str(same_size), ("car", "ship"))  # same shape, other classes
    assert not torch.equal(fresh.classifier.weight, saved)
    assert not fresh.classifier.bias.detach().any()
    kept, _ = build_image_classifier(str(same_size), ("cat", "dog"))  # the checkpoint's own classes
    assert torch.equal(kept.classifier.weight, saved)
    wider, _ = build_image_classifier(str(same_size), ("a", "b", "c"))  # mismatched size: a new head
    assert wider.classifier.weight.shape == (3, 32) and wider.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_augment_flips_and_shifts_within_bounds():
    import torch.nn.functional as F

    from verakit.train.vision import augment_batch

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    torch.manual_seed(0)
    out = augment_batch(x)
    torch.manual_seed(0)
    assert torch.equal(augment_batch(x), out)  # seeded by torch's global RNG
    for i in range(2):
        padded = [F.pad(v[None], (1, 1, 1, 1), mode="reflect")[0] for v in (x[i], x[i].flip(-1))]
        candidates = [p[:, dy : dy + 8, dx : dx + 8] for p in padded for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_cli_bad_images_fail_cleanly(colors, tmp_path, capsys, vit_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(colors, data)
    (data / "train" / "green" / "03.jpg").write_bytes(b"garbage")
    run = tmp_path / "run"
    rc = main(["train", "--task", "images", "--data-dir", str(data), "--model", vit_dir, "--out", str(run)])
    assert rc == 2
    assert f"{data / 'train' / 'green' / '03.jpg'}: unreadable image" in capsys.readouterr().err
    assert not run.exists()
    assert main(["train", "--task", "images", "--data-dir", str(colors), "--out", str(run)]) == 2
    assert "--task images needs --model" in capsys.readouterr().err
    assert not run.exists()


FAMILY = {  # model_type -> (config class, model class, kwargs) of tiny random image classifiers
    "deit": ("DeiTConfig", "DeiTForImageClassification", {}),
    "beit": ("BeitConfig", "BeitForImageClassification", {}),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", {}),
    "swin": ("SwinConfig", "SwinForImageClassification", {"image_size": 32, "embed_dim": 16, "depths": [1, 1],
                                                          "num_heads": [1, 2], "window_size": 4}),
}


@pytest.mark.parametrize("model_type", list(FAMILY))
def test_default_targets_cover_the_vit_family(model_type):
    """Each family member gets VeRA on query/value by default, the head is saved, and merging is exact."""
    import transformers

    config_cls, model_cls, extra = FAMILY[model_type]
    kw = {"image_size": 16, "patch_size": 4, "num_labels": 3, **extra}
    if model_type != "swin":
        kw |= {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()
    attach(model, VeraConfig(r=8))
    names = list(vera_layers(model))
    assert len(names) == 4 and {n.rsplit(".", 1)[1] for n in names} <= {"q_proj", "v_proj", "query", "value"}
    from verakit.inject import vera_state

    assert vera_state(model).saved_modules == ("classifier",)
    randomize_vectors(model, seed=1)
    side = kw["image_size"]
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    got = _logits(model, pixels)
    merge(model)
    assert (_logits(model, pixels) - got).abs().max() < 1e-5

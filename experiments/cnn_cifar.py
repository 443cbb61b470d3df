"""VeRA vs LoRA vs head-only on the convolutions of a small ResNet, offline (issue 21, Part 1 evidence).

No pretrained CNN installs offline (shared/MODELS.md), so this experiment makes its own backbone, and says
so: a small self-pretrained ResNet on 32x32 CIFAR images, not the paper's setting (the paper adapts no
convolution at all).

1. data:     ../shared/data/cifar10_subset/cifar10_subset.zip (500 train / 100 test JPEGs per class,
             32x32, used at their own size) is read into uint8 tensors for PRETRAIN_CLASSES and
             ADAPT_CLASSES (5 each, disjoint; the same split as experiments/vit_cifar.py).
2. pretrain: a random transformers ResNet (BACKBONE, `ResNetForImageClassification`) trained in full on
             the 2,500 pretraining images; its body (`resnet.*`, BatchNorm statistics included) is cached
             as RUNS/backbone-<key>/body.safetensors, key = hash of config, recipe and data.
3. adapt:    the body with a new 5-class head, trained on the 5 other classes with
             vera (verakit, "all-conv": every nn.Conv2d), lora (PEFT, the same convolutions by name) and
             head, per regime, seeds 0-2 in seed-major order. A cell whose folder has metrics.json is
             skipped, so `run` can be stopped and restarted at will.
4. report:   the `## Convolutions` section of docs/results.md (replaced in place, other sections kept)
             and docs/results_cnn.json.

Why not `verakit train --task images`: that recipe puts the whole model in train mode, so the frozen
base's BatchNorm layers update their running statistics on the adaptation data; those statistics are in
no artifact (VeRA and LoRA files hold vectors and the head), so a reloaded adapter evaluates with the
pretrained statistics and scores differently from the run that saved it. Here every BatchNorm of the
frozen base stays in eval mode while training (`train_mode`), and every cell checks that the saved
artifact, loaded into a fresh backbone, reproduces the final accuracy. The extra method `vera-bntrain`
(seed 0, regime full) measures the gap the library recipe would have.

    python experiments/cnn_cifar.py run [--seeds 0 1 2] [--regimes full shots10] [--methods ...]
    python experiments/cnn_cifar.py cli-check     # the same gap through `verakit train --task images`
    python experiments/cnn_cifar.py steptime      # seconds per training step of each method
    python experiments/cnn_cifar.py report        # cnn_cifar_report.py writes the section
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10_subset" / "cifar10_subset.zip"
RUNS = REPO.parent / "runs_cnn"  # outside the repository
SECTION = "## Convolutions: VeRA on a small ResNet (not the paper's setting)"
PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
ADAPT_CLASSES = ("dog", "frog", "horse", "ship", "truck")
# A ResNet-10-like body: 7x7/2 stem + max pool (32x32 -> 8x8), one basic block per stage, 64..512 channels.
BACKBONE = {"num_channels": 3, "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [1, 1, 1, 1],
            "layer_type": "basic", "hidden_act": "relu"}
PRETRAIN = {"epochs": 30, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "warmup_ratio": 0.05, "seed": 0}
REGIMES = {"shots10": {"shots": 10, "epochs": 25, "batch_size": 10}, "full": {"shots": None, "epochs": 8, "batch_size": 32}}
# method -> (rank, adapter lr, head lr): the CLI's image defaults (train/vision.py IMAGE_DEFAULTS), not tuned.
METHODS = {"vera": (256, 1e-2, 4e-3), "lora": (8, 1e-3, 4e-3), "head": (0, 0.0, 4e-3)}
EXTRA = {"vera-bntrain": ("full", 0)}  # method -> the one (regime, seed) it runs at
WARMUP_RATIO = 0.06


def members(names: list[str], classes: tuple[str, ...]) -> dict[str, list[tuple[str, int]]]:
    """{"train"|"test": [(zip member, label)]} for `classes` (label = position in `classes`), sorted."""
    out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for name in sorted(names):
        parts = name.split("/")
        if len(parts) == 3 and parts[0] in out and parts[2] and parts[1] in classes:
            out[parts[0]].append((name, classes.index(parts[1])))
    return out


def load_split(classes: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """{"train"|"test": (uint8 pixels (N, 3, 32, 32), int64 labels (N,))} of `classes`."""
    import numpy as np
    import torch
    from PIL import Image

    out = {}
    with zipfile.ZipFile(CIFAR) as z:
        for split, rows in members(z.namelist(), classes).items():
            pixels = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n, _ in rows])
            out[split] = (torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                          torch.tensor([y for _, y in rows], dtype=torch.long))
    return out


def cells(seeds: list[int], regimes: list[str], methods: list[str]) -> list[tuple[str, str, int]]:
    """(regime, method, seed) in seed-major order, so a partial grid covers every (regime, method) once;
    the EXTRA methods run only at their own (regime, seed)."""
    out = []
    for seed in seeds:
        for regime in regimes:
            for method in methods:
                if method in EXTRA and EXTRA[method] != (regime, seed):
                    continue
                out.append((regime, method, seed))
    return out


def _normalise(pixels: Any) -> Any:
    return (pixels.float() / 255.0 - 0.5) / 0.5  # (B, 3, H, W), ViT's mean = std = 0.5 convention


def _augment(x: Any, gen: Any) -> Any:
    """Flip left-right with p = 1/2, then shift by up to 4 pixels with reflected borders (the CIFAR recipe)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (n,), generator=gen), torch.randint(0, 9, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_mode(model: Any, bn_train: bool = False) -> None:
    """model.train(), except the BatchNorm layers, which stay in eval mode unless `bn_train`: a frozen
    base's running statistics are part of the base, and no adapter file carries them."""
    from torch import nn

    model.train()
    if not bn_train:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def accuracy(model: Any, data: tuple[Any, Any]) -> float:
    import torch

    model.eval()
    pixels, labels = data
    right = 0
    with torch.no_grad():
        for i in range(0, len(labels), 250):
            logits = model(pixel_values=_normalise(pixels[i : i + 250])).logits  # (B, K)
            right += int((logits.argmax(-1) == labels[i : i + 250]).sum())
    return right / len(labels)


def fit(model: Any, groups: list[dict], data: tuple[Any, Any], epochs: int, batch_size: int, seed: int,
        weight_decay: float, warmup_ratio: float, bn_train: bool, evaluate: Any) -> list[dict]:
    """AdamW with linear warmup and decay (as verakit's loop); one evaluation per epoch; returns the history."""
    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    pixels, labels = data
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(labels) // batch_size)
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * steps), steps)
    history, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        train_mode(model, bn_train)
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            logits = model(pixel_values=_augment(_normalise(pixels[idx]), gen)).logits
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append({"epoch": epoch + 1, "train_loss": total / len(labels), "accuracy": evaluate(model),
                        "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  epoch {epoch + 1}: loss {history[-1]['train_loss']:.3f} acc {history[-1]['accuracy']:.3f}", flush=True)
    return history


def _key() -> str:
    h = hashlib.sha256(json.dumps({"backbone": BACKBONE, "recipe": PRETRAIN, "classes": PRETRAIN_CLASSES},
                                  sort_keys=True).encode())
    h.update(hashlib.sha256(CIFAR.read_bytes()).digest())
    return h.hexdigest()[:12]


def new_model(seed: int) -> Any:
    """A ResNet classifier for 5 classes whose head is initialised from `seed` (body random until loaded)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    return ResNetForImageClassification(ResNetConfig(**BACKBONE, num_labels=5))


def pretrain(runs: Path) -> Path:
    """Train the backbone once; return its cached folder (body.safetensors + pretrain.json)."""
    from safetensors.torch import save_file

    target = runs / f"backbone-{_key()}"
    if (target / "pretrain.json").is_file():
        return target
    data = load_split(PRETRAIN_CLASSES)
    model = new_model(PRETRAIN["seed"])
    groups = [{"params": list(model.parameters()), "lr": PRETRAIN["lr"]}]
    history = fit(model, groups, data["train"], PRETRAIN["epochs"], PRETRAIN["batch_size"], PRETRAIN["seed"],
                  PRETRAIN["weight_decay"], PRETRAIN["warmup_ratio"], True, lambda m: accuracy(m, data["test"]))
    target.mkdir(parents=True, exist_ok=True)
    body = {k[len("resnet."):]: v.contiguous() for k, v in model.state_dict().items() if k.startswith("resnet.")}
    save_file(body, str(target / "body.safetensors"))
    info = {"backbone": BACKBONE, "recipe": PRETRAIN, "classes": list(PRETRAIN_CLASSES),
            "params": sum(p.numel() for p in model.resnet.parameters()),
            "body_bytes": (target / "body.safetensors").stat().st_size, "n_train": len(data["train"][1]),
            "n_test": len(data["test"][1]), "final_accuracy": history[-1]["accuracy"],
            "best_accuracy": max(h["accuracy"] for h in history), "train_seconds": history[-1]["seconds"],
            "history": history}
    tmp = target / ".pretrain.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, target / "pretrain.json")  # written last: "the cache is complete"
    return target


def backbone(folder: Path, seed: int) -> Any:
    """new_model(seed) with the cached pretrained body (weights and BatchNorm statistics) loaded."""
    from safetensors.torch import load_file

    model = new_model(seed)
    model.resnet.load_state_dict(load_file(str(folder / "body.safetensors")), strict=True)
    return model


def conv_names(model: Any) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def shots(labels: Any, k: int | None, seed: int) -> Any:
    """Indices of the first k images of each class in a seeded permutation (all indices for k None)."""
    import torch

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    if k is None:
        return order
    return torch.cat([order[labels[order] == c][:k] for c in range(int(labels.max()) + 1)])


def prepare(method: str, model: Any, seed: int) -> tuple[Any, list, list]:
    """(model to train, adapter params, head params) for `method`; everything else frozen."""
    rank = METHODS["vera" if method.startswith("vera") else method][0]
    if method.startswith("vera"):
        from verakit import VeraConfig, attach, trainable_parameters

        attach(model, VeraConfig(r=rank, target_modules="all-conv", seed=seed, d_initial=0.1))
        params = trainable_parameters(model)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                 target_modules=conv_names(model), modules_to_save=["classifier"]))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in params if "classifier" in n]
    adapter = [p for n, p in params if "classifier" not in n]
    return model, adapter, head


def save_and_reload(method: str, model: Any, folder: Path, out: Path, seed: int, test: tuple[Any, Any]) -> tuple[int, float]:
    """(artifact bytes, accuracy of the artifact loaded into a fresh backbone)."""
    if method.startswith("vera"):
        from verakit import load_adapter, save_adapter

        size = save_adapter(model, out / "adapter.safetensors")
        fresh = load_adapter(backbone(folder, seed + 1000), out / "adapter.safetensors")
    elif method == "lora":
        from peft import PeftModel

        model.save_pretrained(str(out / "adapter"))
        size = (out / "adapter" / "adapter_model.safetensors").stat().st_size
        fresh = PeftModel.from_pretrained(backbone(folder, seed + 1000), str(out / "adapter"))
    else:
        from safetensors.torch import load_file, save_file

        save_file({n: p.detach().contiguous() for n, p in model.classifier.named_parameters()}, str(out / "head.safetensors"))
        size = (out / "head.safetensors").stat().st_size
        fresh = backbone(folder, seed + 1000)
        fresh.classifier.load_state_dict(load_file(str(out / "head.safetensors")))
    return size, accuracy(fresh, test)


def run_cell(runs: Path, folder: Path, data: dict, regime: str, method: str, seed: int) -> None:
    out = runs / "adapt" / f"{regime}-{method}-s{seed}"
    if (out / "metrics.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    print(f"+ {regime} {method} seed {seed}", flush=True)
    rg = REGIMES[regime]
    rank, lr, head_lr = METHODS["vera" if method.startswith("vera") else method]
    model, adapter, head = prepare(method, backbone(folder, seed), seed)
    idx = shots(data["train"][1], rg["shots"], seed)
    train = (data["train"][0][idx], data["train"][1][idx])
    groups = [g for g in ({"params": adapter, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]
    history = fit(model, groups, train, rg["epochs"], rg["batch_size"], seed, 0.01, WARMUP_RATIO,
                  method.endswith("bntrain"), lambda m: accuracy(m, data["test"]))
    size, reloaded = save_and_reload(method, model, folder, out, seed, data["test"])
    metrics = {"regime": regime, "method": method, "seed": seed, "rank": rank, "lr": lr, "head_lr": head_lr,
               "adapter_params": sum(p.numel() for p in adapter), "head_params": sum(p.numel() for p in head),
               "artifact_bytes": size, "final_accuracy": history[-1]["accuracy"],
               "best_accuracy": max(h["accuracy"] for h in history), "reloaded_accuracy": reloaded,
               "n_train": len(idx), "n_test": len(data["test"][1]), "train_seconds": history[-1]["seconds"],
               "threads": __import__("torch").get_num_threads(), "history": history}
    (out / ".metrics.json.tmp").write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(out / ".metrics.json.tmp", out / "metrics.json")
    print(f"  final {metrics['final_accuracy']:.3f} reloaded {reloaded:.3f} file {size:,} B", flush=True)


def run(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    t = time.perf_counter()
    folder = pretrain(runs)
    print(f"backbone {folder} ({time.perf_counter() - t:.0f} s)", flush=True)
    data = load_split(ADAPT_CLASSES)
    for regime, method, seed in cells(args.seeds, args.regimes, args.methods):
        run_cell(runs, folder, data, regime, method, seed)


CLI_ARGS = ["--method", "vera", "--target-modules", "all-conv", "--shots", "10", "--epochs", "25", "--batch-size", "10",
            "--augment", "--seed", "0", "--quiet"]


def export_hf(folder: Path) -> Path:
    """The cached backbone as a transformers folder (config, weights, a 32x32 ViT-style image processor with
    mean = std = 0.5, as _normalise) that `verakit train --task images --model` reads."""
    from transformers import ViTImageProcessorPil

    hf = folder / "hf"
    if not (hf / "preprocessor_config.json").is_file():
        tmp = folder / ".hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        backbone(folder, 0).save_pretrained(tmp)
        ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp)
        os.replace(tmp, hf)
    return hf


def adapt_zip(runs: Path) -> Path:
    """The CIFAR subset's JPEG bytes of ADAPT_CLASSES, unchanged, as a zip of the same layout."""
    path = runs / "data" / "adapt.zip"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(CIFAR) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
            for rows in members(src.namelist(), ADAPT_CLASSES).values():
                for name, _ in rows:
                    dst.writestr(name, src.read(name))
        os.replace(tmp, path)
    return path


def cli_check(args: argparse.Namespace) -> None:
    """One `verakit train --task images` VeRA run on the backbone's convolutions, then `verakit eval` of its
    artifact: RUNS/cli/check.json holds the accuracy the run recorded and the one its file gives back."""
    runs = Path(args.runs)
    hf, data = export_hf(pretrain(runs)), adapt_zip(runs)
    out = runs / "cli" / "shots10-vera-s0"
    verakit = [sys.executable, "-m", "verakit.cli"]
    train = [*verakit, "train", "--task", "images", "--data-dir", str(data), "--model", str(hf), "--out", str(out), *CLI_ARGS]
    if not (out / "metrics.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        print("+", " ".join(train), flush=True)
        subprocess.run(train, check=True)
    evaluate = [*verakit, "eval", "--adapter", str(out / "adapter.safetensors")]
    scored = json.loads(subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout)
    m = json.loads((out / "metrics.json").read_text())
    check = {"command": "verakit train --task images --data-dir adapt.zip --model BACKBONE_HF --out RUN " + " ".join(CLI_ARGS),
             "eval_command": "verakit eval --adapter RUN/adapter.safetensors", "best_epoch": m["best_epoch"],
             "recorded_accuracy": m["metric"]["accuracy"], "eval_accuracy": scored["metric"]["accuracy"],
             "adapter_params": m["trainable_params"], "head_params": m["head_params"], "adapter_bytes": m["adapter_bytes"]}
    from results_section import write_atomic

    write_atomic(runs / "cli" / "check.json", json.dumps(check, indent=2) + "\n")
    print(json.dumps(check, indent=2))


def steptime(args: argparse.Namespace) -> None:
    """Seconds per training step (forward, backward, AdamW) of each method at batch 32 on 32x32 inputs, one
    thread: the least of 5 steps after one warm-up, in 3 interleaved rounds; RUNS/steptime.json."""
    import torch
    import torch.nn.functional as F
    from results_section import write_atomic

    torch.set_num_threads(1)
    runs = Path(args.runs)
    folder = pretrain(runs)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    rounds: dict[str, list[float]] = {}
    for _ in range(3):
        for method in METHODS:
            model, adapter, head = prepare(method, backbone(folder, 0), 0)
            train_mode(model)
            opt = torch.optim.AdamW(adapter + head)
            times = []
            for _ in range(6):
                t = time.perf_counter()
                loss = F.cross_entropy(model(pixel_values=x).logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
            rounds.setdefault(method, []).append(min(times[1:]))
    result = {m: round(min(v), 4) for m, v in rounds.items()}
    write_atomic(runs / "steptime.json", json.dumps({"batch": 32, "seconds_per_step": result, "rounds": rounds}, indent=2) + "\n")
    print(json.dumps(result))


def _report(args: argparse.Namespace) -> None:
    from cnn_cifar_report import report  # imports this module's constants

    report(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(RUNS))
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    r.add_argument("--methods", nargs="+", default=[*METHODS, *EXTRA], choices=[*METHODS, *EXTRA])
    r.set_defaults(func=run)
    sub.add_parser("cli-check").set_defaults(func=cli_check)
    sub.add_parser("steptime").set_defaults(func=steptime)
    s = sub.add_parser("report")  # in cnn_cifar_report.py, with the section's Markdown
    s.add_argument("--results", default=str(REPO / "docs" / "results.md"))
    s.add_argument("--json", default=str(REPO / "docs" / "results_cnn.json"))
    s.set_defaults(func=_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())

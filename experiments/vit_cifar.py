"""VeRA vs LoRA vs head-only on images, offline: a small ViT pretrained here, adapted to new classes.

No pretrained vision transformer installs offline (shared/MODELS.md), so this experiment makes its own
backbone, and says so: it is a small self-pretrained ViT, not the paper's ImageNet-21k ViT-B/L.

1. data:     ../shared/data/cifar10_subset/cifar10_subset.zip (500 train / 100 test JPEGs per class) is
             split into two zips of the same layout: PRETRAIN_CLASSES and ADAPT_CLASSES (5 each).
2. pretrain: a random ViT (BACKBONE) trained from scratch on the 2,500 pretraining images with
             `verakit train --task images --method full`; its encoder (no head) is cached under
             `verakit.models.default_cache_dir()/vit-cifar5-<key>`, key = hash of config, recipe and data.
3. adapt:    `verakit train --task images` on the 5 other classes with vera, lora (PEFT) and head,
             at 10 shots per class and with all 2,500 images, seeds 0-2, in seed-major order so that a
             partial grid covers every cell once. A cell whose RUN_DIR has metrics.json is skipped.
4. report:   the `## Vision` section of docs/results.md (replaced in place, other sections kept).

    python experiments/vit_cifar.py pretrain          # ~15 min on a shared 2-core CPU
    python experiments/vit_cifar.py run [--seeds 0 1 2] [--regimes shots10 full]
    python experiments/vit_cifar.py report

With internet, the adaptation command works the same on a hub ViT: --model google/vit-base-patch16-224.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10_subset" / "cifar10_subset.zip"
RUNS = REPO / "runs" / "vit_cifar"
PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
ADAPT_CLASSES = ("dog", "frog", "horse", "ship", "truck")
# ViT for 32x32 images: 8x8 patches of 4x4 pixels + [CLS] = 65 tokens.
BACKBONE = {"image_size": 32, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 6,
            "num_attention_heads": 4, "intermediate_size": 256, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}
PRETRAIN = ["--method", "full", "--epochs", "15", "--batch-size", "64", "--lr", "1e-3", "--head-lr", "1e-3",
            "--warmup-ratio", "0.1", "--augment", "--seed", "0"]
REGIMES = {  # name -> extra arguments
    "shots10": ["--shots", "10", "--epochs", "25", "--batch-size", "10"],
    "full": ["--epochs", "8", "--batch-size", "32"],
}
METHODS = {"vera": ["--r", "256"], "lora": ["--r", "8"], "head": []}


def _env(threads: int) -> dict[str, str]:
    # One thread per process: on a shared 2-core machine, 2 threads per process oversubscribe badly.
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _run(cmd: list[str], threads: int) -> float:
    print("+", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(threads))
    seconds = time.perf_counter() - t
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def split_data(out: Path) -> tuple[Path, Path]:
    """pretrain.zip and adapt.zip: the CIFAR subset's JPEG bytes for each class group, unchanged."""
    out.mkdir(parents=True, exist_ok=True)
    zips = []
    for name, classes in (("pretrain", PRETRAIN_CLASSES), ("adapt", ADAPT_CLASSES)):
        path = out / f"{name}.zip"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            with zipfile.ZipFile(CIFAR) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
                for member in sorted(src.namelist()):
                    parts = member.split("/")
                    if len(parts) == 3 and parts[2] and parts[1] in classes:
                        dst.writestr(member, src.read(member))
            os.replace(tmp, path)
        zips.append(path)
    return zips[0], zips[1]


def _key(pretrain_zip: Path) -> str:
    h = hashlib.sha256(json.dumps({"backbone": BACKBONE, "recipe": PRETRAIN}, sort_keys=True).encode())
    h.update(hashlib.sha256(pretrain_zip.read_bytes()).digest())
    return h.hexdigest()[:12]


def backbone_dir() -> Path:
    from verakit.models import default_cache_dir

    pretrain_zip, _ = split_data(RUNS / "data")
    return default_cache_dir() / f"vit-cifar5-{_key(pretrain_zip)}"


def pretrain(args: argparse.Namespace) -> Path:
    """Train the backbone once; return its cached folder (ViTModel encoder + image processor + info)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    pretrain_zip, _ = split_data(RUNS / "data")
    target = backbone_dir()
    if (target / "pretrain.json").is_file():
        print(f"cached backbone: {target}")
        return target
    init = RUNS / "init"
    if not (init / "config.json").is_file():
        torch.manual_seed(0)
        ViTForImageClassification(ViTConfig(**BACKBONE, num_labels=len(PRETRAIN_CLASSES))).save_pretrained(init)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(init)
    run = RUNS / "pretrain"
    if not (run / "metrics.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        _run(["verakit", "train", "--task", "images", "--data-dir", str(pretrain_zip), "--model", str(init),
              "--out", str(run), *PRETRAIN, "--quiet"], args.threads)
    from verakit.train.artifacts import load_artifact
    from verakit.train.vision import build_image_classifier

    metrics = json.loads((run / "metrics.json").read_text())
    model, processor = build_image_classifier(str(init), PRETRAIN_CLASSES)
    model = load_artifact(run / "trained.safetensors", model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    model.vit.save_pretrained(tmp)  # the encoder only: adapting models get a new head
    processor.save_pretrained(tmp)
    info = {
        "backbone": BACKBONE,
        "params": sum(p.numel() for p in model.vit.parameters()),
        "state_bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
        "pretrain_classes": list(PRETRAIN_CLASSES),
        "n_train": metrics["n_train"], "n_eval": metrics["n_eval"],
        "epochs": len(metrics["epochs"]), "best_epoch": metrics["best_epoch"],
        "best_accuracy": metrics["metric"]["accuracy"], "final_accuracy": metrics["final_metric"]["accuracy"],
        "train_seconds": metrics["train_seconds"], "threads": metrics["environment"]["threads"],
        "command": "verakit train --task images --data-dir PRETRAIN_ZIP --model INIT --out RUN " + " ".join(PRETRAIN),
    }
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")  # written last: "the cache is complete"
    tmp.chmod(0o755)
    os.replace(tmp, target)
    print(json.dumps(info, indent=2))
    return target


def run(args: argparse.Namespace) -> None:
    _, adapt_zip = split_data(RUNS / "data")
    backbone = pretrain(args)
    for seed in args.seeds:
        for regime in args.regimes:
            for method in args.methods:
                out = RUNS / "adapt" / f"{regime}-{method}-s{seed}"
                if (out / "metrics.json").is_file():
                    continue
                shutil.rmtree(out, ignore_errors=True)  # an interrupted cell starts again
                _run(["verakit", "train", "--task", "images", "--data-dir", str(adapt_zip), "--model", str(backbone),
                      "--out", str(out), "--method", method, *METHODS[method], *REGIMES[regime], "--augment",
                      "--seed", str(seed), "--quiet"], args.threads)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _paired(cells: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Per regime, last-epoch accuracy differences between methods, paired by seed (a seed fixes the shots,
    the head's initialisation and the data order for every method)."""
    out = []
    for regime in REGIMES:
        by_method = {m: {r["seed"]: r["final_metric"]["accuracy"] for r in cells.get((regime, m), [])} for m in METHODS}
        parts = []
        for a, b in (("vera", "head"), ("lora", "head"), ("vera", "lora")):
            seeds = sorted(set(by_method[a]) & set(by_method[b]))
            if seeds:
                diffs = [100 * (by_method[a][s] - by_method[b][s]) for s in seeds]
                spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
                shown = ", ".join(f"{d:+.1f}" for d in diffs)
                parts.append(f"{a} − {b} {statistics.mean(diffs):+.1f}{spread} points (seeds: {shown})")
        if parts:
            out.append(f"* {regime}, paired by seed: " + "; ".join(parts) + ".")
    return out


def section() -> str:
    """The Markdown of the `## Vision` section, from the cached backbone info and the finished runs."""
    info = json.loads((backbone_dir() / "pretrain.json").read_text())
    cells: dict[tuple[str, str], list[dict]] = {}
    for path in sorted((RUNS / "adapt").glob("*/metrics.json")):
        m = json.loads(path.read_text())
        m["seed"] = json.loads((path.parent / "config.json").read_text())["args"]["seed"]
        cells.setdefault((path.parent.name.split("-")[0], m["method"]), []).append(m)
    b = info["backbone"]
    lines = [
        "## Vision",
        "",
        "**A small self-pretrained backbone, not the paper's setting.** No pretrained ViT installs offline, so "
        "`experiments/vit_cifar.py` pretrains one from scratch on five CIFAR-10 classes and adapts it to the "
        "five others; the paper adapts ImageNet-21k ViT-B/L (86M/304M parameters) on CIFAR-100, Food-101, "
        "Flowers-102 and RESISC45. Absolute accuracies here say nothing about those; the comparison between "
        "methods at an equal budget on the same backbone is the point.",
        "",
        f"* Data: `../shared/data/cifar10_subset` (32x32 JPEGs, 500 train / 100 test per class). Pretraining "
        f"classes {', '.join(PRETRAIN_CLASSES)}; adaptation classes {', '.join(ADAPT_CLASSES)} (disjoint).",
        f"* Backbone: ViT, patch {b['patch_size']}, hidden {b['hidden_size']}, {b['num_hidden_layers']} layers, "
        f"{b['num_attention_heads']} heads, MLP {b['intermediate_size']}: {info['params']:,} parameters, "
        f"{info['state_bytes']:,} bytes of fp32 state. Pretrained with `{info['command']}` "
        f"({info['n_train']:,} images, {info['epochs']} epochs, flips + shifts, {info['train_seconds'] / 60:.1f} min "
        f"at {info['threads']} thread): test accuracy on the 5 pretraining classes {info['final_accuracy']:.3f} "
        f"after the last epoch (best {info['best_accuracy']:.3f}, epoch {info['best_epoch']:.0f}).",
        "* Adaptation: `verakit train --task images --data-dir adapt.zip --model BACKBONE --method M --seed S "
        "--augment` plus, per regime, " + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in REGIMES.items())
        + "; VeRA `--r 256` (lr 1e-2), LoRA (PEFT) `--r 8` alpha 8 (lr 1e-3), head lr 4e-3 for every method "
        "(the CLI defaults, not tuned). Query and value are adapted in all 6 layers; the new 5-class head "
        "trains in every method and is counted apart.",
        "* Accuracy on the 500 test images of the adaptation classes, mean ± sample std over seeds (each seed "
        "also draws its own 10 shots). *Last* is after the final epoch (no selection on the test set); *best* "
        "is the best epoch's, which selects on the test set and is optimistic.",
        "",
        "| regime | method | seeds | last accuracy | best accuracy | adapter params | head params "
        "| adapter tensors (B) | artifact file (B) | wall time (s, mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in REGIMES:
        for method in METHODS:
            ms = sorted(cells.get((regime, method), []), key=lambda m: m["seed"])
            if not ms:
                lines.append(f"| {regime} | {method} | 0 | not yet measured | | | | | | |")
                continue
            last = [m["final_metric"]["accuracy"] for m in ms]
            best = [m["metric"]["accuracy"] for m in ms]
            seeds = ", ".join(str(m["seed"]) for m in ms)
            lines.append(
                f"| {regime} | {method} | {seeds} | {_fmt(last)} | {_fmt(best)} | {ms[0]['trainable_params']:,} "
                f"| {ms[0]['head_params']:,} | {ms[0]['adapter_tensor_bytes']:,} | {ms[0]['adapter_bytes']:,} "
                f"| {statistics.mean(m['train_seconds'] for m in ms):.0f} |"
            )
    lines += ["", *_paired(cells), "",
              "Wall times come from a shared 2-core machine with other jobs running (one thread per process): "
              "compare them within this table only."]
    lines += ["", "Reproduce: `python experiments/vit_cifar.py pretrain && python experiments/vit_cifar.py run "
              "&& python experiments/vit_cifar.py report` (runs in `runs/vit_cifar/`, one thread per process).", ""]
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    """Replace (or append) the `## Vision` section of docs/results.md; other sections stay as they are."""
    path = Path(args.results)
    text = section()
    old = path.read_text() if path.is_file() else "# Results\n"
    lines = old.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Vision"), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join([*lines[:start], *text.rstrip("\n").splitlines(), *([""] + lines[end:] if end < len(lines)
                                                                          else [])]) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("pretrain")
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=pretrain)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(func=run)
    s = sub.add_parser("report")
    s.add_argument("--results", default=str(REPO / "docs" / "results.md"))
    s.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The report of experiments/cnn_cifar.py: the Markdown of its docs/results.md section from the cached
backbone's pretrain.json, the cells' metrics.json and the cli-check's check.json, and docs/results_cnn.json."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cnn_cifar import EXTRA, METHODS, REGIMES, SECTION
from results_section import replace_section, write_atomic

__all__ = ["load_cells", "paired", "section", "report"]


def load_cells(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((runs / "adapt").glob("*/metrics.json"))]


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def paired(rows: list[dict]) -> list[str]:
    """Per regime, final-accuracy differences in points between methods, paired by seed (a seed fixes the
    shots, the head's initialisation, the order and the augmentation for every method)."""
    out = []
    for regime in REGIMES:
        acc = {m: {r["seed"]: r["final_accuracy"] for r in rows if r["regime"] == regime and r["method"] == m}
               for m in METHODS}
        parts = []
        for a, b in (("vera", "head"), ("lora", "head"), ("vera", "lora")):
            seeds = sorted(set(acc[a]) & set(acc[b]))
            if seeds:
                d = [100 * (acc[a][s] - acc[b][s]) for s in seeds]
                parts.append(f"{a} − {b} {statistics.mean(d):+.1f} (seeds: {', '.join(f'{x:+.1f}' for x in d)})")
        if parts:
            out.append(f"* {regime}, mean difference in points, paired by seed: " + "; ".join(parts) + ".")
    return out


# Written by hand from the runs of 2026-12-05 (3 seeds of every cell); re-read it when the cells change.
READING = [
    "Reading (runs of 2026-12-05):",
    "* With all 2,500 images, VeRA on the 12 convolutions is as good as PEFT LoRA on the same layers "
    "(-0.5 points paired, within the seeds' spread) with 22x fewer trained floats (5,952 vs 133,784) and a 14x "
    "smaller file; both beat the head alone by about 4 points on every seed. At 10 images per class no method "
    "separates from the head beyond the seeds' spread.",
    "* VeRA's training step costs about twice LoRA's here (see the step times): `VeraConv` builds the delta "
    "kernel diag(b) B diag(s d) A (C_out x d_in x r multiply-adds per layer) on every training step, which at "
    "r = 256 exceeds the convolutions' own work once the feature maps are 2x2 or 1x1 (the deep stages of a "
    "32x32 ResNet). The factored path (a k x k convolution into r channels, then 1x1) would be cheaper there.",
    "* BatchNorm: a frozen base's running statistics must stay frozen. `vera-bntrain` and the CLI check show the "
    "gap a run with BatchNorm in train mode leaves between the accuracy it records and the accuracy of its saved "
    "file.",
    "* Library: the runs imported verakit from a snapshot of commit f3dda25's src/ (so that edits made by other "
    "sessions meanwhile could not change a run midway). From commit d2cef97 on, a verakit adapter file also "
    "carries 3,176 B of base-weight samples: the `vera` file is 42,036 B at that commit (PEFT's and the head's "
    "files do not change).",
]


def section(info: dict | None, rows: list[dict], check: dict | None = None, steps: dict | None = None) -> str:
    """The Markdown of SECTION from the backbone info (None: not pretrained yet), the finished cells, the
    cli-check result and the step times (None: not run)."""
    lines = [
        SECTION, "",
        "**A small ResNet pretrained here, not the paper's setting** (the VeRA paper adapts no convolution). "
        "`experiments/cnn_cifar.py` pretrains a transformers `ResNetForImageClassification` from scratch on five "
        "CIFAR-10 classes and adapts it to the five others; the images are the subset's 32x32 JPEGs at their own "
        "size (no downscaling). The comparison between methods on one backbone is the point, not the accuracies.", "",
    ]
    if info is not None:
        b = info["backbone"]
        lines.append(
            f"* Backbone: ResNet, 7x7/2 stem + max pool, basic blocks, depths {b['depths']}, widths "
            f"{b['hidden_sizes']}: {info['params']:,} parameters, 12 Conv2d layers, BatchNorm after each. "
            f"Pretrained in full ({info['n_train']:,} images, {info['recipe']['epochs']} epochs, AdamW lr "
            f"{info['recipe']['lr']}, flips + 4-pixel shifts, {info['train_seconds'] / 60:.1f} min at 1 thread): "
            f"test accuracy on its 5 classes {info['final_accuracy']:.3f} (best epoch {info['best_accuracy']:.3f}).")
    lines += [
        "* Adaptation (every BatchNorm of the frozen base kept in eval mode; see below): `vera` = verakit "
        "`VeraConfig(r=256, target_modules=\"all-conv\")` on all 12 convolutions, lr 1e-2; `lora` = PEFT "
        "`LoraConfig(r=8, lora_alpha=8)` on the same 12 convolutions by name, lr 1e-3; `head` = the new linear "
        "head only. The head (512 x 5 + 5) trains at 4e-3 in every method and is counted apart. AdamW (weight "
        "decay 0.01), linear warmup 6% and decay, flips + shifts. Regimes: "
        + "; ".join(f"{k}: {'all 2,500 images' if v['shots'] is None else str(v['shots']) + ' images per class'}, "
                    f"{v['epochs']} epochs, batch {v['batch_size']}" for k, v in REGIMES.items()) + ".",
        "* Accuracy on the 500 test images of the adaptation classes after the last epoch (no selection on the "
        "test set): median over seeds (min-max), per seed in order. *Reloaded* is the saved artifact loaded into a "
        "fresh backbone and evaluated again: \"yes\" when it gives the final accuracy back exactly. *File* is the "
        "artifact on disk: verakit's adapter file, PEFT's adapter_model.safetensors, or the head's tensors; each "
        "holds the head's 2,565 floats.", "",
        "| regime | method | seeds | final accuracy, median (min-max) | per seed | reloaded = final | adapter params "
        "| head params | file (B) | wall time (s, median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in REGIMES:
        for method in [*METHODS, *EXTRA]:
            ms = sorted((r for r in rows if r["regime"] == regime and r["method"] == method), key=lambda r: r["seed"])
            if not ms:
                if method not in EXTRA or EXTRA[method][0] == regime:
                    lines.append(f"| {regime} | {method} | 0 | not yet measured | | | | | | |")
                continue
            acc = [r["final_accuracy"] for r in ms]
            same = all(abs(r["reloaded_accuracy"] - r["final_accuracy"]) < 1e-9 for r in ms)
            reload_txt = "yes" if same else "no: " + ", ".join(f"{r['reloaded_accuracy']:.3f}" for r in ms)
            lines.append(
                f"| {regime} | {method} | {', '.join(str(r['seed']) for r in ms)} | {_stats(acc)} | "
                f"{', '.join(f'{a:.3f}' for a in acc)} | {reload_txt} | {ms[0]['adapter_params']:,} | "
                f"{ms[0]['head_params']:,} | {ms[0]['artifact_bytes']:,} | "
                f"{statistics.median(r['train_seconds'] for r in ms):.0f} |")
    lines += ["", *paired(rows)]
    lines += [
        "", "`vera-bntrain` is `vera` with the BatchNorm layers in train mode, as `verakit train --task images` "
        "ran a model until session 6: the running statistics move to the adaptation data during training and are "
        "in no artifact, so the reloaded adapter scores differently from the run that saved it. Since then "
        "`verakit train` keeps a frozen base's BatchNorm in eval mode (`verakit.train.loop.train_mode`, "
        "tests/train/vision/test_batchnorm.py); the CLI check below ran before that fix.", "",
        *([f"Through the CLI (`python experiments/cnn_cifar.py cli-check`): `{check['command']}` recorded test "
           f"accuracy {check['recorded_accuracy']:.3f} for its best epoch ({check['best_epoch']:.0f}), and "
           f"`{check['eval_command']}` scores the saved file {check['eval_accuracy']:.3f} "
           f"({check['adapter_params']:,} adapter + {check['head_params']:,} head parameters, "
           f"{check['adapter_bytes']:,} B).", ""] if check else []),
        *(["Seconds per training step at batch 32, one thread, least of 15 (`python experiments/cnn_cifar.py "
           "steptime`): " + ", ".join(f"{m} {t:.3f}" for m, t in steps["seconds_per_step"].items()) + ".", ""]
          if steps else []),
        *(READING + [""] if len({r["seed"] for r in rows}) >= 3 else []),
        "Wall times come from a shared 2-core machine with other jobs running (`nice -n 5`, one thread): compare "
        "them within this table only.", "",
        "Reproduce (runs under `../runs_cnn/`, outside the repository" + (
            f"; here pretraining took {info['train_seconds'] / 60:.0f} min and the cells measured so far "
            f"{sum(r['train_seconds'] for r in rows) / 60:.0f} min of training at one thread" if info else "") + "):", "",
        "```",
        "OMP_NUM_THREADS=1 nice -n 5 python experiments/cnn_cifar.py run    # pretrain once, then every cell; resumable",
        "OMP_NUM_THREADS=1 python experiments/cnn_cifar.py cli-check        # one verakit train + verakit eval",
        "OMP_NUM_THREADS=1 python experiments/cnn_cifar.py steptime         # seconds per training step",
        "python experiments/cnn_cifar.py report                            # this section + docs/results_cnn.json",
        "```", "",
    ]
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    found = sorted(runs.glob("backbone-*/pretrain.json"))
    info = json.loads(found[-1].read_text()) if found else None
    rows = load_cells(runs)
    check_path = runs / "cli" / "check.json"
    check = json.loads(check_path.read_text()) if check_path.is_file() else None
    steps_path = runs / "steptime.json"
    steps = json.loads(steps_path.read_text()) if steps_path.is_file() else None
    text = section(info, rows, check, steps)
    path = Path(args.results)
    write_atomic(path, replace_section(path.read_text() if path.is_file() else "# Results\n", SECTION, text))
    slim = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    write_atomic(Path(args.json), json.dumps({"backbone": info and {k: v for k, v in info.items() if k != "history"},
                                              "cells": slim, "cli_check": check, "steptime": steps}, indent=1) + "\n")
    print(text)

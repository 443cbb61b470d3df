"""DVoRA's training-step cost against plain VeRA on the real MiniLM: `verakit train --magnitude` vs without, at
r=256 and r=1024, fp32 and bf16 autocast steps, side by side in one process on real GLUE training rows.

DVoRA's extra work per step is the row norms of W0 + delta in every adapted layer (delta formed without
gradients: d_out x d_in x r multiply-adds per layer, the materialized path's cost) and the per-row rescale of the
output. A step is what the loop does (collate, forward, loss, backward, AdamW), on length-grouped batches as
`verakit train` makes them for classification; each round runs every variant on the same batch positions,
interleaved (this machine has slow phases). Printed: median ms per step and the DVoRA / VeRA ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_dvora.py [--task mrpc] [--ranks 256 1024] [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_train_options import FOLDERS, GLUE, recipe_for

MODES = ("no", "bf16")  # --mixed-precision


def main() -> None:
    from verakit.train.batching import epoch_order
    from verakit.train.loop import adamw, train_mode
    from verakit.train.precision import step_context

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mrpc", choices=list(FOLDERS))
    p.add_argument("--ranks", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--rows", type=int, default=640)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    if not GLUE.is_dir():
        raise SystemExit(f"needs the GLUE folders under {GLUE}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.task}, batch {a.batch}, "
          "q/v + the VeRA head, length-grouped batches")
    variants = {(r, mag): recipe_for(a.task, a.rows, r, mag) for r in a.ranks for mag in (False, True)}
    first = next(iter(variants.values()))
    n, lengths = first.num_train(), first.train_lengths()
    order = epoch_order(n, 0, 0, a.batch, lengths)
    opts = {v: adamw(rec.param_groups(), 0.01) for v, rec in variants.items()}
    for rec in variants.values():
        train_mode(rec.model)
    ms: dict[tuple[int, bool, str], list[float]] = {(*v, mode): [] for v in variants for mode in MODES}
    for rnd in range(a.rounds):
        for mode in MODES:
            for v, rec in variants.items():
                rec.model.set_attn_implementation("eager" if mode == "bf16" else "sdpa")  # as the loop sets it
                t0 = time.perf_counter()
                for s in range(a.steps):
                    k = (rnd * a.steps + s) % (n // a.batch)
                    batch = rec.collate(order[k * a.batch : (k + 1) * a.batch])
                    with step_context(mode, "cpu"):
                        loss, units = rec.loss(rec.model, batch)
                    (loss / units).backward()
                    opts[v].step()
                    opts[v].zero_grad(set_to_none=True)
                ms[(*v, mode)].append((time.perf_counter() - t0) / a.steps * 1e3)
    print("\n| r | steps | VeRA ms/step | DVoRA ms/step | DVoRA / VeRA |\n|---|---|---|---|---|")
    for r in a.ranks:
        for mode in MODES:
            vera, dvora = statistics.median(ms[(r, False, mode)]), statistics.median(ms[(r, True, mode)])
            print(f"| {r} | {'fp32' if mode == 'no' else 'bf16 autocast'} | {vera:.0f} | {dvora:.0f} | {dvora / vera:.2f}x |")


if __name__ == "__main__":
    main()

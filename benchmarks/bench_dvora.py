"""DVoRA's training-step cost against plain VeRA on the real MiniLM: `verakit train --magnitude` vs without, at
r=256 and r=1024, fp32 and bf16 autocast steps, side by side in one process on real GLUE training rows.

DVoRA's extra work per step is the row norms of W0 + delta in every adapted layer (delta formed without
gradients: d_out x d_in x r multiply-adds per layer, the materialized path's cost) and the per-row rescale of the
output. A step is what the loop does (collate, forward, loss, backward, AdamW), on length-grouped batches as
`verakit train` makes them for classification; each round runs every variant on the same batch positions,
interleaved (this machine has slow phases). Printed: median ms per step and the DVoRA / VeRA ratio.

`--groups U ...` measures grouped training instead (`verakit train --group-column`, slot tables): a batch whose
rows are spread over U groups, fp32 steps. Grouped DVoRA forms the row norms of every group in the batch
(U weights of d_out x d_in per layer and step), so its extra cost grows with U where plain grouped VeRA's does not.

    OMP_NUM_THREADS=1 python benchmarks/bench_dvora.py [--task mrpc] [--ranks 256 1024] [--rounds 3] [--steps 3]
    OMP_NUM_THREADS=1 python benchmarks/bench_dvora.py --groups 1 8 32 --ranks 256 1024
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
    p.add_argument("--groups", type=int, nargs="*", default=[], help="grouped training with these groups per batch")
    a = p.parse_args()
    if not GLUE.is_dir():
        raise SystemExit(f"needs the GLUE folders under {GLUE}")
    if a.groups:
        return grouped(a)
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


def grouped(a: argparse.Namespace) -> None:
    """Grouped VeRA vs grouped DVoRA steps (fp32) with a batch's rows spread over U groups, interleaved."""
    import torch.nn.functional as F

    from verakit.slot_tables import to_slot_tables
    from verakit.train.batching import epoch_order
    from verakit.train.loop import train_mode

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.task}, batch {a.batch}, grouped "
          "(slot tables, per-group heads), q/v + the VeRA head, fp32 steps")
    variants = {}
    for r in a.ranks:
        for mag in (False, True):
            rec = recipe_for(a.task, a.rows, r, mag)
            tables = to_slot_tables(rec.model, max(a.groups) + 1)
            params = [*tables.adapter_params(), *tables.head_params(rec.model)]
            train_mode(rec.model)
            variants[(r, mag)] = (rec, tables, torch.optim.AdamW(params, lr=1e-3))
    first = next(iter(variants.values()))[0]
    n, lengths = first.num_train(), first.train_lengths()
    order = epoch_order(n, 0, 0, a.batch, lengths)
    ms: dict[tuple[int, bool, int], list[float]] = {(*v, u): [] for v in variants for u in a.groups}
    for rnd in range(a.rounds):
        for u in a.groups:
            ids = torch.arange(a.batch) % u + 1  # (B,) rows spread evenly over slots 1..U
            for v, (rec, tables, opt) in variants.items():
                t0 = time.perf_counter()
                for s in range(a.steps):
                    k = (rnd * a.steps + s) % (n // a.batch)
                    batch = rec.collate(order[k * a.batch : (k + 1) * a.batch])
                    labels = batch.pop("labels")
                    with tables.rows.use(ids):
                        loss = F.cross_entropy(rec.model(**batch).logits, labels)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                ms[(*v, u)].append((time.perf_counter() - t0) / a.steps * 1e3)
    print("\n| r | groups in the batch | grouped VeRA ms/step | grouped DVoRA ms/step | DVoRA / VeRA |\n|---|---|---|---|---|")
    for r in a.ranks:
        for u in a.groups:
            vera, dvora = statistics.median(ms[(r, False, u)]), statistics.median(ms[(r, True, u)])
            print(f"| {r} | {u} | {vera:.0f} | {dvora:.0f} | {dvora / vera:.2f}x |")


if __name__ == "__main__":
    main()

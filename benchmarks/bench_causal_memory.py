"""Peak memory and step time of causal-LM training on SmolLM2-135M's shape, with and without gradient
checkpointing: does instruction tuning fit a 24 GiB, 2-core machine at batch 4 x 256 tokens?

Each case runs in its own process (peak RSS only grows within a process): build the model, adapt it,
then `--steps` AdamW steps of `verakit.train.causal.token_loss` on a fixed batch (labels = inputs, so
every token counts, the worst case). Cases alternate checkpointing off/on per method, so the time ratio
compares neighbouring runs. Children run with glibc told to mmap blocks >= 64 KiB (`_common.MALLOC_ENV`),
so the peak follows live tensors rather than heap high-water marks.

    python benchmarks/bench_causal_memory.py [--batch 4] [--seq 256] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import batch_for, build_model, child_env  # noqa: E402

CASES = [  # (method, targets, rank)
    ("vera", "q_proj,v_proj", 1024),
    ("vera", "all-linear", 256),
    ("lora", "all-linear", 8),
    ("full", "", 0),
]


def one(args: argparse.Namespace) -> None:
    """Child process: one case, JSON on stdout."""
    import torch

    from verakit.train.causal import enable_gradient_checkpointing, peak_rss_mib, token_loss
    from verakit.train.methods import NO_HEAD, MethodSpec, prepare_model

    torch.set_num_threads(args.threads)
    model = build_model("smollm2", 30)
    if args.ckpt:
        enable_gradient_checkpointing(model)
    targets = args.targets if args.targets in ("", "all-linear") else tuple(args.targets.split(","))
    prepared = prepare_model(model, MethodSpec(args.method, args.r, 0.1, targets or None, 0, head=NO_HEAD))
    if args.keepx:
        import verakit

        verakit.set_input_recompute(prepared.model, False)
    loaded = peak_rss_mib()
    opt = torch.optim.AdamW([p for _, p in prepared.adapter], lr=1e-4)
    batch = batch_for("smollm2", args.batch, args.seq, 49152)
    prepared.model.train()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, n = token_loss(prepared.model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "after_load_mib": loaded, "step_s": sorted(times)[len(times) // 2],
                      "trainable": prepared.adapter_numel}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--targets", default="", help=argparse.SUPPRESS)
    p.add_argument("--r", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--keepx", action="store_true", help=argparse.SUPPRESS)  # VeRA: keep x, no recompute
    args = p.parse_args()
    if args.child:
        one(args)
        return
    print(f"SmolLM2-135M shape (random init), batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{args.threads} threads")
    print("| method | targets | r | trainable | checkpointing | peak RSS (MiB) | RSS after load (MiB) | step (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, targets, r in CASES:
        rows = {}
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--child", "--method", method, "--targets", targets, "--r", str(r),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--threads", str(args.threads), *(["--ckpt"] if ckpt else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env()).stdout
            rows[ckpt] = m = json.loads(out.strip().splitlines()[-1])
            print(f"| {method} | {targets or 'all parameters'} | {r or ''} | {m['trainable']:,} | {'on' if ckpt else 'off'} "
                  f"| {m['peak_rss_mib']:,.0f} | {m['after_load_mib']:,.0f} | {m['step_s']:.2f} |", flush=True)
        off, on = rows[False], rows[True]
        print(f"|  |  |  |  | on / off | {on['peak_rss_mib'] / off['peak_rss_mib']:.2f}x | | "
              f"{on['step_s'] / off['step_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

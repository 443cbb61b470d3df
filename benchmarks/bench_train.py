"""Training-step time and peak memory: verakit VeRA vs PEFT VeRA vs PEFT LoRA r=8, side by side.

    python benchmarks/bench_train.py --model roberta --layers 12 --batches 8x128 24x128 --ranks 1024 256

--variants bf16 keepx ckpt adds rows verakit-R-VARIANT (see VARIANTS below), --floor a no-adapter row;
all are timed interleaved with the others and measured like them.

Time: every method's model lives in this process; one optimizer step (forward, backward, AdamW) per
method per round, the order rotating each round; we report the median step and the median (min-max)
over rounds of the per-round ratios. Memory: one subprocess per method (glibc told to mmap large
blocks so RSS follows live tensors); peak RSS during one step (VmHWM after a clear_refs reset) minus
RSS before it, after a warm-up step, i.e. activations + gradients + transients above the loaded model.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    adapt,
    batch_for,
    build_model,
    child_env,
    interleaved,
    ratio_summary,
    reset_peak_rss,
    rss_mib,
    train_step,
    trainable,
)

# verakit variants, as suffixes of the method name: "-bf16" verakit.set_compute_dtype(model, bf16);
# "-keepx" verakit.set_input_recompute(model, False) (keep each layer's x, the pre-recompute behaviour);
# "-ckpt" transformers' gradient checkpointing (non-reentrant). Method "floor": no adapter at all, but
# gradients flow through every layer (transformers' enable_input_require_grads) and the head trains: the
# frozen network's own activations, the least any adapter reaching the first layer can keep.
VARIANTS = ("bf16", "keepx", "ckpt")


def _setup(model_name: str, layers: int, method: str, r: int, lr: float = 1e-3):
    """Model and optimizer for `method` ("lora", "peft-vera", "floor", "verakit[-VARIANT...]")."""
    base, *variants = method.split("-") if method.startswith("verakit") else (method,)
    model = build_model(model_name, layers)
    if base == "floor":
        model = adapt(model, model_name, "base", r)
        model.enable_input_require_grads()
    else:
        model = adapt(model, model_name, base, r)
    if variants:
        import verakit
        from verakit.train.causal import enable_gradient_checkpointing

        if "bf16" in variants:
            verakit.set_compute_dtype(model, torch.bfloat16)
        if "keepx" in variants:
            verakit.set_input_recompute(model, False)
        if "ckpt" in variants:
            enable_gradient_checkpointing(model)
    # a causal LM's floor trains nothing: a stand-in parameter keeps the optimizer step in the loop
    opt = torch.optim.AdamW(trainable(model) or [torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return model, opt


def _vocab(model) -> int:
    return model.get_input_embeddings().num_embeddings


def memory_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, opt = _setup(args.model, args.layers, args.method, args.r)
    bsz, seq = args.batch
    batch = batch_for(args.model, bsz, seq, _vocab(model))
    train_step(model, opt, batch)  # warm-up: optimizer state and grads exist from here on
    gc.collect()
    before = rss_mib()
    reset_peak_rss()
    train_step(model, opt, batch)
    print(json.dumps({"before_mib": before, "peak_mib": rss_mib("VmHWM")}))


def measure_memory(args: argparse.Namespace, method: str, r: int, batch: tuple[int, int]) -> float:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--layers", str(args.layers),
           "--method", method, "--r", str(r), "--batch", f"{batch[0]}x{batch[1]}", "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return res["peak_mib"] - res["before_mib"]


def _fmt(s: tuple[float, float, float]) -> str:
    return f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="roberta", choices=["roberta", "gpt2", "smollm2"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batches", nargs="*", default=["8x128", "24x128"], help="timed batches (none: memory only)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[1024, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU seconds, steadier on a machine shared with other jobs")
    ap.add_argument("--memory-batch", default="24x128", help="batch for the memory rows ('' to skip)")
    ap.add_argument("--variants", nargs="*", default=[], choices=VARIANTS,
                    help="also these verakit variants (rows verakit-R-VARIANT; see VARIANTS above)")
    ap.add_argument("--floor", action="store_true",
                    help="also the no-adapter floor: gradients through every frozen layer, head trained")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--r", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    parse = lambda s: tuple(int(v) for v in s.split("x"))  # noqa: E731
    if args.child:
        args.batch = parse(args.batch)
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    print(f"# bench_train: model={args.model} layers={args.layers} threads={args.threads} "
          f"repeats={args.repeats} clock={args.clock} torch={torch.__version__}")
    # (row label, method, rank) of every row, in print order; the same rows for time and memory
    cases = [("lora-8", "lora", 8)] + ([("floor", "floor", 0)] if args.floor else [])
    for r in args.ranks:
        cases.append((f"peft-vera-{r}", "peft-vera", r))
        for suffix in ["", *(f"-{v}" for v in args.variants)]:
            cases.append((f"verakit-{r}{suffix}", f"verakit{suffix}", r))
    setups = {}
    if args.batches:
        setups = {k: _setup(args.model, args.layers, method, r) for k, method, r in cases}
        print(f"| batch | method | step {args.clock} s (median) | / PEFT VeRA same r | / LoRA r=8 |")
        print("|---|---|---|---|---|")
    for b in args.batches:
        vocab = _vocab(setups["lora-8"][0])
        bsz, seq = parse(b)
        batch = batch_for(args.model, bsz, seq, vocab)
        fns = {k: (lambda m=m, o=o, bt=batch: train_step(m, o, bt)) for k, (m, o) in setups.items()}
        times = interleaved(fns, args.repeats, clock=args.clock)
        for k in setups:
            med = statistics.median(times[k])
            vs_peft = _fmt(ratio_summary(times, k, "peft-vera-" + k.split("-")[1])) if k.startswith("verakit") else ""
            print(f"| {b} | {k} | {med:.2f} | {vs_peft} | {_fmt(ratio_summary(times, k, 'lora-8'))} |", flush=True)
    if args.memory_batch:
        mb = parse(args.memory_batch)
        del setups
        gc.collect()
        print("\n| batch | method | peak MiB above loaded model (separate process) | / PEFT VeRA same r | / LoRA r=8 |")
        print("|---|---|---|---|---|")
        mem = {k: measure_memory(args, method, r, mb) for k, method, r in cases}
        for k, v in mem.items():
            vs_peft = f"{v / mem['peft-vera-' + k.split('-')[1]]:.2f}" if k.startswith("verakit") else ""
            print(f"| {args.memory_batch} | {k} | {v:.0f} | {vs_peft} | {v / mem['lora-8']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

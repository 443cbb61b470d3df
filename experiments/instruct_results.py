"""Alpaca-style instruction tuning of SmolLM2-135M-Instruct: VeRA vs LoRA (PEFT) held-out loss at an equal
CPU budget (docs/results.md, ## Generation).

Every cell is one `verakit train` command (printed, and recorded in the summary); a cell whose RUN_DIR
already has metrics.json is skipped, so the script can be stopped and restarted at will.

    python experiments/instruct_results.py run    [--runs runs/instruct] [--lr-vera X] [--lr-lora Y]
    python experiments/instruct_results.py report [--runs runs/instruct]
    python experiments/instruct_results.py run --lr-vera 5e-2 --lr-lora 2e-3   # the E2E probe's best rates

Setting (the paper's instruction-tuning setup scaled down to a shared 2-core CPU): shared/data/alpaca
(5,000 Alpaca examples; the seed-0 held-out 10% split, of which 40 examples are scored), 120 training
examples, one epoch (30 steps), batch 4, max length 256 (97% of examples fit), the model's chat template, every
linear layer but the LM head as target ("all-linear", as the paper's Llama runs); VeRA r=256 (the paper's
r=1024 would be 1.8x the hidden size of this 576-wide model), LoRA r=8 (alpha 8). The base model's
held-out loss is measured on the same 40 examples.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
RANK = {"vera": 256, "lora": 8}
N_TRAIN, N_EVAL = 120, 40


def command(method: str, lr: float, out: Path) -> list[str]:
    return ["verakit", "train", "--task", "instruct", "--data-dir", str(DATA), "--out", str(out),
            "--method", method, "--r", str(RANK[method]), "--target-modules", "all-linear", "--lr", f"{lr:g}",
            "--batch-size", "4", "--max-length", "256", "--max-train-samples", str(N_TRAIN),
            "--max-eval-samples", str(N_EVAL), "--eval-every", "15", "--report-samples", "3",
            "--max-new-tokens", "64", "--seed", "0", "--quiet"]


DEFAULT_LR = {"vera": 1e-2, "lora": 1e-3}


def _run_name(method: str, lr: float) -> str:
    """train-METHOD at the default learning rate, train-METHOD-lrX at another (a second probe point)."""
    return f"train-{method}" if lr == DEFAULT_LR[method] else f"train-{method}-lr{lr:g}"


def run(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for method, lr in (("vera", args.lr_vera), ("lora", args.lr_lora)):
        out = runs / _run_name(method, lr)
        if (out / "metrics.json").is_file():
            continue
        cmd = command(method, lr, out)
        shutil.rmtree(out, ignore_errors=True)  # an interrupted cell: start it again
        print("$", shlex.join(cmd), flush=True)
        with (runs / "commands.log").open("a") as fh:
            fh.write("$ " + shlex.join(cmd) + "\n")
        subprocess.run(cmd, check=True)
    base = runs / "base.json"
    if not base.is_file():
        t0 = time.perf_counter()
        from verakit.train.causal import DecodeConfig, build_causal_lm, evaluate_lm, load_causal_data
        from verakit.train.causal.lm_data import tokenize_examples

        _, held = load_causal_data("instruct", str(DATA), max_train_samples=1, max_eval_samples=N_EVAL)
        model, tok = build_causal_lm(None)
        metrics, _ = evaluate_lm(model.eval(), tok, tokenize_examples(tok, held, 256, True), [],
                                 use_chat_template=True, decode=DecodeConfig())
        base.write_text(json.dumps({"metric": metrics, "n_eval": len(held),
                                    "seconds": round(time.perf_counter() - t0, 1)}, indent=2))


def report(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    rows = ["| method | targets, r | lr | trainable params | adapter file (B) | held-out loss | perplexity "
            "| steps | train wall time (s) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    if (runs / "base.json").is_file():
        b = json.loads((runs / "base.json").read_text())["metric"]
        rows.append(f"| none (base model) | | | 0 | 0 | {b['loss']:.4f} | {b['perplexity']:.2f} | | | |")
    for method in RANK:
        done = sorted(runs.glob(f"train-{method}*/metrics.json"))
        if not done:
            rows.append(f"| {method} | not yet measured | | | | | | | | |")
        for mp in done:
            m = json.loads(mp.read_text())
            lr = json.loads((mp.parent / "config.json").read_text())["args"]["lr"]
            rows.append(f"| {method} | all-linear, {RANK[method]} | {lr:g} | {m['trainable_params']:,} "
                        f"| {m['adapter_bytes']:,} | {m['metric']['loss']:.4f} | {m['metric']['perplexity']:.2f} "
                        f"| {m['total_steps']} | {m['train_seconds']:.0f} | {m['peak_rss_mib']:,.0f} |")
    print("\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("--runs", default=str(REPO / "runs" / "instruct"))
    p.add_argument("--lr-vera", type=float, default=DEFAULT_LR["vera"])
    p.add_argument("--lr-lora", type=float, default=DEFAULT_LR["lora"])
    args = p.parse_args()
    if not DATA.is_file():
        sys.exit(f"Alpaca data not found at {DATA}")
    run(args) if args.action == "run" else report(args)


if __name__ == "__main__":
    main()

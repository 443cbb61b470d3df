"""`verakit plan`: the memory a training run needs (VeRA, LoRA, full fine-tuning side by side), from a
model's config alone; no weights are loaded (verakit.plan)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import TYPE_CHECKING

from .common import csv_list

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["add_parsers", "run_plan", "format_plan"]

_ROWS = (("base weights", "base_weights"), ("shared projections", "projections"),
         ("trainable + grads + AdamW", "trainable_state"), ("activations", "activations"),
         ("transient at peak", "transient"), ("total (peak)", "total"))


def _size(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def format_plan(p: Plan) -> str:
    """The plan as a text table: one column per method, one row per part of the peak."""
    ckpt = "on" if p.checkpointing else "off"
    tm = ",".join(p.target_modules) if isinstance(p.target_modules, tuple) else p.target_modules
    lines = [f"{p.model} ({p.model_type}, {p.task}, {p.params:,} parameters); base {p.precision}, compute "
             f"{p.compute_dtype}; batch {p.batch_size} x {p.seq_len} tokens; gradient checkpointing {ckpt}",
             f"{'DVoRA (VeRA with magnitudes)' if p.magnitude else 'VeRA'} r={p.r} and LoRA r={p.lora_r} on {tm}; AdamW", ""]
    heads = [m.method for m in p.methods]
    rows = [["", *heads], ["trainable parameters", *(f"{m.trainable_params:,}" if m.supported else "-" for m in p.methods)]]
    for label, key in _ROWS:
        rows.append([label, *(_size(getattr(m, key)) if m.supported else "-" for m in p.methods)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    lines += [f"{m.method}: {m.note}" for m in p.methods if m.note]
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan (or its JSON); 2 with one line on stderr for an unusable model or option."""
    from ..plan import PlanError, plan

    try:
        p = plan(args.model, methods=args.methods, r=args.r, lora_r=args.lora_r, precision=args.precision,
                 compute_dtype=args.compute_dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                 checkpointing=args.checkpointing, target_modules=args.target_modules, task=args.task,
                 magnitude=args.magnitude)
    except PlanError as e:
        print(f"verakit plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `plan`."""
    from ..plan import METHODS, PRECISIONS, PRESETS, plan

    d = {k: v.default for k, v in inspect.signature(plan).parameters.items()}
    s = sub.add_parser("plan", help="memory a training run needs (VeRA, LoRA, full) from a model config")
    s.add_argument("--model", required=True, help=f"model folder, config JSON file, or a preset: {', '.join(PRESETS)}")
    s.add_argument("--methods", type=csv_list, default=d["methods"], help=f"comma-separated, from {','.join(METHODS)} "
                   "(default: all)")
    s.add_argument("--r", type=int, default=d["r"], help=f"VeRA rank (default {d['r']}, as verakit train)")
    s.add_argument("--lora-r", type=int, default=d["lora_r"], help=f"LoRA rank (default {d['lora_r']})")
    s.add_argument("--precision", default=d["precision"], help=f"base weights: {', '.join(PRECISIONS)} (default "
                   f"{d['precision']}; 8bit/4bit as verakit train --quantize: linear layers but lm_head)")
    s.add_argument("--compute-dtype", default=None, help="fp32 or bf16: activations and unquantized weights "
                   "(default: bf16 for --precision bf16, else fp32)")
    s.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"default {d['batch_size']}")
    s.add_argument("--seq-len", type=int, default=d["seq_len"], help=f"tokens per example (default {d['seq_len']})")
    s.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (verakit train "
                   "--gradient-checkpointing)")
    s.add_argument("--target-modules", type=csv_list, default=None, help="comma-separated leaf names or all-linear "
                   "(default: the model type's, as verakit train)")
    s.add_argument("--task", default=None, help="causal-lm or classification (default: classification for "
                   "encoders, else causal-lm)")
    s.add_argument("--magnitude", action="store_true", help="plan VeRA as DVoRA (verakit train --magnitude): "
                   "the magnitude vectors and the row norms' temporary (docs/dvora.md)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    s.set_defaults(func=run_plan)

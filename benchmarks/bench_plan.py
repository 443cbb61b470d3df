"""`verakit plan` against measured peaks: one training step's peak memory, planned vs measured on this CPU.

Each case runs in a fresh process: import everything, read RSS, build the model (the real SmolLM2-135M-
Instruct folder, fp32 or quantized to 4-bit with `verakit.quant.quantize_linears`; or a RoBERTa-base-sized
model from a random `RobertaConfig`), adapt it, reset the peak (Linux: clear_refs, so building and
quantizing do not count), then `--steps` AdamW steps (forward, backward, step: the second step runs its
backward with AdamW's moments allocated). Measured = peak RSS (VmHWM) after the steps minus the RSS before
the model was built. RSS rather than torch's CPU profiler: it is what the machine runs out of, and it
includes what the profiler misses (bitsandbytes' buffers, oneDNN scratch, the allocator's slack). Children
run with glibc told to mmap blocks >= 64 KiB (`_common.MALLOC_ENV`), so freed tensors leave the RSS.

    OMP_NUM_THREADS=1 python benchmarks/bench_plan.py [--steps 2] [--only smollm2-fp32,...] [--results FILE]

--results FILE keeps each measurement (one JSON line per case) and reuses those already there, so the
plans can be recomputed against the same measurements without measuring again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import batch_for, build_model, child_env, reset_peak_rss, rss_mib  # noqa: E402

# (case name, model, precision, method, checkpointing, batch, seq)
CASES = [
    ("smollm2-fp32", "smollm2", "fp32", "vera", False, 4, 256),
    ("smollm2-fp32", "smollm2", "fp32", "vera", True, 4, 256),
    ("smollm2-fp32", "smollm2", "fp32", "lora", False, 4, 256),
    ("smollm2-fp32", "smollm2", "fp32", "full", False, 4, 256),
    ("smollm2-fp32", "smollm2", "fp32", "full", True, 4, 256),
    ("smollm2-4bit", "smollm2", "4bit", "vera", False, 4, 256),
    ("smollm2-4bit", "smollm2", "4bit", "vera", True, 4, 256),
    ("roberta-base", "roberta", "fp32", "vera", False, 8, 256),
    ("roberta-base", "roberta", "fp32", "vera", True, 8, 256),
    ("roberta-base", "roberta", "fp32", "lora", False, 8, 256),
    ("roberta-base", "roberta", "fp32", "full", False, 8, 256),
]
PLAN_MODEL = {"smollm2": "smollm2-135m", "roberta": "roberta-base"}


def child(args: argparse.Namespace) -> None:
    """One case; prints one JSON line."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 (imported before the RSS baseline)
    import transformers.models.roberta.modeling_roberta  # noqa: F401
    from _common import adapt

    from verakit.train.causal import build_causal_lm, enable_gradient_checkpointing, token_loss
    from verakit.train.methods import NO_HEAD, MethodSpec, prepare_model

    if args.precision == "4bit":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    torch.set_num_threads(1)
    before, file_mib = rss_mib(), None
    if args.model == "smollm2":
        model = build_causal_lm(None)[0].train()
        if args.precision == "4bit":
            from verakit.quant import quantize_linears

            quantize_linears(model, "4bit")
            # transformers maps the safetensors file and the (unquantized) embedding keeps that mapping
            # alive, so the fp32 weights' pages that quantizing read stay resident as clean file pages
            # (RSS counts them, the kernel may drop them); own copies release the mapping and leave the
            # RSS with what training holds. In fp32 the mapped pages are the weights themselves.
            file_mib = rss_mib("RssFile")
            for q in model.parameters():
                if q.is_floating_point():
                    q.data = q.data.clone()
        if args.ckpt:
            enable_gradient_checkpointing(model)
        prepared = prepare_model(model, MethodSpec(args.method, {"vera": 1024, "lora": 8}.get(args.method, 0), 0.1,
                                                   None, 0, head=NO_HEAD))
        model, params = prepared.model, [p for _, p in prepared.adapter]
        batch = batch_for("smollm2", args.batch, args.seq, 49152)

        def loss_of() -> torch.Tensor:
            loss, n = token_loss(model, batch)
            return loss / n
    else:
        model = build_model("roberta", 12)
        if args.ckpt:
            enable_gradient_checkpointing(model)
        if args.method == "full":
            model.requires_grad_(True)
        else:
            model = adapt(model, "roberta", "verakit" if args.method == "vera" else "lora",
                          1024 if args.method == "vera" else 8)
        params = [p for p in model.parameters() if p.requires_grad]
        batch = batch_for("roberta", args.batch, args.seq, 50265)

        def loss_of() -> torch.Tensor:
            return model(**batch).loss
    opt = torch.optim.AdamW(params, lr=1e-5)
    loaded = rss_mib()
    reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss_of().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"before_mib": before, "loaded_mib": loaded, "peak_mib": rss_mib("VmHWM"), "file_mib": file_mib,
                      "seconds": time.perf_counter() - t0, "trainable": sum(p.numel() for p in params)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--results", default=None, help="JSON-lines file of measurements to reuse and extend")
    p.add_argument("--only", default="", help="comma-separated case names (smollm2-fp32, smollm2-4bit, roberta-base)")
    for a in ("--child-model", "--precision", "--method"):
        p.add_argument(a, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_model:
        args.model = args.child_model
        child(args)
        return
    from verakit.plan import plan

    only = set(filter(None, args.only.split(",")))
    done: dict[str, dict] = {}
    if args.results and Path(args.results).is_file():
        for line in Path(args.results).read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    print(f"{args.steps} AdamW steps per case, 1 thread; MiB = 2^20 bytes; error = planned / measured - 1")
    print("| case | method | checkpointing | batch x seq | trainable | planned (MiB) | measured (MiB) | error | step (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, precision, method, ckpt, batch, seq in CASES:
        if only and name not in only:
            continue
        cmd = [sys.executable, __file__, "--child-model", model, "--precision", precision, "--method", method,
               "--batch", str(batch), "--seq", str(seq), "--steps", str(args.steps), *(["--ckpt"] if ckpt else [])]
        key = " ".join(cmd[2:])
        m = done.get(key)
        if m is None:
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env()).stdout
            m = {"key": key, **json.loads(out.strip().splitlines()[-1])}
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(m) + "\n")
        planned = plan(PLAN_MODEL[model], methods=(method,), precision=precision, batch_size=batch, seq_len=seq,
                       checkpointing=ckpt).methods[0]
        measured = m["peak_mib"] - m["before_mib"]
        total = planned.total / 2**20
        print(f"| {name} | {method} | {'on' if ckpt else 'off'} | {batch} x {seq} | {m['trainable']:,} "
              f"(planned {planned.trainable_params:,}) | {total:,.0f} | {measured:,.0f} | {total / measured - 1:+.1%} "
              f"| {m['seconds'] / args.steps:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Inference with VeRA: unmerged single adapter, a batch mixing many adapters, and merge time.

    python benchmarks/bench_infer.py --model roberta --layers 12 --batch 8x128 --ranks 256 1024

Side by side in one process, interleaved rounds, gradient-free eval-mode forwards:
* single: base model, PEFT VeRA unmerged, verakit unmerged (warm: its cached W0 + delta is reused;
  cold: d is bumped in place before every call, so every call rebuilds W0 + delta);
* mixed: an `AdapterBank` with `--adapters` distinct adapters, every batch row on its own adapter,
  against the base model on the same batch;
* merge: verakit `merge` against PEFT VeRA `merge_adapter` (and LoRA r=8's, the floor), each undone
  untimed after every round.
Vectors are random (b != 0) so no path can skip work. Ratios are per round, then median (min-max).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import adapt, batch_for, build_model, interleaved, ratio_summary  # noqa: E402


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("vera_lambda", "vera_d", "vera_b", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _fmt(s: tuple[float, float, float]) -> str:
    return f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"


def _forward(model, inputs):
    def run():
        with torch.no_grad():
            model(**inputs)
    return run


def single(args, inputs) -> None:
    import verakit

    models = {"base": adapt(build_model(args.model, args.layers), args.model, "base", 0).eval()}
    for r in args.ranks:
        for method in ("peft-vera", "verakit"):
            m = adapt(build_model(args.model, args.layers), args.model, method, r).eval()
            _randomize(m)
            models[f"{method}-{r}"] = m
    fns = {k: _forward(m, inputs) for k, m in models.items()}
    for r in args.ranks:
        warm = fns[f"verakit-{r}"]
        layers = verakit.vera_layers(models[f"verakit-{r}"]).values()

        def cold(warm=warm, layers=layers):
            with torch.no_grad():
                for ly in layers:
                    ly.vera_d.mul_(1.0)  # an in-place update, as an optimizer step would make
            warm()
        fns[f"verakit-{r}-cold"] = cold
    times = interleaved(fns, args.repeats, clock=args.clock)
    print(f"\n| batch | unmerged single adapter | forward {args.clock} s (median) | / base |")
    print("|---|---|---|---|")
    for k in fns:
        print(f"| {args.batch} | {k} | {statistics.median(times[k]):.3f} | {_fmt(ratio_summary(times, k, 'base'))} |")


def mixed(args) -> None:
    import verakit
    from verakit.fileformat import adapter_from_model
    from verakit.serve.bank import AdapterBank

    r = args.mixed_rank
    bsz, seq = (int(v) for v in args.mixed_batch.split("x"))
    base = adapt(build_model(args.model, args.layers), args.model, "base", 0).eval()
    model = verakit.attach(build_model(args.model, args.layers).eval(),
                           verakit.VeraConfig(r=r, target_modules=tuple(_targets(args.model))))
    bank = AdapterBank(model, capacity=args.adapters)
    names = []
    twin = verakit.attach(build_model(args.model, args.layers).eval(),
                          verakit.VeraConfig(r=r, target_modules=tuple(_targets(args.model))))
    for i in range(args.adapters):
        _randomize(twin, seed=i)
        bank.add(f"a{i}", adapter_from_model(twin))
        names.append(f"a{i}")
    inputs = {k: v for k, v in batch_for(args.model, bsz, seq, _vocab(base)).items() if k != "labels"}
    rows = [names[i % len(names)] for i in range(bsz)]

    def banked():
        with torch.no_grad():
            bank.forward(rows, **inputs)
    times = interleaved({"base": _forward(base, inputs), "bank": banked}, args.repeats, clock=args.clock)
    print(f"\n| batch | mixed ({len(set(rows))} distinct adapters, r={r}) | forward {args.clock} s (median) | / base |")
    print("|---|---|---|---|")
    for k in times:
        print(f"| {args.mixed_batch} | {k} | {statistics.median(times[k]):.3f} | {_fmt(ratio_summary(times, k, 'base'))} |")


def merge_times(args) -> None:
    import verakit

    models = {"lora-8": adapt(build_model(args.model, args.layers), args.model, "lora", 8)}
    for r in args.ranks:
        for method in ("peft-vera", "verakit"):
            models[f"{method}-{r}"] = adapt(build_model(args.model, args.layers), args.model, method, r)
    for m in models.values():
        _randomize(m)

    def merger(key, model):
        if key.startswith("verakit"):
            def run():
                verakit.merge(model)
                verakit.unmerge(model)
            return run

        def run():
            model.merge_adapter()
            model.unmerge_adapter()
        return run
    times = interleaved({k: merger(k, m) for k, m in models.items()}, args.repeats, clock=args.clock)
    print(f"\n| merge + unmerge (all {args.model} targets) | {args.clock} s (median) | / PEFT VeRA same r | / LoRA r=8 |")
    print("|---|---|---|---|")
    for k in times:
        vs = _fmt(ratio_summary(times, k, "peft-vera-" + k.split("-")[-1])) if k.startswith("verakit") else ""
        print(f"| {k} | {statistics.median(times[k]):.3f} | {vs} | {_fmt(ratio_summary(times, k, 'lora-8'))} |")


def _targets(model: str) -> tuple[str, ...]:
    from _common import TARGETS

    return TARGETS[model]


def _vocab(model) -> int:
    return model.get_input_embeddings().num_embeddings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="roberta", choices=["roberta", "gpt2", "smollm2"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", default="8x128")
    ap.add_argument("--ranks", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU seconds, steadier on a machine shared with other jobs")
    ap.add_argument("--mixed-batch", default="64x32", help="rows x tokens for the mixed batch ('' to skip)")
    ap.add_argument("--mixed-rank", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--sections", nargs="+", default=["single", "mixed", "merge"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# bench_infer: model={args.model} layers={args.layers} threads={args.threads} "
          f"repeats={args.repeats} clock={args.clock} torch={torch.__version__}")
    if "single" in args.sections:
        bsz, seq = (int(v) for v in args.batch.split("x"))
        probe = build_model(args.model, 1)
        inputs = {k: v for k, v in batch_for(args.model, bsz, seq, _vocab(probe)).items() if k != "labels"}
        single(args, inputs)
    if "mixed" in args.sections and args.mixed_batch:
        mixed(args)
    if "merge" in args.sections:
        merge_times(args)


if __name__ == "__main__":
    main()

"""One adapted layer, forward + backward: the adapter paths of `verakit.ops` against PEFT's formula.

    python benchmarks/bench_ops.py --tokens 1024 3072 --ranks 1024 256 --repeats 9

Per (T, r): a frozen (768, 768) layer, x requiring grad (a layer above an adapted one), upstream grad
random. Rows: the frozen layer alone ("frozen"), LoRA r=8, PEFT VeRA's formula through autograd
("peft"), `vera_tail` after u = A x ("factored"), `vera_materialized` keeping W ("mat-keep") or
rebuilding it in backward ("mat-rebuild"). Interleaved rounds; median ms and the extra over "frozen".
Second table: three sibling layers (q, k, v) reading one x on the factored path, `u = A x` computed
per layer or once and shared, against PEFT's formula.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved  # noqa: E402

from verakit import ops  # noqa: E402
from verakit.projection import Projection  # noqa: E402


def _cases(T: int, r: int, n: int, m: int) -> dict:
    torch.manual_seed(0)
    proj = Projection(0, "kaiming_uniform", r, n, m)
    A, B = proj.tables("cpu", torch.float32)
    A, B = A[:r, :n], B[:m, :r]
    s = proj.scale(n, r)
    w0 = torch.randn(m, n) * 0.02
    x = torch.randn(T, n, requires_grad=True)
    g = torch.randn(T, m)
    d = torch.full((r,), 0.1, requires_grad=True)
    b = (torch.randn(m) * 0.1).requires_grad_(True)
    la = (torch.randn(8, n) * 0.02).requires_grad_(True)
    lb = torch.zeros(m, 8, requires_grad=True)

    def run(f):
        def step():
            y = f()
            y.backward(g)
            for t in (x, d, b, la, lb):
                t.grad = None
        return step

    return {
        "frozen": run(lambda: F.linear(x, w0)),
        "lora-8": run(lambda: F.linear(x, w0) + F.linear(F.linear(x, la), lb) * 2.0),
        "peft": run(lambda: F.linear(x, w0) + b * F.linear(d * s * F.linear(x, A), B)),
        "factored": run(lambda: F.linear(x, w0) + ops.vera_tail(F.linear(x, A), B, d, b, s)),
        "mat-keep": run(lambda: ops.vera_materialized(x, w0, None, A, B, d, b, s, True)),
        "mat-rebuild": run(lambda: ops.vera_materialized(x, w0, None, A, B, d, b, s, False)),
    }


def _siblings(T: int, r: int, n: int, m: int) -> dict:
    torch.manual_seed(0)
    proj = Projection(0, "kaiming_uniform", r, n, m)
    A, B = proj.tables("cpu", torch.float32)
    A, B = A[:r, :n], B[:m, :r]
    s = proj.scale(n, r)
    w = [torch.randn(m, n) * 0.02 for _ in range(3)]
    x = torch.randn(T, n, requires_grad=True)
    g = torch.randn(T, m)
    ds = [torch.full((r,), 0.1, requires_grad=True) for _ in range(3)]
    bs = [(torch.randn(m) * 0.1).requires_grad_(True) for _ in range(3)]

    def run(layer, share=False):
        def step():
            u = F.linear(x, A) if share else None  # (T, r), once for the three layers
            sum(F.linear(x, w[i]) + layer(i, u) for i in range(3)).backward(g)
        return step

    return {
        "frozen": run(lambda i, u: 0.0),
        "peft": run(lambda i, u: bs[i] * F.linear(ds[i] * s * F.linear(x, A), B)),
        "factored-per-layer": run(lambda i, u: ops.vera_tail(F.linear(x, A), B, ds[i], bs[i], s)),
        "factored-shared-u": run(lambda i, u: ops.vera_tail(u, B, ds[i], bs[i], s), share=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024, 3072])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1024, 256])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--sibling-tokens", nargs="*", type=int, default=[64, 256])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# bench_ops: ({args.dim}, {args.dim}) layer, threads={args.threads}, repeats={args.repeats}, "
          f"clock={args.clock}")
    print("| T | r | path | ms (median) | extra over frozen, ms | extra / PEFT's extra | model's pick |")
    print("|---|---|---|---|---|---|---|")
    for T in args.tokens:
        for r in args.ranks:
            times = interleaved(_cases(T, r, args.dim, args.dim), args.repeats, clock=args.clock)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            pick = ops.choose_path(T, args.dim, args.dim, r, grad=True)
            pick_name = "factored" if pick[0] == "factored" else ("mat-keep" if pick[1] else "mat-rebuild")
            for k, v in med.items():
                extra = v - med["frozen"]
                rel = extra / (med["peft"] - med["frozen"])
                print(f"| {T} | {r} | {k} | {v:.1f} | {extra:.1f} | {rel:.2f} | {'<-' if k == pick_name else ''} |",
                      flush=True)
    siblings_table(args)


def siblings_table(args: argparse.Namespace) -> None:
    print("\n| T | r | q+k+v on the factored path | ms (median) | extra over frozen, ms | extra / PEFT's extra |")
    print("|---|---|---|---|---|---|")
    for T in args.sibling_tokens:
        for r in args.ranks:
            times = interleaved(_siblings(T, r, args.dim, args.dim), args.repeats, clock=args.clock)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            for k, v in med.items():
                extra = v - med["frozen"]
                print(f"| {T} | {r} | {k} | {v:.1f} | {extra:.1f} | {extra / (med['peft'] - med['frozen']):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()

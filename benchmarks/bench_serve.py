"""Serving benchmark: many VeRA adapters in one batch (AdapterBank) vs one adapter and vs PEFT.

Measured in one run, side by side and interleaved (medians over repeats):

1. throughput: batch 64, r=256 on query+value, per-adapter heads, on the real all-MiniLM-L6-v2 and a
   RoBERTa-base-sized random model: 1, 8 and 64 distinct adapters per batch relative to 1; the bank
   with 1 adapter relative to the plain model with that adapter loaded normally, and to the base model;
   PEFT VeRA serving the same mix correctly (one forward per adapter group after set_adapter).
2. memory per resident adapter relative to its vector bytes (bare encoders, no heads), 1,000 and
   10,000 resident, and PEFT VeRA at 1,000 (adding 10,000 PEFT adapters takes too long here).
3. time to add an adapter as the number resident grows to 10,000.
4. a bounded HTTP load test on 127.0.0.1: a `verakit serve` process over MiniLM with 100 adapters on
   disk, concurrent clients for a fixed time: requests/s, p50/p99 latency, status counts.

    python benchmarks/bench_serve.py [--quick] [--repeats 3] [--seq 32] [--load-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("query", "value")


def rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def minilm(head: bool = True):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from verakit.models import default_classifier_path

    path = default_classifier_path()
    torch.manual_seed(0)
    return (AutoModelForSequenceClassification.from_pretrained(path, num_labels=2) if head
            else AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()


def roberta(head: bool = True):
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, num_labels=2)
    return (RobertaForSequenceClassification(cfg) if head else RobertaModel(cfg, add_pooling_layer=False)).eval()


def random_adapters(base, n: int, r: int):
    """n adapters (verakit Adapter objects) with random vectors and heads, sharing one config."""
    from verakit import VeraConfig, attach, detach
    from verakit.fileformat import adapter_from_model
    from verakit.inject import vera_state

    model = attach(base, VeraConfig(r=r, target_modules=TARGETS))
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in vera_state(model).layers.values():
                layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g) * 0.3)
                layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g) * 0.3)
        out.append(adapter_from_model(model))
    detach(model)
    return out


def timed(fn, repeats: int) -> list[float]:
    return [_once(fn) for _ in range(repeats)]


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------- 1. throughput


def throughput(name: str, build, vocab: int, args) -> dict[str, float]:
    import peft

    from verakit import VeraConfig, attach, load_adapter
    from verakit.serve import AdapterBank

    base = build()
    adapters = random_adapters(copy.deepcopy(base), 64, args.r)
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=args.r, target_modules=TARGETS)), capacity=64)
    for i, ad in enumerate(adapters):
        bank.add(f"a{i}", ad)
    single = load_adapter(copy.deepcopy(base), adapters[0])
    heads = ["classifier", "pooler"] if hasattr(base, "bert") else ["classifier"]
    pcfg = peft.VeraConfig(r=args.r, target_modules=list(TARGETS), projection_prng_key=0, save_projection=False,
                           modules_to_save=heads)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg, adapter_name="a0")
    for i in range(1, 64):
        pm.add_adapter(f"a{i}", pcfg)
    pm.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = {k: [f"a{i % k}" for i in range(args.batch)] for k in (1, 8, 64)}

    def peft_grouped(k):
        for a in range(k):  # rows of one adapter are contiguous groups of the batch
            sel = [i for i in range(args.batch) if i % k == a]
            pm.set_adapter(f"a{a}")
            pm(input_ids=ids[sel], attention_mask=batch["attention_mask"][sel])

    cases = {
        "base model": lambda: base(**batch),
        "one adapter, loaded normally": lambda: single(**batch),
        "bank, 1 adapter": lambda: bank.forward(rows[1], **batch),
        "bank, 8 adapters": lambda: bank.forward(rows[8], **batch),
        "bank, 64 adapters": lambda: bank.forward(rows[64], **batch),
        "PEFT grouped, 8 adapters": lambda: peft_grouped(8),
        "PEFT grouped, 64 adapters": lambda: peft_grouped(64),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.repeats):  # interleaved
            for k, fn in cases.items():
                times[k].append(_once(fn))
        # Does PEFT honour per-row adapter names for VeRA? Give its adapters distinct vectors (PEFT starts
        # every lambda_b at 0, which would make all adapters equal) and compare with its grouped answer.
        gen = torch.Generator().manual_seed(1)
        for k, prm in pm.named_parameters():
            if "vera_lambda" in k:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.3)
        try:
            mixed = pm(**batch, adapter_names=rows[8]).logits
            want = torch.cat([pm.set_adapter(f"a{i % 8}") or pm(input_ids=ids[i : i + 1]).logits for i in range(8)])
            honoured = str(bool(torch.allclose(mixed[:8], want, atol=1e-4)))
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            honoured = f"raises {type(e).__name__}: {str(e)[:80]}"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n### Throughput, {name}: batch {args.batch} x {args.seq} tokens, r={args.r}, q+v, per-adapter heads, "
          f"{args.repeats} interleaved repeats (median)\n")
    print("| case | seconds / batch | rows / s | ratio |")
    print("|---|---|---|---|")
    ref = med["bank, 1 adapter"]
    for k, t in med.items():
        print(f"| {k} | {t:.3f} | {args.batch / t:.0f} | {ref / t:.2f}x of bank-1 throughput |")
    print(f"\nbank 8 / 1 adapters: {ref / med['bank, 8 adapters']:.2f}; 64 / 1: {ref / med['bank, 64 adapters']:.2f} "
          f"(target >= 0.9); bank-1 vs one adapter loaded normally: "
          f"{med['one adapter, loaded normally'] / ref:.2f}; vs base model: {med['base model'] / ref:.2f}")
    print(f"speed-up over PEFT grouped: 8 adapters {med['PEFT grouped, 8 adapters'] / med['bank, 8 adapters']:.1f}x, "
          f"64 adapters {med['PEFT grouped, 64 adapters'] / med['bank, 64 adapters']:.1f}x (target >= 5x)")
    print(f"PEFT VeRA honours per-row adapter_names: {honoured}")
    return med


# ---------------------------------------------------------------- 2-3. memory and add time


def _child(argv: list[str]) -> dict:
    """Run this script's --child mode in a fresh process (so freed heap from earlier work cannot hide growth)."""
    import json

    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bank_child(model: str, n: int, r: int) -> dict:
    """RSS growth of an AdapterBank filled with n adapters, and the time of every add."""
    from verakit import VeraConfig, attach
    from verakit.serve import AdapterBank

    build = minilm if model == "minilm" else roberta
    template = random_adapters(build(head=False), 16, r)  # cycled: add() copies, so content is irrelevant
    vec_bytes = sum(t.numel() * 4 for t in (*template[0].d.values(), *template[0].b.values()))
    model_ = attach(build(head=False), VeraConfig(r=r, target_modules=TARGETS))
    before = rss()
    bank = AdapterBank(model_, capacity=n)  # the slot tables are allocated (and zeroed) here
    built = rss()
    times, cpu = [], []
    for i in range(n):
        t, c = time.perf_counter(), time.thread_time()
        bank.add(f"customer-{i:06d}", template[i % len(template)])
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)  # excludes time the scheduler gave to other processes
    return {"grown": rss() - before, "adds": rss() - built, "vec_bytes": vec_bytes, "table_bytes": bank.nbytes(),
            "times": times, "cpu": cpu}


def peft_child(model: str, n: int, r: int) -> dict:
    """RSS growth of a PEFT VeRA model after adding n adapters (vectors set, as loading would)."""
    import peft

    build = minilm if model == "minilm" else roberta
    cfg = peft.VeraConfig(r=r, target_modules=list(TARGETS), projection_prng_key=0, save_projection=False)
    pm = peft.get_peft_model(build(head=False), cfg, adapter_name="a0")
    per = sum(p.numel() * 4 for k, p in pm.named_parameters() if "vera_lambda" in k)
    before = rss()
    t = time.perf_counter()
    for i in range(1, n + 1):
        pm.add_adapter(f"a{i}", cfg)
    took = time.perf_counter() - t
    return {"grown": rss() - before, "vec_bytes": per, "seconds": took}


def memory_and_adds(args, counts: list[int]) -> None:
    print(f"\n### Memory per resident adapter and add time (bare encoders, r={args.r}, q+v; each row a fresh process)\n")
    print("Per adapter: slot-table bytes / capacity (exact) plus the Python bookkeeping measured as RSS growth during "
          "the adds; and the whole RSS growth (tables + adds) / n, which the allocator can push below the table "
          "bytes by reusing memory freed earlier in the process.\n")
    print("| model | resident | tables + bookkeeping per adapter | / vector bytes | RSS growth / n / vector bytes "
          "| add median (ms), first 10% | last 10% | p99 wall | p99 CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in ("minilm", "roberta"):
        for n in counts:
            res = _child(["bank", model, str(n), str(args.r)])
            times, vec = res["times"], res["vec_bytes"]
            per = res["table_bytes"] / n + max(res["adds"], 0) / n
            tenth = max(1, n // 10)
            first, last = statistics.median(times[:tenth]), statistics.median(times[-tenth:])
            p99 = sorted(times)[int(0.99 * (n - 1))]
            p99_cpu = sorted(res["cpu"])[int(0.99 * (n - 1))]
            print(f"| {model} ({vec:,} B/adapter) | {n:,} | {per:,.0f} B | {per / vec:.3f}x | "
                  f"{res['grown'] / n / vec:.3f}x | {first * 1e3:.3f} | {last * 1e3:.3f} | {p99 * 1e3:.3f} | "
                  f"{p99_cpu * 1e3:.3f} |")
    if "peft-memory" not in args.skip:
        n = args.peft_adapters
        res = _child(["peft", "minilm", str(n), str(args.r)])
        print(f"| PEFT VeRA, minilm ({res['vec_bytes']:,} B/adapter) | {n:,} | {res['grown'] / n:,.0f} B (RSS) | "
              f"{res['grown'] / n / res['vec_bytes']:.3f}x | {res['grown'] / n / res['vec_bytes']:.3f}x | "
              f"{res['seconds'] / n * 1e3:.1f} (mean add_adapter) | | | |")


# ---------------------------------------------------------------- 4. HTTP load test


def sentences(n: int) -> list[str]:
    path = REPO.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        return [ln.split("\t")[0] for ln in lines[:n]]
    return [f"sentence number {i} is neither good nor bad" for i in range(n)]


async def _clients(url: str, names: list[str], texts: list[str], clients: int, seconds: float):
    import httpx

    lat, status = [], {}
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop:
                body = {"adapter": rng.choice(names), "inputs": [rng.choice(texts)]}
                t = time.perf_counter()
                r = await client.post("/v1/classify", json=body)
                lat.append(time.perf_counter() - t)
                status[r.status_code] = status.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return lat, status, wall


def load_test(args) -> None:
    import httpx

    from verakit.fileformat import write_adapter

    with tempfile.TemporaryDirectory() as tmp:
        adir = Path(tmp)
        for i, ad in enumerate(random_adapters(minilm(), args.load_adapters, args.r)):
            write_adapter(ad, adir / f"customer-{i:03d}.safetensors")
        port = 8000 + os.getpid() % 1000
        cmd = [sys.executable, "-m", "verakit.cli", "serve", "--model", "minilm", "--adapters", str(adir),
               "--port", str(port), "--capacity", str(args.load_adapters + 28), "--max-batch", "64",
               "--max-wait-ms", "10", "--threads", str(args.server_threads)]
        log = open(adir / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            names = [f"customer-{i:03d}" for i in range(args.load_adapters)]
            texts = sentences(200)
            asyncio.run(_clients(url, names, texts, 4, 3))  # warm-up: loads adapters, first batches
            lat, status, wall = asyncio.run(_clients(url, names, texts, args.clients, args.load_seconds))
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    lat.sort()
    n = len(lat)
    vals = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.splitlines() if ln and not ln.startswith("#")}
    rows_per_batch = vals["verakit_batch_rows_sum"] / vals["verakit_batch_rows_count"]
    adapters_per_batch = vals["verakit_batch_adapters_sum"] / vals["verakit_batch_adapters_count"]
    errors5 = sum(c for s, c in status.items() if s >= 500)
    print(f"\n### HTTP load test: `verakit serve --model minilm`, {args.load_adapters} adapters (r={args.r}), "
          f"{args.clients} concurrent clients on 127.0.0.1 for {args.load_seconds:.0f} s, one SST-2 sentence per request\n")
    print(f"requests {n:,} in {wall:.1f} s = {n / wall:.1f} req/s; latency p50 {lat[n // 2] * 1e3:.0f} ms, "
          f"p99 {lat[int(0.99 * (n - 1))] * 1e3:.0f} ms; statuses {dict(sorted(status.items()))}; 5xx: {errors5}; "
          f"mean rows per forward {rows_per_batch:.1f}, mean distinct adapters per forward {adapters_per_batch:.1f}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        import json

        import transformers

        transformers.logging.set_verbosity_error()
        kind, model, n, r = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps((bank_child if kind == "bank" else peft_child)(model, n, r)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run: 1,000 resident only, 1 repeat, 10 s load")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["minilm", "roberta", "memory", "peft-memory", "load"])
    p.add_argument("--load-seconds", type=float, default=30.0)
    p.add_argument("--load-adapters", type=int, default=100)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--server-threads", type=int, default=2)
    p.add_argument("--peft-adapters", type=int, default=1000, help="PEFT adapters for its memory figure")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.load_seconds, args.peft_adapters = 1, 10.0, 200
    counts = [1000] if args.quick else [1000, 10000]
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    if "minilm" not in args.skip:
        throughput("all-MiniLM-L6-v2 (real)", minilm, 30522, args)
    if "roberta" not in args.skip:
        throughput("RoBERTa-base-sized (random)", roberta, 50265, args)
    if "memory" not in args.skip:
        memory_and_adds(args, counts)
    if "load" not in args.skip:
        load_test(args)


if __name__ == "__main__":
    main()

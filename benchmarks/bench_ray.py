"""Ray Serve benchmark: `verakit serve --engine ray` over the real MiniLM on a local cluster, HTTP on loopback.

Measured in one run (docs/serving.md, "Ray Serve"):

1. throughput of 1 replica and of 2 replicas under the same closed-loop load (C clients, each sending
   classify requests of 4 inputs for a random one of A adapters), interleaved: the two applications run
   side by side (routes / and /one) and the load alternates between them, round after round.
2. propagation: after an upload, an overwrite or a delete answered by one replica, how long until every
   replica answers with the new state (bursts of concurrent requests, so the proxy spreads them).
3. the cost of the change check: one `store.generation()` read, and a refresh that compares the files of
   256 resident adapters (in process, no Ray).
4. recovery: SIGKILL one of the 2 replicas under load; requests sent, answered, failed, how long errors
   lasted, and how long until a replacement replica answered.

    python benchmarks/bench_ray.py [--adapters 16] [--clients 8] [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import torch

TEXTS = ["a gripping, beautifully shot film", "the plot is a mess", "quietly moving", "nothing here works"]
HEADER = "x-verakit-replica"
TOKEN = "bench-admin-token"


def make_adapters(root: Path, n: int, minilm: str) -> None:
    """n MiniLM adapters (r=16 on query+value, random vectors and head) in `root`."""
    import transformers

    from verakit import VeraConfig, attach
    from verakit.fileformat import adapter_from_model, write_adapter
    from verakit.inject import vera_state

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2).eval()
    attach(model, VeraConfig(r=16, target_modules=("query", "value")))
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in vera_state(model).layers.values():
                layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g) * 0.3)
                layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g) * 0.3)
        write_adapter(adapter_from_model(model), root / f"a{i}.safetensors")


async def load(url: str, adapters: list[str], clients: int, seconds: float) -> dict[str, float]:
    """Closed loop: `clients` tasks, each sending one request after the other for `seconds`."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/classify", json={"adapter": rng.choice(adapters), "inputs": TEXTS})
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    elapsed = time.perf_counter() - start
    lat = sorted(latencies) or [float("nan")]
    return {"requests_per_s": len(latencies) / elapsed, "rows_per_s": len(latencies) * len(TEXTS) / elapsed,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def burst(url: str, adapter: str, n: int = 8) -> list[tuple[int, str, list]]:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(_: int) -> tuple[int, str, list]:
        r = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": TEXTS[:1]}, timeout=60)
        return r.status_code, r.headers.get(HEADER, ""), (r.json().get("probs") if r.status_code == 200 else [])

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def propagation(url: str, replicas: set[str], adapter: str, done, timeout: float = 30.0) -> tuple[float, int, int]:
    """(seconds from now until every replica in `replicas` has answered `adapter` in a way `done` accepts,
    answers `done` refused meanwhile (stale), bursts sent). The time includes the bursts' own round trips."""
    start, pending, stale, bursts = time.perf_counter(), set(replicas), 0, 0
    while pending and time.perf_counter() - start < timeout:
        bursts += 1
        for status, replica, probs in burst(url, adapter):
            if done(status, probs):
                pending.discard(replica)
            else:
                stale += 1
    if pending:
        raise RuntimeError(f"replicas {sorted(pending)} did not see the change to {adapter!r} in {timeout} s")
    return time.perf_counter() - start, stale, bursts


def measure_propagation(url: str, root: Path, repeats: int) -> dict[str, list[float]]:
    import httpx

    auth = {"Authorization": f"Bearer {TOKEN}"}
    replicas = {rep for _ in range(10) for _, rep, _ in burst(url, "a0")}
    assert len(replicas) == 2, replicas
    versions = [(root / f"a{i}.safetensors").read_bytes() for i in (1, 2)]
    out: dict[str, list] = {"upload_new": [], "overwrite": [], "delete": [], "burst_s": []}

    def timed(kind: str, write, done) -> None:
        t = time.perf_counter()
        write().raise_for_status()
        seconds, stale, bursts = propagation(url, replicas, "p", done)
        out[kind].append({"s": round(time.perf_counter() - t, 3), "stale_answers": stale, "bursts": bursts})

    for _ in range(repeats):
        t = time.perf_counter()
        burst(url, "p")  # 404: p does not exist yet; also times one burst (the measurement's resolution)
        out["burst_s"].append(round(time.perf_counter() - t, 3))
        timed("upload_new", lambda: httpx.post(f"{url}/v1/adapters", params={"name": "p"}, content=versions[0],
                                               headers=auth, timeout=60), lambda s, p: s == 200)
        old = torch.tensor(burst(url, "p", 16)[0][2])  # resident on both replicas now
        timed("overwrite", lambda: httpx.post(f"{url}/v1/adapters", params={"name": "p", "overwrite": "true"},
                                              content=versions[1], headers=auth, timeout=60),
              lambda s, p, old=old: s == 200 and not torch.allclose(torch.tensor(p), old))
        timed("delete", lambda: httpx.delete(f"{url}/v1/adapters/p", headers=auth, timeout=60), lambda s, p: s == 404)
    return out


def check_cost(root: Path) -> dict[str, float]:
    """Microseconds per generation read, and per refresh after a change with 256 resident adapters."""
    from verakit.serve.store import AdapterStore

    store = AdapterStore(root)
    store._bump()
    n = 20000
    read_us = 1e6 * timeit.timeit(store.generation, number=n) / n
    names = store.names()
    resident = [names[i % len(names)] for i in range(256)]
    refresh_us = 1e6 * timeit.timeit(lambda: [store.signature(x) for x in resident], number=200) / 200
    return {"generation_read_us": read_us, "refresh_256_resident_us": refresh_us}


def recovery(url: str, adapters: list[str], clients: int) -> dict[str, float | int | str]:
    """SIGKILL one replica after 3 s of load; keep the load until a replacement answers, then 5 s more."""
    import httpx

    log: list[tuple[float, int, str]] = []  # (time, status, replica)
    state: dict[str, float | str | None] = {"killed_at": None, "victim": None, "replaced_at": None}

    async def client(http: httpx.AsyncClient, seed: int, before: set[str]) -> None:
        rng = random.Random(seed)
        while True:
            now = time.perf_counter()
            if state["replaced_at"] is not None and now > state["replaced_at"] + 5:
                return
            if state["killed_at"] is not None and now > state["killed_at"] + 180:
                return
            try:
                r = await http.post(f"{url}/v1/classify", json={"adapter": rng.choice(adapters), "inputs": TEXTS})
                status, rep = r.status_code, r.headers.get(HEADER, "")
            except httpx.HTTPError:
                status, rep = 0, ""
            t = time.perf_counter()
            log.append((t, status, rep))
            if state["killed_at"] is None and len(log) >= 20 and rep:
                state["victim"], state["killed_at"] = rep, t
                os.kill(int(rep.rsplit(":", 1)[1]), signal.SIGKILL)
            elif state["killed_at"] is not None and status == 200 and rep not in before and state["replaced_at"] is None:
                state["replaced_at"] = t

    async def main() -> None:
        before = {rep for _ in range(10) for _, rep, _ in burst(url, adapters[0])}
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(client(http, k, before) for k in range(clients)))

    asyncio.run(main())
    killed = state["killed_at"]
    failures = [t for t, s, _ in log if s != 200]
    return {"sent": len(log), "answered": sum(s == 200 for _, s, _ in log), "failed": len(failures),
            "failed_statuses": sorted({str(s) for _, s, _ in log if s != 200}),
            "errors_for_s": (max(failures) - killed) if failures else 0.0,
            "replacement_answered_after_s": (state["replaced_at"] - killed) if state["replaced_at"] else float("nan"),
            "answered_while_replacing": sum(s == 200 for t, s, _ in log if killed < t < (state["replaced_at"] or t))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--propagation-repeats", type=int, default=5)
    ap.add_argument("--skip-recovery", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import serve

    from verakit.models import default_classifier_path
    from verakit.serve.options import ServeOptions
    from verakit.serve.ray_engine import APP_NAME, RayOptions, application, pinned

    minilm = str(default_classifier_path())
    root = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    make_adapters(root, args.adapters, minilm)
    names = [f"a{i}" for i in range(args.adapters)]
    options, _ = pinned(ServeOptions(model=minilm, adapters=str(root), threads=1, admin_token=TOKEN, max_wait_ms=5))
    port = 8600 + os.getpid() % 300
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    results: dict[str, object] = {"machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
                                  "adapters": args.adapters, "clients": args.clients, "seconds": args.seconds}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t = time.perf_counter()
        serve.run(application(options, RayOptions(replicas=2)), name=APP_NAME, route_prefix="/")
        results["start_2_replicas_s"] = time.perf_counter() - t
        serve.run(application(options, RayOptions(replicas=1)), name="one", route_prefix="/one")
        throughput: dict[str, list[dict]] = {"1": [], "2": []}
        for _ in range(args.rounds):
            for count, prefix in (("1", "/one"), ("2", "")):
                asyncio.run(load(url + prefix, names, args.clients, 2.0))  # warm: adapters resident
                throughput[count].append(asyncio.run(load(url + prefix, names, args.clients, args.seconds)))
                print(count, throughput[count][-1], file=sys.stderr, flush=True)
        results["throughput"] = throughput
        results["rows_per_s_median"] = {k: statistics.median(r["rows_per_s"] for r in v) for k, v in throughput.items()}
        serve.delete("one")
        results["propagation_s"] = measure_propagation(url, root, args.propagation_repeats)
        results["check_cost"] = check_cost(root)
        if not args.skip_recovery:
            results["recovery"] = recovery(url, names, args.clients)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

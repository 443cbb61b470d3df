"""Fault suite, load (docs/reliability.md): clients that trickle their request body, a burst beyond the
server's limits, and (slow) 1,000 concurrent connections, against a real `verakit serve` process."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest

from serve.faultkit import Proc, Tally, percentile

INPUTS = ["a fine film", "dull", "not bad at all", "terrible acting"]


def _classify(url: str, adapter: str = "a0", inputs: list[str] = INPUTS[:1]) -> tuple[int, float]:
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": inputs}, timeout=30)
    return r.status_code, time.perf_counter() - start


def _trickle(port: int, results: list, interval_s: float = 0.1, length: int = 2000) -> None:
    """Declare a JSON body of `length` bytes and send one byte every `interval_s`; record (status, seconds
    until the answer, whether the server then closed the connection within 2 s)."""
    start = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    status = "no answer"
    try:
        sock.settimeout(interval_s)
        for _ in range(length):
            try:
                sock.sendall(b" ")
            except OSError:  # the server answered and closed the connection
                break
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            if answer:
                status = int(answer.split()[1])
            break
        took, closed = time.perf_counter() - start, False
        sock.settimeout(2)
        try:
            while sock.recv(4096):
                pass
            closed = True
        except TimeoutError:  # still open 2 s after the answer: the connection is held
            pass
        except OSError:  # reset: the server closed while the trickle's last bytes were unread (closed too)
            closed = True
    finally:
        sock.close()
    results.append((status, took, closed))


@pytest.fixture(scope="module")
def bert_server(bert_dirs):
    model_dir, adapter_dir = bert_dirs
    server = Proc(["--model", str(model_dir), "--adapters", str(adapter_dir), "--max-batch", "4",
                   "--max-wait-ms", "2", "--body-timeout-s", "1", "--max-concurrency", "32", "--max-queue", "8"])
    yield server
    server.stop()


def test_slow_clients_trickling_a_body_time_out_and_others_are_unaffected(bert_server):
    """Eight clients trickle a body one byte per 0.1 s: each gets 408 once --body-timeout-s (1 s) has passed
    and the server closes its connection; a client sending normal requests meanwhile sees its latency unchanged."""
    url, tally = bert_server.url, Tally("slow clients trickling a body")
    baseline = [_classify(url) for _ in range(30)]
    slow: list = []
    threads = [threading.Thread(target=_trickle, args=(bert_server.port, slow)) for _ in range(8)]
    for t in threads:
        t.start()
    during = []
    while any(t.is_alive() for t in threads) and len(during) < 200:
        during.append(_classify(url))
    for t in threads:
        t.join(10)
    for status, *_ in baseline + during + slow:
        tally.add(status)
    base_s, busy_s = [s for _, s in baseline], [s for _, s in during]
    tally.figures = {"body_timeout_s": 1, "trickled_answered_after_s": [round(s, 2) for _, s, _ in slow],
                     "trickled_connections_closed": sum(c for *_, c in slow),
                     "p50_ms_before": round(1000 * percentile(base_s, 0.5), 1),
                     "p50_ms_during": round(1000 * percentile(busy_s, 0.5), 1),
                     "p99_ms_before": round(1000 * percentile(base_s, 0.99), 1),
                     "p99_ms_during": round(1000 * percentile(busy_s, 0.99), 1)}
    tally.report()
    # 0.9, not 1.0: uvicorn runs on uvloop, whose loop.time() is libuv's per-iteration cached clock at 1 ms
    # granularity and stale by the callbacks already run in that iteration, so the timer can fire a little before
    # the wall clock says (one CI run saw 0.9996 s). The bound still fails a timeout that is ignored, shortened or
    # counted from the wrong moment.
    assert [s for s, _, _ in slow] == [408] * 8 and all(0.9 <= t < 3.0 for _, t, _ in slow), slow
    assert all(closed for *_, closed in slow)  # the trickle holds no connection after its 408
    assert all(s == 200 for s, _ in baseline + during)
    # unaffected: the median stays within noise of the machine (shared, loaded) rather than growing with the
    # trickle's 1 s; the slow clients cost the server a wake-up per byte, no more
    assert percentile(busy_s, 0.5) < 3 * percentile(base_s, 0.5) + 0.05


async def _burst(port: int, n: int, inputs: list[str], timeout: float) -> list[tuple[int | str, str, float]]:
    """`n` classify requests at once, each on its own connection: (status or error, Retry-After|message,
    seconds). Plain asyncio streams, not httpx: its connection pool costs the client more than the server
    at a thousand connections, which would time the client."""

    async def one(i: int) -> tuple[int | str, str, float]:
        body = json.dumps({"adapter": f"a{i % 4}", "inputs": inputs}).encode()
        start = time.perf_counter()

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            raw = await reader.read()
            writer.close()
            return raw

        try:  # wait_for, not asyncio.timeout: Python 3.10 is supported
            raw = await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError:  # builtin TimeoutError only from 3.11
            return "TimeoutError", "", time.perf_counter() - start
        except OSError as e:
            return type(e).__name__, "", time.perf_counter() - start
        head, _, payload = raw.partition(b"\r\n\r\n")
        if not head:
            return "closed without an answer", "", time.perf_counter() - start
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        message = json.loads(payload)["error"]["message"] if status != 200 else ""
        return status, headers.get("retry-after", "") + "|" + message, time.perf_counter() - start

    return await asyncio.gather(*(one(i) for i in range(n)))


def _server_seconds(url: str) -> dict[str, float]:
    """The server's own mean time per answered /v1/classify request, by status (from /metrics)."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for status in ("200", "503"):
        label = f'{{endpoint="/v1/classify",status="{status}"}}'
        total = re.search(rf"verakit_request_seconds_sum{re.escape(label)} (\S+)", text)
        count = re.search(rf"verakit_request_seconds_count{re.escape(label)} (\S+)", text)
        if total and count and float(count[1]):
            out[f"server_mean_s_{status}"] = round(float(total[1]) / float(count[1]), 3)
    return out


def _tally_burst(case: str, answers: list, tally_extra: dict) -> Tally:
    tally = Tally(case, figures=tally_extra)
    for status, _, _ in answers:
        tally.add(status)
    return tally


def test_burst_beyond_the_limits_is_answered_503_with_retry_after(bert_server):
    """96 requests of 4 inputs at once against --max-concurrency 32 and --max-queue 8 rows: every request is
    answered at once, 200 or 503 with Retry-After (from either limit), nothing else, and the server serves
    normally right after."""
    answers = asyncio.run(_burst(bert_server.port, 96, INPUTS, timeout=30))
    statuses = {s for s, _, _ in answers}
    refused = [h for s, h, _ in answers if s == 503]
    tally = _tally_burst("burst beyond the limits", answers, {
        "max_concurrency": 32, "max_queue_rows": 8, "inputs_per_request": 4,
        "refused_by_concurrency": sum("--max-concurrency" in h for h in refused),
        "refused_by_queue": sum("--max-queue" in h for h in refused),
        "slowest_answer_s": round(max(t for _, _, t in answers), 2)})
    tally.report()
    assert statuses <= {200, 503} and 200 in statuses and 503 in statuses, answers
    assert all(h.startswith("1|") for h in refused)  # Retry-After: 1
    assert tally.figures["refused_by_queue"] > 0  # the row budget, not only the connection count, bit
    assert _classify(bert_server.url)[0] == 200


@pytest.mark.slow
def test_thousand_concurrent_connections_bounded_memory_and_no_5xx(minilm_adapters, tmp_path):
    """1,000 connections at once, each a classify request, against the real MiniLM at the default limits
    (--max-concurrency 512, --max-queue 512 rows), three rounds: answers are 200 or 503 with Retry-After,
    every one within the client's timeout; the server's resident memory after the rounds stays near its
    level after the first (bounded, not growing with the rounds)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    model, adapters = minilm_adapters
    server = Proc(["--model", model, "--adapters", str(adapters)])
    try:
        rss = [server.rss_mib()]
        answers = []
        for _ in range(3):
            answers += asyncio.run(_burst(server.port, 1000, INPUTS[:1], timeout=120))
            rss.append(server.rss_mib())
        alive = server.proc.poll() is None
        seconds = _server_seconds(server.url)
    finally:
        server.stop()
    refused = [h for s, h, _ in answers if s == 503]
    tally = _tally_burst("1,000 concurrent connections x3", answers, {
        "rss_mib_idle": round(rss[0], 1), "rss_mib_after_each_round": [round(x, 1) for x in rss[1:]],
        "refused_by_concurrency": sum("--max-concurrency" in h for h in refused),
        "refused_by_queue": sum("--max-queue" in h for h in refused),
        **{f"{k}_s_{s}": round(f([t for st, _, t in answers if st == s] or [0.0]), 2)
           for s in (200, 503) for k, f in (("p50", lambda v: percentile(v, 0.5)), ("max", max))}, **seconds})
    tally.report()
    assert alive and {s for s, _, _ in answers} <= {200, 503}, tally.outcomes
    assert all(h.startswith("1|") for h in refused)
    assert rss[-1] - rss[1] < 100, rss  # bounded: later rounds do not keep adding memory


@pytest.fixture(scope="module")
def minilm_adapters(minilm_path, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    from serve.cases import trained_adapter
    from verakit import VeraConfig
    from verakit.fileformat import write_adapter

    adapters = tmp_path_factory.mktemp("minilm_adapters")
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    for i in range(4):
        write_adapter(trained_adapter(base, VeraConfig(r=8), seed=i), adapters / f"a{i}.safetensors")
    return minilm_path, adapters



def test_request_cut_at_shutdown_is_answered_503_not_a_bare_500():
    """uvicorn cancels the requests still running when --shutdown-timeout-s is over: one whose answer had not
    started gets the JSON 503 with Retry-After (uvicorn alone would send a plain-text 500)."""
    from verakit.serve.limits import Limits

    sent: list[dict] = []

    async def never_answers(scope, receive, send):
        await asyncio.sleep(3600)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def main():
        scope = {"type": "http", "path": "/v1/classify", "method": "POST", "headers": []}
        task = asyncio.ensure_future(Limits(never_answers, 8, 30.0)(scope, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    start = sent[0]
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert json.loads(sent[1]["body"])["error"]["type"] == "shutting_down"

"""verakit.serve.limits on its own, with fake ASGI apps (no server process): the behaviours
docs/reliability.md states for `Limits` (--max-concurrency, --body-timeout-s) and `RowBudget` (--max-queue)."""

import asyncio
import json
from concurrent.futures import Future

import pytest

from verakit.serve.limits import RETRY_AFTER_S, Limits, Overloaded, RowBudget


def _scope(path: str) -> dict:
    return {"type": "http", "path": path, "method": "POST" if path.startswith("/v1/") else "GET", "headers": []}


def test_receive_after_the_body_is_not_timed():
    """docs/reliability.md: "After the body, receive() is not timed (a streaming response waits on it for the
    disconnect)". A body that arrives at once, then a disconnect 0.3 s later, under a 0.05 s body timeout:
    the app gets the disconnect, no 408 is raised or sent."""
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.sleep(0.3)  # six times the body timeout
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    seen: list[dict] = []

    async def streams_until_disconnect(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(await receive())  # what a streaming response does while it streams

    async def main():
        limits = Limits(streams_until_disconnect, 8, 0.05)
        await limits(_scope("/v1/completions"), receive, send)
        return limits.active

    assert asyncio.run(main()) == 0
    assert [m["type"] for m in seen] == ["http.request", "http.disconnect"]
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200]


def test_a_trickled_body_past_the_deadline_is_408():
    """The contrast to the test above: the same 0.05 s timeout does cut a body whose second part is 0.3 s late."""
    from fastapi import HTTPException

    parts = iter([{"type": "http.request", "body": b"{", "more_body": True},
                  {"type": "http.request", "body": b"}", "more_body": False}])

    async def receive():
        message = next(parts)
        if not message["more_body"]:
            await asyncio.sleep(0.3)
        return message

    async def reads_body(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    async def send(message):
        raise AssertionError("nothing is sent by Limits itself; the app renders the 408")

    with pytest.raises(HTTPException) as caught:
        asyncio.run(Limits(reads_body, 8, 0.05)(_scope("/v1/classify"), receive, send))
    assert caught.value.status_code == 408 and caught.value.headers == {"Connection": "close"}
    assert "--body-timeout-s" in caught.value.detail


def test_max_concurrency_refuses_before_the_body_and_exempts_health_and_metrics():
    """docs/reliability.md, --max-concurrency: beyond it, 503 with `Retry-After: 1` and `Connection: close`,
    before the body is read; /health and /metrics are not counted, so probes answer under overload.
    With a limit of 1 and one /v1/classify parked in the app: a second /v1/classify is refused without
    receive() ever being called; /health and /metrics reach the app. With only a /health parked, a
    /v1/classify is admitted (the probe holds no slot)."""
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        if "gate" in scope:
            await scope["gate"].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    class Client:
        def __init__(self):
            self.sent: list[dict] = []
            self.receives = 0

        async def receive(self):
            self.receives += 1
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(self, message):
            self.sent.append(message)

        def status(self):
            return self.sent[0]["status"]

    async def main():
        limits = Limits(app, 1, 30.0)
        gate = asyncio.Event()
        busy, refused, health, metrics = Client(), Client(), Client(), Client()
        parked = asyncio.ensure_future(limits({**_scope("/v1/classify"), "gate": gate}, busy.receive, busy.send))
        await asyncio.sleep(0.01)
        assert limits.active == 1
        await limits(_scope("/v1/classify"), refused.receive, refused.send)
        await limits(_scope("/health"), health.receive, health.send)
        await limits(_scope("/metrics"), metrics.receive, metrics.send)
        gate.set()
        await parked
        assert limits.active == 0

        probe_gate, probe, admitted = asyncio.Event(), Client(), Client()
        parked_probe = asyncio.ensure_future(limits({**_scope("/health"), "gate": probe_gate}, probe.receive, probe.send))
        await asyncio.sleep(0.01)
        assert limits.active == 0 and reached[-1] == "/health"  # the probe is in the app, uncounted
        await limits(_scope("/v1/classify"), admitted.receive, admitted.send)
        probe_gate.set()
        await parked_probe
        assert limits.active == 0
        return busy, refused, health, metrics, probe, admitted

    busy, refused, health, metrics, probe, admitted = asyncio.run(main())
    body = json.loads(refused.sent[1]["body"])
    assert refused.status() == 503 and refused.receives == 0
    headers = dict(refused.sent[0]["headers"])
    assert headers[b"retry-after"] == str(RETRY_AFTER_S).encode() == b"1"
    assert headers[b"connection"] == b"close"
    assert body["error"]["type"] == "overloaded" and "--max-concurrency" in body["error"]["message"]
    assert [c.status() for c in (busy, health, metrics, probe, admitted)] == [200] * 5
    # The refused call never reached the app: only the first and the admitted /v1/classify did.
    assert reached == ["/v1/classify", "/health", "/metrics", "/health", "/v1/classify"]


def test_row_budget_admits_one_request_when_nothing_is_pending():
    """docs/reliability.md, --max-queue: "one request is always admitted when nothing is pending" (a request of
    10 rows under a limit of 4); the next is refused naming --max-queue; the rows are freed when the future
    resolves, and a failing start() frees them at once."""
    budget = RowBudget(4)
    big: Future = Future()
    assert budget.submit(10, lambda: big) is big
    assert budget.pending == 10
    with pytest.raises(Overloaded, match=r"10 model rows pending and this request adds 1: over the server's "
                                         r"limit of 4 \(--max-queue\)"):
        budget.submit(1, Future)
    assert budget.pending == 10  # the refused request added nothing
    big.set_result([])
    assert budget.pending == 0

    # Within the limit: 3 + 1 == 4 admitted, one more refused.
    first, second = budget.submit(3, Future), budget.submit(1, Future)
    assert budget.pending == 4
    with pytest.raises(Overloaded):
        budget.submit(1, Future)
    first.cancel()
    second.set_exception(RuntimeError("failed rows are freed too"))
    assert budget.pending == 0

    def fails():
        raise RuntimeError("engine closed")

    with pytest.raises(RuntimeError, match="engine closed"):
        budget.submit(2, fails)
    assert budget.pending == 0

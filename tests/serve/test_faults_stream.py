"""Fault suite, generation (docs/reliability.md): a client that disconnects mid-stream, and SIGTERM under load,
against a real `verakit serve` process on a tiny random Llama (one character per token, so a streamed
event is one token)."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import httpx
import pytest

from serve.faultkit import Proc, Tally

MAX_TOKENS = 110  # the tiny Llama's context is 128 tokens


def _completion(url: str, prompt: str, max_tokens: int, timeout: float = 60, **extra) -> httpx.Response:
    body = {"model": "g0", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "raw": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


@pytest.fixture(scope="module")
def llama_server(llama_dirs):
    model_dir, adapter_dir = llama_dirs
    server = Proc(["--model", str(model_dir), "--adapters", str(adapter_dir), "--max-batch", "16",
                   "--max-wait-ms", "5", "--max-new-tokens", str(MAX_TOKENS), "--max-n", "8"])
    yield server
    server.stop()


def _long_prompt(url: str) -> tuple[str, float]:
    """A prompt whose greedy completion runs to max_tokens (no EOS on the way), and how long that takes."""
    for prompt in ("Once upon a time", "hello world", "abc", "The answer is", "x", "42"):
        start = time.perf_counter()
        r = _completion(url, prompt, MAX_TOKENS, n=8)
        took = time.perf_counter() - start
        assert r.status_code == 200, r.text
        if all(c["finish_reason"] == "length" for c in r.json()["choices"]):
            return prompt, took
    pytest.skip("no candidate prompt runs to max_tokens on this tiny model")


def test_client_disconnect_mid_stream_stops_generation_and_frees_the_batch(llama_server):
    """The client reads a few events and hangs up: the generation stops within a few tokens (the server logs
    how many it made) instead of running to max_tokens, and the next request is served at once."""
    url = llama_server.url
    tally = Tally("disconnect mid-stream")
    prompt, full_s = _long_prompt(url)
    tally.add(200)
    body = {"model": "g0", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "raw": True,
            "stream": True, "n": 8}
    received = [0] * 8  # tokens read per choice (one character, one token)
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and (choice := json.loads(line[6:])["choices"][0])["text"]:
                received[choice["index"]] += len(choice["text"])
                if max(received) == 3:
                    break  # leaving the block closes the connection mid-stream
    tally.add("disconnected by the client")
    start = time.perf_counter()
    after = _completion(url, prompt, 4)
    next_s = time.perf_counter() - start
    tally.add(after.status_code)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 10
    while not (found := re.search(r"generation stopped after \[([\d, ]+)\] tokens", llama_server.log)):
        assert time.monotonic() < deadline, llama_server.log[-2000:]
        time.sleep(0.05)
    made = [int(x) for x in found[1].split(",")]
    tally.figures = {"tokens_read_per_row": max(received), "tokens_made_per_row": max(made), "max_tokens": MAX_TOKENS,
                     "full_generation_s": round(full_s, 3), "next_request_s": round(next_s, 3)}
    tally.report()
    assert len(made) == 8 and max(made) <= max(received) + 12, made  # stopped within a few tokens of the hang-up
    assert next_s < full_s  # the batch slot was freed: the next request did not wait for the full generation


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    """A socket on which a whole POST request has been sent (so it is in flight, not merely queued to send)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict] | str:
    """(status, JSON body), or what went wrong on the socket."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as e:
        return type(e).__name__
    finally:
        sock.close()
    raw = b"".join(chunks)
    if not raw:
        return "closed without an answer"
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits(llama_server):
    """SIGTERM while requests are in flight (one batch done, two queued): each is answered whole (200, a full
    completion), a connection attempted afterwards is refused, and the process exits well within uvicorn's
    graceful timeout (5 s). Runs last in this module: it ends the module's server."""
    server, tally = llama_server, Tally("SIGTERM under load")
    try:
        socks = [_raw_post(server.port, "/v1/completions", {"model": ["g0", "g1", "g2", "llama"][i % 4], "raw": True,
                                                             "prompt": f"request {i}", "max_tokens": 64, "temperature": 0,
                                                             "n": 4})
                 for i in range(12)]  # 48 rows: 3 batches of 16 (--max-batch)
        first = _read_response(socks[0])  # a batch has run, so every request was accepted and is queued
        server.signal(signal.SIGTERM)
        t_term = time.perf_counter()
        time.sleep(0.3)
        refused = 0
        for _ in range(5):
            try:
                tally.add(httpx.get(f"{server.url}/health", timeout=2).status_code)
            except httpx.ConnectError:
                refused += 1
                tally.add("connection refused")
        answers = [first] + [_read_response(s) for s in socks[1:]]
        code = server.wait(15)
        exit_s = time.perf_counter() - t_term
    finally:
        server.stop()
    complete = 0
    for a in answers:
        tally.add(a[0] if isinstance(a, tuple) else a)
        if isinstance(a, tuple) and a[0] == 200:
            complete += all(c["finish_reason"] in ("length", "stop") for c in a[1]["choices"])  # ran to the end
    tally.lost = len(answers) - complete
    tally.figures = {"in_flight_at_sigterm": len(socks) - 1, "exit_code": code, "exit_after_sigterm_s": round(exit_s, 2)}
    tally.report()
    assert complete == 12, answers
    assert refused == 5  # new connections are refused once shutdown began
    assert code in (0, -signal.SIGTERM) and exit_s < 10

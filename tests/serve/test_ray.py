"""`verakit serve --engine ray`: two Ray Serve replicas of the real MiniLM over one adapter directory.

One end-to-end test runs in CI (mixed adapters equal offline answers; upload, overwrite and delete reach
both replicas; a corrupt file fails only its own requests); killing a replica under load is `slow`.
HTTP on loopback; the local Ray cluster has 2 CPUs, each replica 1 torch thread.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from serve.cases import REPO, TOKEN, free_port, trained_adapter

pytest.importorskip("ray.serve", reason="pip install 'verakit[ray]' for Ray Serve")

HEADER = "x-verakit-replica"
TEXTS = ["a gripping, beautifully shot film", "the plot is a mess", "quietly moving", "nothing here works"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def minilm_adapters(minilm_path, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A directory with MiniLM adapters m0, m1 (r=16), and two more kept aside as bytes for uploads."""
    from transformers import AutoModelForSequenceClassification

    from verakit import VeraConfig
    from verakit.fileformat import write_adapter

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    root = tmp_path_factory.mktemp("ray_adapters")
    spare = tmp_path_factory.mktemp("ray_spare")
    files = {}
    for i, name in enumerate(["m0", "m1", "up", "up2"]):
        folder = root if name in ("m0", "m1") else spare
        write_adapter(trained_adapter(base, VeraConfig(r=16, target_modules=("query", "value")), seed=i, std=0.3),
                      folder / f"{name}.safetensors")
        files[name] = (folder / f"{name}.safetensors").read_bytes()
    return root, files


def offline_probs(minilm_path: str, files: dict[str, bytes], texts: list[str], tmp: Path) -> dict[str, list]:
    """What one process with each adapter loaded answers, text by text (no batching, no server)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from verakit.fileformat import load_adapter

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path)
    out = {}
    for name, data in files.items():
        (tmp / f"{name}.safetensors").write_bytes(data)
        model = load_adapter(copy.deepcopy(base), tmp / f"{name}.safetensors")
        with torch.no_grad():
            out[name] = [model(**tok(t, return_tensors="pt")).logits[0].softmax(-1).tolist() for t in texts]
    return out


class RayServe:
    """`verakit serve --engine ray ...` in a subprocess on a free loopback port. Like cases.Server, with
    the patience Ray needs on a loaded 2-core machine: a cluster and the replicas' model loads before
    /health answers (up to 300 s), and Ray's own shutdown after SIGTERM (up to 60 s)."""

    def __init__(self, args: list[str], log: Path) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        self.log, self._log = log, open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "verakit.cli", "serve", "--engine", "ray", "--port",
                                      str(self.port), "--threads", "1", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not come up in 300 s:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def ray_server(minilm_path, minilm_adapters, tmp_path_factory):
    root, _ = minilm_adapters
    server = RayServe(["--replicas", "2", "--model", minilm_path, "--adapters", str(root), "--admin-token", TOKEN,
                       "--max-wait-ms", "5"], tmp_path_factory.mktemp("logs") / "ray.log")
    yield server
    server.stop()


def burst(url: str, adapter: str, n: int = 8) -> list[tuple[int, str, dict]]:
    """`n` concurrent classify requests for `adapter`: (status, replica, body) each. Concurrent, so the
    proxy spreads them over the replicas (one at a time it may keep choosing the same one)."""
    import httpx

    def one(_: int) -> tuple[int, str, dict]:
        r = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": TEXTS}, timeout=60)
        return r.status_code, r.headers.get(HEADER, ""), r.json()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def until_both(url: str, adapter: str, check, replicas: int = 2, rounds: int = 30) -> set[str]:
    """Bursts until `replicas` distinct replicas have answered `adapter`; every answer must pass `check`."""
    seen: set[str] = set()
    for _ in range(rounds):
        for status, replica, body in burst(url, adapter):
            check(status, body)
            seen.add(replica)
        if len(seen) >= replicas:
            break
    return seen


def close(got: list[list[float]], want: list[list[float]]) -> bool:
    return torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)


def test_two_replicas_share_one_store(ray_server, minilm_adapters, minilm_path, tmp_path):
    import httpx

    url = ray_server.url
    root, files = minilm_adapters
    want = offline_probs(minilm_path, files, TEXTS, tmp_path)

    def answers(name):
        def check(status, body):
            assert status == 200, body
            assert close(body["probs"], want[name]), (name, body["probs"], want[name])
        return check

    # Mixed adapters over HTTP equal the offline answers, on both replicas.
    assert until_both(url, "m0", answers("m0")) == until_both(url, "m1", answers("m1"))
    replicas = until_both(url, "m0", answers("m0"))
    assert len(replicas) == 2 and all(r.split(":")[-1].isdigit() for r in replicas)

    # An upload through one replica is served by both, right away (new names are looked up on disk).
    r = httpx.post(f"{url}/v1/adapters", params={"name": "up"}, content=files["up"], headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    assert until_both(url, "up", answers("up")) == replicas

    # An overwrite replaces resident copies on both replicas within the engine's refresh interval.
    r = httpx.post(f"{url}/v1/adapters", params={"name": "up", "overwrite": "true"}, content=files["up2"],
                   headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text  # from here every batch on every replica runs the new file
    assert until_both(url, "up", lambda s, b: (s == 200 and close(b["probs"], want["up2"])) or pytest.fail(
        f"stale or failed answer after overwrite: {s} {b}")) == replicas

    # A delete through one replica: both answer 404 from then on.
    assert httpx.delete(f"{url}/v1/adapters/up", headers=AUTH, timeout=60).status_code == 200
    assert until_both(url, "up", lambda s, b: s == 404 or pytest.fail(f"deleted adapter answered {s}")) == replicas

    # A file no replica can load fails only its own requests (409); the others keep answering.
    (root / "broken.safetensors").write_bytes(b"not an adapter")
    statuses = [status for status, _, _ in burst(url, "broken")]
    assert statuses == [409] * len(statuses)
    assert until_both(url, "m1", answers("m1")) == replicas
    health = httpx.get(f"{url}/health", timeout=30)
    assert health.status_code == 200 and health.headers[HEADER] in replicas
    assert health.json()["replica"] == health.headers[HEADER]


@pytest.mark.slow
def test_killed_replica_is_replaced_and_service_keeps_answering(ray_server, minilm_adapters):
    """SIGKILL one replica's process under mixed traffic: the other answers, Ray starts a new one."""

    url = ray_server.url
    victim = sorted(until_both(url, "m0", lambda s, b: None))[0]
    sent = answered = failed = 0
    seen_after: set[str] = set()
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for adapter in ("m0", "m1"):
            for status, replica, _ in burst(url, adapter, n=4):
                sent += 1
                answered += status == 200
                failed += status != 200
                if killed_at is not None and status == 200:
                    seen_after.add(replica)
        if killed_at is None and sent >= 16:
            os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
            killed_at = time.monotonic()
        if killed_at is not None and len(seen_after - {victim}) >= 2:
            break
    assert killed_at is not None and victim not in seen_after
    assert len(seen_after - {victim}) >= 2, f"no replacement replica answered within 120 s: {seen_after}"
    # Only requests already on the killed replica may fail; the service never stops answering.
    assert failed <= 8 and answered >= sent - 8, (sent, answered, failed)


@pytest.mark.slow
def test_generation_and_streaming_through_the_proxy(llama_dirs, tmp_path_factory):
    """A causal LM on Ray: chat completions, plain and streamed (SSE through Ray's proxy), equal offline
    greedy generation with the adapter loaded."""
    import json

    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verakit.fileformat import load_adapter

    model_dir, adapter_dir = llama_dirs
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir).eval(), adapter_dir / "g1.safetensors")
    messages = [{"role": "user", "content": "hi there"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True)

    server = RayServe(["--replicas", "1", "--model", str(model_dir), "--adapters", str(adapter_dir)],
                      tmp_path_factory.mktemp("logs") / "ray_generate.log")
    try:
        body = {"model": "g1", "messages": messages, "max_tokens": 12, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers[HEADER]
        assert r.json()["choices"][0]["message"]["content"] == expected
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 4
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    finally:
        server.stop()

"""Fault suite, the adapter store (docs/reliability.md): adapter files replaced or deleted on disk while the
server uses them; the server SIGKILLed during an upload and during an overwrite; the disk full during an
upload. Against real `verakit serve` processes on the tiny BERT classifier, each with its own copy of the
adapter folder."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.cases import TOKEN
from serve.faultkit import Proc, Tally
from verakit.fileformat import read_adapter

INPUTS = ["a fine film", "dull", "not bad at all", "terrible acting"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _probs(url: str, adapter: str) -> tuple[int, list[list[float]] | None]:
    r = httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "inputs": INPUTS}, timeout=30)
    return r.status_code, (r.json()["probs"] if r.status_code == 200 else None)


def _same(a: list[list[float]], b: list[list[float]]) -> bool:
    return all(abs(x - y) < 1e-4 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _copy_adapters(bert_dirs, tmp_path: Path) -> tuple[Path, Path]:
    model_dir, adapter_dir = bert_dirs
    shutil.copytree(adapter_dir, tmp_path / "adapters")
    return model_dir, tmp_path / "adapters"


def _replace(path: Path, data: bytes) -> None:
    """What a deploy script should do: write beside, then rename over (atomic)."""
    tmp = path.with_name(f".{path.name}.deploy")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_adapter_replaced_or_deleted_on_disk_while_in_use(store):
    """For 3 s a thread swaps a0's file between two adapters (atomic rename, then in-place rewrites as `cp`
    does) and deletes and restores a3, while clients classify with a0..a3 on a server whose capacity (1)
    forces reloads from disk. Every answer is a0's old or new probabilities exactly (never a mix), a3's or
    404, or (in-place rewrite caught half-written) 409; never a 500, and the server stays up."""
    server, adapters = store["server"], store["adapters"]
    tally = Tally("adapter replaced or deleted on disk while in use")
    files = {n: (adapters / f"{n}.safetensors").read_bytes() for n in ("a0", "a1", "a3")}
    expect = {n: _probs(server.url, n)[1] for n in ("a0", "a1", "a2", "a3")}
    stop, swaps = threading.Event(), {"atomic": 0, "in_place": 0, "deleted": 0}

    def churn() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            target = adapters / "a0.safetensors"
            data = files["a1"] if k % 2 else files["a0"]
            if k % 4 < 2:
                _replace(target, data)
                swaps["atomic"] += 1
            else:  # in place, non-atomic: truncate, half, pause, the rest
                with open(target, "r+b") as f:
                    f.truncate(0)
                    f.write(data[: len(data) // 2])
                    f.flush()
                    time.sleep(0.002)
                    f.write(data[len(data) // 2 :])
                swaps["in_place"] += 1
            (adapters / "a3.safetensors").unlink()
            swaps["deleted"] += 1
            time.sleep(0.005)
            _replace(adapters / "a3.safetensors", files["a3"])
            time.sleep(0.005)

    def client(names: list[str], out: list) -> None:
        while not stop.is_set():
            for n in names:
                out.append((n, *_probs(server.url, n)))

    answers: list = []
    threads = [threading.Thread(target=churn)] + [
        threading.Thread(target=client, args=(names, answers)) for names in (["a0", "a2"], ["a0", "a3"], ["a1", "a0"])]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    _replace(adapters / "a0.safetensors", files["a0"])
    alive = server.proc.poll() is None
    seen = {"a0 old": 0, "a0 new": 0}
    for name, status, probs in answers:
        tally.add(status)
        if status != 200:
            continue
        if name == "a0" and _same(probs, expect["a0"]):
            seen["a0 old"] += 1
        elif name == "a0" and _same(probs, expect["a1"]):
            seen["a0 new"] += 1
        elif not _same(probs, expect[name]):
            tally.lost += 1  # a mixed or wrong answer
    tally.figures = {**swaps, **seen}
    tally.report()
    # a death names its exit status (a negative one is the signal) and the server's last output
    assert alive, f"the server died (exit {server.proc.returncode}):\n{server.log[-3000:]}"
    assert tally.lost == 0
    assert set(tally.outcomes) <= {"200", "404", "409"}, tally.outcomes
    assert seen["a0 old"] > 0 and seen["a0 new"] > 0  # the swaps really happened under the clients


def _kill_while_staging(server: Proc, adapters: Path, name: str, data: bytes, overwrite: bool) -> dict:
    """Upload `data` as `name` and SIGKILL the server the moment its hidden staging file for `name` appears
    (or, if the upload finished first, right after). Returns what happened."""
    seen = threading.Event()

    def watch() -> None:
        prefix = f".upload-{name}."
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not seen.is_set():
            if any(e.name.startswith(prefix) for e in os.scandir(adapters)):
                server.signal(signal.SIGKILL)
                seen.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = httpx.post(f"{server.url}/v1/adapters", params={"name": name, "overwrite": overwrite}, content=data,
                       headers=AUTH, timeout=30)
        outcome: int | str = r.status_code
    except httpx.HTTPError as e:
        outcome = type(e).__name__
    killed_mid_staging = seen.is_set()
    seen.set()
    watcher.join()
    if server.proc.poll() is None:  # the upload finished before a staging file was seen: kill now
        server.signal(signal.SIGKILL)
    server.wait(10)
    leftovers = sorted(p.name for p in adapters.iterdir() if p.name.startswith(f".upload-{name}."))
    return {"outcome": outcome, "killed_while_staging": killed_mid_staging, "staging_files_left": leftovers}


def _store_is_whole(adapters: Path, allowed: dict[str, set[str]]) -> int:
    """How many visible adapter files are not byte-for-byte one of their allowed versions (or unreadable)."""
    damaged = 0
    for p in adapters.glob("*.safetensors"):
        data = p.read_bytes()
        damaged += _sha(data) not in allowed.get(p.stem, set())
        read_adapter(p)  # and it reads as an adapter
    return damaged


@pytest.fixture(scope="module")
def store(bert_dirs, tmp_path_factory):
    """The kill chain, run once: SIGKILL a server the moment it stages the upload of a new adapter, restart,
    SIGKILL it the moment it stages an overwrite of a0, check the folder after each kill, restart again.
    Yields the restarted server (capacity 1, so every change of adapter reloads from disk), its adapter
    folder, the original files and what each kill found."""
    model_dir, adapters = _copy_adapters(bert_dirs, tmp_path_factory.mktemp("store"))
    args = ["--model", str(model_dir), "--adapters", str(adapters), "--admin-token", TOKEN, "--capacity", "1",
            "--max-batch", "8", "--max-wait-ms", "2"]
    old = {n: (adapters / f"{n}.safetensors").read_bytes() for n in ("a0", "a1", "a2", "a3")}
    allowed = {n: {_sha(b)} for n, b in old.items()}
    allowed["fresh"] = {_sha(old["a1"])}  # the new adapter: a1's file under another name
    allowed["a0"].add(_sha(old["a2"]))  # the overwrite: a2's file as a0
    kills = []
    for name, data, overwrite in (("fresh", old["a1"], False), ("a0", old["a2"], True)):
        run = _kill_while_staging(Proc(args), adapters, name, data, overwrite)
        run["damaged"] = _store_is_whole(adapters, allowed)
        kills.append(run)
    server = Proc(args)
    yield {"server": server, "adapters": adapters, "old": old, "kills": kills}
    server.stop()


def test_sigkill_during_upload_and_overwrite_leaves_old_or_new_whole(store):
    """After each SIGKILL (during the upload of a new adapter, during an overwrite) every visible adapter file
    is exactly an old or a new version (the staging file may be left behind, hidden), and the restarted
    server lists and serves them all, never a staging file."""
    server, kills = store["server"], store["kills"]
    tally = Tally("SIGKILL during upload and overwrite")
    for run in kills:
        tally.add(run["outcome"])
    listed = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    for n in ("a0", "a1", "a2", "a3"):
        tally.add(_probs(server.url, n)[0])
    tally.lost = sum(r["damaged"] for r in kills)
    tally.figures = {"kills": [{k: v for k, v in r.items() if k != "damaged"} for r in kills],
                     "fresh_after_restart": "fresh" in listed}
    tally.report()
    assert tally.lost == 0 and {"a0", "a1", "a2", "a3"} <= listed
    assert all(tally.outcomes[str(s)] == 0 for s in (500, 409, 422))
    assert not any(n.startswith(".") for n in listed)  # staging files are never served as adapters


def test_disk_full_during_upload_is_a_clean_507_and_nothing_half_stored(store):
    """The server's file-size limit (RLIMIT_FSIZE via prlimit, our stand-in for a full disk: writes past
    1 KiB fail with EFBIG as they would with ENOSPC) is lowered under it: an upload and an overwrite are
    answered 507, no new file or staging file is left, every adapter is unchanged; with the limit lifted,
    the same upload succeeds."""
    server, adapters, old = store["server"], store["adapters"], store["old"]
    before = {p.name: _sha(p.read_bytes()) for p in adapters.glob("*.safetensors")}
    hidden_before = {p.name for p in adapters.iterdir() if p.name.startswith(".")}  # a kill's leftovers
    assert len(old["a1"]) > 1024
    tally = Tally("disk full during upload")
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (1024, hard))
    try:
        answers = [httpx.post(f"{server.url}/v1/adapters", params={"name": n, "overwrite": o}, content=old["a1"],
                              headers=AUTH, timeout=30) for n, o in (("full", False), ("a0", True))]
        classify = _probs(server.url, "a0")[0]
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (soft, hard))
    after_full = {p.name: _sha(p.read_bytes()) for p in adapters.glob("*.safetensors")}
    staging = sorted(p.name for p in adapters.iterdir() if p.name.startswith(".") and p.name not in hidden_before)
    retry = httpx.post(f"{server.url}/v1/adapters", params={"name": "full"}, content=old["a1"], headers=AUTH, timeout=30)
    for r in (*answers, retry):
        tally.add(r.status_code)
    tally.add(classify)
    tally.lost = sum(after_full.get(n) != h for n, h in before.items()) + len(set(after_full) - set(before))
    tally.figures = {"limit_bytes": 1024, "upload_bytes": len(old["a1"]), "message": answers[0].json()["error"]["message"],
                     "staging_files_left": staging}
    tally.report()
    assert [r.status_code for r in answers] == [507, 507] and answers[0].json()["error"]["type"] == "insufficient_storage"
    assert tally.lost == 0 and not staging and classify == 200
    assert retry.status_code == 201 and (adapters / "full.safetensors").read_bytes() == old["a1"]

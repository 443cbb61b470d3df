"""Dynamic batcher: concurrent jobs share one run, kinds never mix, row limits hold, failures stay local."""

import threading
import time

import pytest

from verakit.serve.batcher import Batcher, Job


class Recorder:
    """A `run` that records each batch and answers every job with its payload (or fails on "boom")."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[tuple[str, object]]] = []
        self.delay = delay

    def __call__(self, jobs):
        self.batches.append([(j.kind, j.payload) for j in jobs])
        time.sleep(self.delay)
        if any(j.payload == "boom" for j in jobs):
            raise RuntimeError("model exploded")
        for j in jobs:
            if j.payload != "forget":
                j.future.set_result(j.payload)


def _submit_concurrently(batcher, jobs):
    start = threading.Barrier(len(jobs))
    futures = [None] * len(jobs)

    def go(i):
        start.wait()
        futures[i] = batcher.submit(jobs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return futures


def test_concurrent_jobs_share_batches_within_the_row_limit():
    rec = Recorder()
    b = Batcher(rec, max_rows=6, max_wait_s=0.2)
    jobs = [Job("classify", 2, i) for i in range(6)]
    futures = _submit_concurrently(b, jobs)
    assert sorted(f.result(5) for f in futures) == list(range(6))
    b.close()
    assert [len(batch) for batch in rec.batches] == [3, 3]  # 2 rows each, 6 rows per batch


def test_kinds_never_mix_and_keep_arrival_order():
    rec = Recorder()
    b = Batcher(rec, max_rows=10, max_wait_s=0.3)
    b.submit(Job("classify", 1, "first"))  # its batch stays open for 0.3 s
    time.sleep(0.02)
    futures = [b.submit(Job(k, 1, f"{k}{i}")) for i, k in enumerate(["generate", "classify", "generate", "classify"])]
    for f in futures:
        f.result(5)
    b.close()
    # same-kind jobs joined the open batch; the other kind waited for the next one, in arrival order
    assert rec.batches == [[("classify", "first"), ("classify", "classify1"), ("classify", "classify3")],
                           [("generate", "generate0"), ("generate", "generate2")]]


def test_a_failing_batch_fails_its_jobs_and_the_worker_survives():
    rec = Recorder()
    b = Batcher(rec, max_rows=4, max_wait_s=0.0)
    bad = b.submit(Job("x", 1, "boom"))
    with pytest.raises(RuntimeError, match="model exploded"):
        bad.result(5)
    forgotten = b.submit(Job("x", 1, "forget"))
    with pytest.raises(RuntimeError, match="no result for this job"):
        forgotten.result(5)
    assert b.submit(Job("x", 1, "ok")).result(5) == "ok"
    b.close()


def test_max_wait_bounds_the_latency_of_a_lone_job():
    rec = Recorder()
    b = Batcher(rec, max_rows=64, max_wait_s=0.05)
    t0 = time.monotonic()
    assert b.submit(Job("x", 1, 1)).result(5) == 1
    assert time.monotonic() - t0 < 1.0
    b.close()


def test_cancelled_jobs_are_dropped_and_close_refuses_new_jobs():
    rec = Recorder(delay=0.1)
    b = Batcher(rec, max_rows=1, max_wait_s=0.0)
    b.submit(Job("x", 1, "busy"))
    time.sleep(0.02)
    gone = b.submit(Job("x", 1, "cancelled"))
    assert gone.cancel()
    b.submit(Job("x", 1, "last")).result(5)
    b.close()
    assert [p for batch in rec.batches for _, p in batch] == ["busy", "last"]
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(Job("x", 1, "late"))
    with pytest.raises(ValueError, match="at least one row"):
        Batcher(rec).submit(Job("x", 0, None))

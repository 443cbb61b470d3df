"""Dynamic batching: jobs from many threads (or event loops) become one model call on one worker thread.

The worker takes the first waiting job, then keeps taking jobs of the same kind until the batch has
`max_rows` rows or `max_wait_s` has passed since the first job was taken, and hands the batch to `run`.
Jobs of another kind wait for the next batch, in arrival order. Every model call happens on the worker
thread, so the model and its adapter bank need no locks of their own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "Batcher"]

log = logging.getLogger(__name__)
_STOP = object()


@dataclass(eq=False)
class Job:
    """One request's share of a batch. `run` must resolve `future` with a result or an exception."""

    kind: str  # only jobs of the same kind share a batch, e.g. "classify" or "generate"
    rows: int  # model rows this job adds to its batch
    payload: Any
    future: Future = field(default_factory=Future)


class Batcher:
    """Collects submitted jobs into batches and runs them one at a time on a worker thread."""

    def __init__(self, run: Callable[[list[Job]], None], max_rows: int = 32, max_wait_s: float = 0.005,
                 name: str = "verakit-batcher") -> None:
        if max_rows < 1 or max_wait_s < 0:
            raise ValueError(f"Batcher needs max_rows >= 1 and max_wait_s >= 0, got {max_rows}, {max_wait_s}")
        self._run, self.max_rows, self.max_wait_s = run, max_rows, max_wait_s
        self._queue: queue.Queue[Any] = queue.Queue()
        self._waiting: deque[Job] = deque()  # taken from the queue but not yet batched (another kind, or no room)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue `job` (any thread) and return its future."""
        if self._stopping:
            raise RuntimeError("the batcher is closed")
        if job.rows < 1:
            raise ValueError(f"a job needs at least one row, got {job.rows}")
        self._queue.put(job)
        return job.future

    def close(self, timeout: float | None = 10.0) -> None:
        """Run the jobs already queued, then stop the worker."""
        if not self._stopping:
            self._stopping = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _next(self, block: bool, timeout: float | None) -> Any:
        if self._waiting:
            return self._waiting.popleft()
        return self._queue.get(block=block, timeout=timeout)

    def _collect(self) -> tuple[list[Job], bool]:
        """(batch, stop requested). Blocks for the first job."""
        first = self._next(True, None)
        if first is _STOP:
            return [], True
        batch, rows, stop = [first], first.rows, False
        deadline = time.monotonic() + self.max_wait_s
        skipped: list[Job] = []
        while rows < self.max_rows:
            remaining = deadline - time.monotonic()
            try:
                job = self._next(remaining > 0, max(remaining, 0.0))
            except queue.Empty:
                break
            if job is _STOP:
                stop = True
                break
            if job.kind != first.kind or rows + job.rows > self.max_rows:
                skipped.append(job)
                if job.kind == first.kind:
                    break  # no room left for a same-kind job; keep arrival order
                continue
            batch.append(job)
            rows += job.rows
        self._waiting.extendleft(reversed(skipped))
        return batch, stop

    def _loop(self) -> None:
        stopping = False
        while not (stopping and not self._waiting and self._queue.empty()):
            batch, stop = self._collect()
            stopping = stopping or stop
            # Jobs whose caller has gone away (cancelled futures) are dropped here.
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._run(batch)
            except BaseException as e:  # a failing batch must never stop the worker
                log.exception("batch of %d jobs failed", len(batch))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(RuntimeError("internal error: the batch produced no result for this job"))

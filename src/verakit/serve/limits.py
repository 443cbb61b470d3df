"""How the server bounds its work and refuses the rest: the faults it answers instead of suffering them.

* `Limits`, ASGI middleware: at most `max_concurrency` requests in progress (beyond: 503 with Retry-After,
  before the body is read), and every request body received whole within `body_timeout_s` of the request's
  start (beyond: 408), so a client that trickles its body holds a slot for a bounded time. uvicorn has no
  body timeout of its own (its `timeout_keep_alive` covers only the idle time between requests).
  /health and /metrics are exempt from the count, so probes still answer under overload.
* `RowBudget`: at most `limit` model rows accepted and not yet answered (queued in the batcher or in the
  running batch); a request that would exceed it is answered 503 with Retry-After instead of waiting in an
  unbounded queue. A request is always admitted when nothing is pending, so no request is refused forever.
* `CancellableStream`: a streaming response that calls `on_close` however it ends (finished, client gone,
  server shutting down), so a generation whose reader disconnected is stopped (GenRow.cancelled).
* `install_handlers`: Overloaded -> 503; OSError with ENOSPC/EDQUOT/EFBIG (disk full, quota, file size
  limit) -> 507, so a full disk during an upload is a clean error (the staged file is already deleted).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from .schemas import ErrorBody

__all__ = ["CancellableStream", "Limits", "Overloaded", "RowBudget", "error_response", "install_handlers",
           "limit_responses", "stop_generation"]

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a refused client is told to wait; the queue drains in well under that at the defaults
_EXEMPT = frozenset({"/health", "/metrics"})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_TEXT = {
    408: "the request body did not arrive within the server's --body-timeout-s",
    503: "the server is at its limit (--max-concurrency requests in progress, or --max-queue model rows "
         "pending); retry after the Retry-After header's seconds",
    507: "no space left to store the adapter (disk full, quota, or file size limit); nothing was stored",
}


def limit_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries for the statuses these limits answer (408, 503, 507)."""
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"model": ErrorBody, "description": _TEXT[s]}
        if s == 503:
            out[s]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                 "schema": {"type": "integer"}}}
    return out


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The server's one error body: {"error": {"message", "type", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class Overloaded(Exception):
    """The server's queue is full (HTTP 503 with Retry-After)."""


class Limits:
    """ASGI middleware: bounded requests in progress and a deadline for each request body."""

    def __init__(self, app: Any, max_concurrency: int, body_timeout_s: float) -> None:
        self.app, self.max_concurrency, self.body_timeout_s = app, max_concurrency, body_timeout_s
        self.active = 0  # requests in progress; only touched on the event loop's thread

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in _EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_concurrency:
            refuse = error_response(503, "overloaded", f"{self.active} requests in progress, the server's limit "
                                    "(--max-concurrency); retry later", {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
            await refuse(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline, body_done = loop.time() + self.body_timeout_s, False

        async def receive_in_time() -> dict[str, Any]:
            # Only the body is timed: after it, receive() waits for the disconnect (streaming), unbounded.
            nonlocal body_done
            if body_done:
                return await receive()
            try:  # wait_for, not asyncio.timeout (3.11+): Python 3.10 is supported
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11
                # Connection: close, or uvicorn would keep reading the trickle after the answer.
                raise HTTPException(408, f"request body not received within {self.body_timeout_s:g} s "
                                    "(--body-timeout-s)", headers={"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        started = False

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.active += 1
        try:
            await self.app(scope, receive_in_time, send_tracked)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when --shutdown-timeout-s is over; it would answer
            # them with a bare 500. One whose answer had not started is told to retry (elsewhere) instead.
            if not started:
                await error_response(503, "shutting_down", "the server is shutting down; retry",
                                     {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})(scope, receive, send)
            raise
        finally:
            self.active -= 1


class RowBudget:
    """Counts model rows accepted and not yet answered; refuses a job that would exceed `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit, self.pending = limit, 0
        self._lock = threading.Lock()  # released from the batcher's thread, taken on the event loop's

    def submit(self, rows: int, start: Callable[[], Future]) -> Future:
        """`start()`'s future, counted as `rows` until it resolves; Overloaded when over the limit."""
        with self._lock:
            if self.pending and self.pending + rows > self.limit:
                raise Overloaded(f"{self.pending} model rows pending and this request adds {rows}: over the "
                                 f"server's limit of {self.limit} (--max-queue); retry later")
            self.pending += rows
        try:
            future = start()
        except BaseException:
            self._release(rows)
            raise
        future.add_done_callback(lambda _: self._release(rows))
        return future

    def _release(self, rows: int) -> None:
        with self._lock:
            self.pending -= rows


class CancellableStream(StreamingResponse):
    """A StreamingResponse that calls `on_close()` when it ends for any reason. Starlette cancels the
    streaming task when the client disconnects, which may leave the body iterator suspended at a `yield`
    where no `finally` of its own would run until garbage collection."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def stop_generation(future: Future, gone: threading.Event) -> None:
    """A streamed generation's reader is gone (or its stream ended): unless it already finished, drop the job
    if it is still queued (the batcher skips cancelled futures), else stop its rows at their next token
    (`gone` is their GenRow.cancelled); the batch, and its rows in the budget, are then freed."""
    if future.done():
        return
    gone.set()
    future.cancel()

    def stopped(f: Future) -> None:
        if f.cancelled():
            log.info("stream closed early: generation dropped before it started")
        elif f.exception() is None:
            log.info("stream closed early: generation stopped after %s tokens", [r.tokens for r in f.result()])

    future.add_done_callback(stopped)


def install_handlers(app: Any) -> None:
    """Overloaded -> 503 + Retry-After; disk-full OSErrors -> 507; other OSErrors -> the usual 500."""

    async def overloaded(request: Any, exc: Exception) -> JSONResponse:
        return error_response(503, "overloaded", str(exc), {"Retry-After": str(RETRY_AFTER_S)})

    async def os_error(request: Any, exc: Exception) -> JSONResponse:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            log.error("%s: no space to store: %s", request.url.path, exc)
            return error_response(507, "insufficient_storage", f"no space left to store the adapter "
                                  f"({exc.strerror or exc}); nothing was stored")
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")

    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(OSError, os_error)

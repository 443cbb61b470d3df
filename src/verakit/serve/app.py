"""The HTTP API over an Engine (FastAPI); serve/server.py runs it (uvicorn).

Imported only when serving (never by `import verakit` or `import verakit.serve`), so fastapi is imported
at the top here. No `from __future__ import annotations`: the request models are built per server (they
carry its bounds), and FastAPI must see the endpoints' annotations as those objects, not as names.

Endpoints: a classify server offers POST /v1/classify; a generate server POST /v1/completions and POST
/v1/chat/completions (OpenAI-compatible, SSE streaming); both GET /v1/models, POST /v1/adapters and
DELETE /v1/adapters/{name} (admin, bearer token), GET /health, GET /metrics (Prometheus text). With
--api-key or --keys-file the inference routes and /v1/models need a bearer key (serve/auth.py). The other
task's endpoints answer 400 naming the task and are not in the server's OpenAPI document. Every error is
JSON `{"error": {"message", "type", "code"}}`, and every status an operation can answer is in the document
(docs/serving.md, "Contract").
"""

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..fileformat import AdapterError
from .auth import Grant, Keys, caller_dependency
from .engine import EncodedPrompt, Engine, IncompatibleAdapter, InputError, UnknownAdapter, UntrainedHead
from .generate import GenResult, GenRow
from .limits import CancellableStream, Limits, RowBudget, install_handlers, limit_responses, stop_generation
from .limits import error_response as _error
from .metrics import ServeMetrics
from .options import ServeOptions
from .schemas import NAME_SCHEMA, error_responses, request_models
from .store import InvalidName, check_name

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Exception type -> (HTTP status, error type). Looked up along the MRO, most specific first.
_STATUS: dict[type[BaseException], tuple[int, str]] = {
    UnknownAdapter: (404, "not_found"),
    IncompatibleAdapter: (409, "incompatible_adapter"),
    # 409, not 422: the request is well formed; the server's base model cannot answer it (no trained head).
    UntrainedHead: (409, "untrained_head"),
    AdapterError: (422, "invalid_adapter"),
    InputError: (422, "invalid_request"),
    InvalidName: (422, "invalid_name"),
    FileExistsError: (409, "conflict"),
}


_FIXED_PATHS = frozenset({"/v1/classify", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters",
                          "/health", "/metrics"})


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        if e.get("type") == "json_invalid":  # loc is ("body", offset): say what it is, not "44: ..."
            at = e.get("loc", ())[-1] if e.get("loc") else "?"
            parts.append(f"body is not valid JSON (at character {at}: {(e.get('ctx') or {}).get('error', 'decode error')})")
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


class _Guard:
    """ASGI middleware: answer 413 before reading a body declared too large; count and time every request
    by route template (never the raw path, so adapter names cannot grow the label set) and status."""

    def __init__(self, app: Any, metrics: ServeMetrics, max_body: int, max_upload: int) -> None:
        self.app, self.metrics, self.max_body, self.max_upload = app, metrics, max_body, max_upload

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        upload = scope["method"] == "POST" and scope["path"] == "/v1/adapters"
        limit = self.max_upload if upload else self.max_body
        length = dict(scope["headers"]).get(b"content-length", b"")
        received = 0

        async def receive_limited() -> dict[str, Any]:
            # Bodies without a (truthful) Content-Length are counted as they arrive; the endpoint's
            # body read then fails with this 413, which the app renders as JSON.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        try:
            if length.isdigit() and int(length) > limit:
                too_large = _error(413, "too_large", f"request body of {int(length)} bytes exceeds the limit of {limit}")
                await too_large(scope, receive, send_status)
            else:
                await self.app(scope, receive_limited, send_status)
        finally:
            path = scope["path"]
            route = getattr(scope.get("route"), "path", None) or (path if path in _FIXED_PATHS else "unmatched")
            self.metrics.observe_request(route, status[0], time.perf_counter() - start)


def create_app(engine: Engine, metrics: ServeMetrics, options: ServeOptions, replica: str | None = None) -> Any:
    """The FastAPI app serving `engine`; `metrics` must be the one the engine reports batches to. `replica`
    names this process among several serving one store (Ray Serve replicas), in /health."""
    app = FastAPI(title="verakit", docs_url=None, redoc_url=None, description=_description(engine, options))
    # Limits inside _Guard, so its 408s and 503s are counted and timed like any answer (serve/limits.py).
    app.add_middleware(Limits, max_concurrency=options.max_concurrency, body_timeout_s=options.body_timeout_s)
    app.add_middleware(_Guard, metrics=metrics, max_body=options.max_body_bytes, max_upload=options.max_upload_bytes)
    bodies = request_models(options, engine.base_name)
    ClassifyRequest, CompletionRequest, ChatRequest = bodies.classify, bodies.completion, bodies.chat
    bearer = HTTPBearer(auto_error=False, description="the server's --admin-token")
    keys = Keys(options.api_key, options.admin_token, options.keys_file) if _keys_on(options) else None
    budget = RowBudget(options.max_queue)
    install_handlers(app)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return _error(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        message = _validation_message(list(exc.errors()))
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            message += " (send the body as JSON with Content-Type: application/json)"
        return _error(422, "invalid_request", message)

    for exc_type, (status, kind) in _STATUS.items():
        async def handler(request: Request, exc: Exception, status: int = status, kind: str = kind) -> Any:
            return _error(status, kind, str(exc))

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Any:
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal_error", f"internal error: {type(exc).__name__}")

    def task_only(task: str) -> dict[str, Any]:
        """Route arguments for an endpoint of `task`: on a server of the other task it is left out of the
        document and answers 400 saying which model it needs (before the body is read or validated)."""
        if engine.task == task:
            return {}

        def refuse() -> None:
            raise HTTPException(400, f"this server runs a {engine.task} model; this endpoint needs a {task} model")
        return {"include_in_schema": False, "dependencies": [Depends(refuse)]}

    def admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if options.admin_token is None:
            raise HTTPException(403, "admin endpoints are disabled: start the server with --admin-token")
        token = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(token.encode(), options.admin_token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    Caller = Annotated[Grant, Depends(caller_dependency(keys))]

    def adapter_ref(grant: Grant, name: str | None) -> str | None:
        """The engine's ref of `name` for `grant`'s caller. A name outside the grant is refused before the
        store is consulted, with the engine's own unknown-adapter error: the same answer, and no disk lookup
        whose timing could tell a name that exists from one that does not. Called before anything reaches
        the batcher, so a mixed batch only ever holds rows their callers may run."""
        if name is not None and name != engine.base_name and not grant.allows(name):
            raise UnknownAdapter(f"adapter {name!r} not found")
        return engine.adapter_ref(name)

    keyed = (401,) if keys is not None else ()
    inference = {**error_responses(400, *keyed, 404, 409, 413, 422, 500), **limit_responses(408, 503)}
    # OpenAPI 3.1: an event stream's `schema` describes one event.
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "a JSON chunk (OpenAI's), an error body, or [DONE] (the last event)"}}}
    stream = {200: {"description": "JSON, or with \"stream\": true server-sent events ending with `data: [DONE]`",
                    "content": {"text/event-stream": {"schema": event}}}}

    @app.post("/v1/classify", responses=inference, **task_only("classify"))
    async def classify(body: ClassifyRequest, grant: Caller) -> dict[str, Any]:
        ref = adapter_ref(grant, body.adapter)
        encodings = engine.encode_inputs([x if isinstance(x, str) else tuple(x) for x in body.inputs], ref)
        res = await asyncio.wrap_future(budget.submit(len(encodings), lambda: engine.classify(ref, encodings)))
        out = {"adapter": body.adapter, "label_names": res.label_names, "labels": res.labels, "probs": res.probs}
        if res.scores:
            out["scores"] = res.scores
        return out

    async def run_generation(
        ref: str | None, prompts: list[EncodedPrompt], body: CompletionRequest | ChatRequest, max_tokens: int,
        render: Callable[[list[GenResult]], dict[str, Any]], chunk: Callable[[int, str | None, str | None], dict[str, Any]],
    ) -> Any:
        n, stops = body.n, body.stops()
        if not body.stream:
            rows = [GenRow(p.ids, max_tokens, body.temperature, body.top_p, stops, stop_ids=p.stop_ids)
                    for p in prompts for _ in range(n)]
            return render(await asyncio.wrap_future(budget.submit(len(rows), lambda: engine.generate(ref, rows))))
        loop, queue, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def sink(index: int) -> Callable[[str], None]:
            return lambda text: loop.call_soon_threadsafe(queue.put_nowait, (index, text))

        rows = [GenRow(p.ids, max_tokens, body.temperature, body.top_p, stops, sink(k * n + j), p.stop_ids, gone.is_set)
                for k, p in enumerate(prompts) for j in range(n)]
        future = budget.submit(len(rows), lambda: engine.generate(ref, rows))
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, (None, f)))
        first = await queue.get()
        if first[0] is None and first[1].exception() is not None:
            raise first[1].exception()  # nothing sent yet, so the client gets a proper status

        async def events() -> AsyncIterator[str]:
            item = first
            for k in range(len(rows)):
                yield f"data: {json.dumps(chunk(k, None, None))}\n\n"  # opens each choice
            while True:
                index, payload = item
                if index is None:
                    done: Future = payload
                    if done.exception() is not None:
                        exc = done.exception()
                        status, kind = next((v for t, v in _STATUS.items() if isinstance(exc, t)), (500, "internal_error"))
                        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': kind, 'code': status}})}\n\n"
                    else:
                        for k, r in enumerate(done.result()):
                            yield f"data: {json.dumps(chunk(k, '', r.finish_reason))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield f"data: {json.dumps(chunk(index, payload, None))}\n\n"
                item = await queue.get()

        return CancellableStream(events(), lambda: stop_generation(future, gone), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def usage(prompts: list[EncodedPrompt], results: list[GenResult]) -> dict[str, int]:
        p, c = sum(len(x.ids) for x in prompts), sum(r.tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions", responses={**stream, **inference}, **task_only("generate"))
    async def completions(body: CompletionRequest, grant: Caller) -> Any:
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        ref = adapter_ref(grant, body.model)
        fmt = None if body.raw else engine.prompt_format(ref)
        prompts = [engine.encode_prompt(t, body.max_tokens, fmt) for t in texts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": body.model}

        def render(results: list[GenResult]) -> dict[str, Any]:
            choices = [{"index": k, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                       for k, r in enumerate(results)]
            return {**head, "choices": choices, "usage": usage(prompts, results)}

        def chunk(k: int, text: str | None, finish: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": k, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        return await run_generation(ref, prompts, body, body.max_tokens, render, chunk)

    @app.post("/v1/chat/completions", responses={**stream, **inference}, **task_only("generate"))
    async def chat(body: ChatRequest, grant: Caller) -> Any:
        max_tokens = body.max_completion_tokens or body.max_tokens or options.max_new_tokens
        ref = adapter_ref(grant, body.model)
        fmt = None if body.raw else engine.prompt_format(ref)
        prompts = [engine.encode_chat([m.model_dump() for m in body.messages], max_tokens, fmt, ref)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model}

        def render(results: list[GenResult]) -> dict[str, Any]:
            choices = [{"index": k, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
                       for k, r in enumerate(results)]
            return {**head, "choices": choices, "usage": usage(prompts, results)}

        def chunk(k: int, text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {**head, "object": "chat.completion.chunk", "choices": [{"index": k, "delta": delta, "finish_reason": finish}]}

        return await run_generation(ref, prompts, body, max_tokens, render, chunk)

    admin_errors = {**error_responses(401, 403, 404, 409, 413, 422, 500), **limit_responses(408, 503, 507)}
    upload_body = {"requestBody": {"required": True, "description": (
        f"the adapter file (.safetensors, docs/format.md), at most {options.max_upload_bytes} bytes"),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
    admin_name = Annotated[str, AfterValidator(check_name)]

    @app.post("/v1/adapters", status_code=201, dependencies=[Depends(admin)], openapi_extra=upload_body,
              responses={k: v for k, v in admin_errors.items() if k != 404})
    async def upload(request: Request, name: Annotated[admin_name, Query(json_schema_extra=NAME_SCHEMA)],
                     overwrite: bool = False) -> dict[str, Any]:
        if name == engine.base_name:  # stored, it would be shadowed: requests naming it get the base model
            raise FileExistsError(f"{name!r} is the base model's name: requests naming it get the base model, "
                                  "never this adapter; upload it under another name")
        data = await request.body()
        adapter = await run_in_threadpool(engine.upload, name, data, overwrite)
        return {"name": name, "bytes": len(data), "r": adapter.config.r, "layers": len(adapter.modules),
                "labels": adapter.extra.get("labels")}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(admin)],
                responses={k: v for k, v in admin_errors.items() if k not in (408, 409, 413, 507)})
    def delete(name: Annotated[admin_name, Path(json_schema_extra=NAME_SCHEMA)]) -> dict[str, Any]:
        engine.delete(name)
        return {"deleted": name}

    @app.get("/v1/models", responses={**error_responses(*keyed, 500), **limit_responses(503)})
    def models(grant: Caller) -> dict[str, Any]:
        resident = engine.resident
        data = [{"id": engine.base_name, "object": "model", "owned_by": "verakit", "kind": "base", "resident": True}]
        for name in sorted(n for n in set(engine.store.names()) | resident if grant.allows(n)):
            data.append({"id": name, "object": "model", "owned_by": "verakit", "kind": "adapter", "resident": name in resident})
        return {"object": "list", "data": data}

    # Open by default (load balancers probe /health without secrets); --protect-metrics: the admin token.
    ops = {"dependencies": [Depends(admin)]} if options.protect_metrics else {}
    ops_errors = (401,) if options.protect_metrics else ()

    @app.get("/health", responses=error_responses(*ops_errors, 500), **ops)
    def health() -> dict[str, Any]:
        return {"status": "ok", "task": engine.task, "model": engine.base_name, "rank": engine.bank.config.r,
                "resident": len(engine.resident), "capacity": engine.bank.capacity,
                **({"replica": replica} if replica is not None else {})}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}}, **error_responses(*ops_errors, 500)}, **ops)
    def prometheus() -> Any:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


def _keys_on(options: ServeOptions) -> bool:
    return options.api_key is not None or options.keys_file is not None


def _description(engine: Engine, options: ServeOptions) -> str:
    """The document's bounds that JSON Schema cannot express, stated once for every operation."""
    return (f"verakit {engine.task} server over base model {engine.base_name!r}. Every error answer is "
            "{\"error\": {\"message\", \"type\", \"code\"}}. Bounds: JSON bodies at most "
            f"{options.max_body_bytes} bytes and uploads at most {options.max_upload_bytes} bytes (413 beyond); "
            f"each input, prompt or rendered conversation at most {options.max_input_tokens} tokens, and prompt "
            "tokens + max_tokens within the model's context (422 beyond); the other bounds are in the schemas."
            + (" Inference routes and /v1/models need an API key (Authorization: Bearer KEY; 401 without one); "
               "an adapter outside the key's set is answered as an unknown one (404)." if _keys_on(options) else ""))

"""Settings of one `verakit serve` process: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ServeOptions", "OptionError", "TASKS", "DTYPES"]

TASKS = ("classify", "generate")
DTYPES = ("float32", "bfloat16", "float16")


class OptionError(ValueError):
    """A ServeOptions field is invalid. `field` names it and `rule` says what it must be, so the CLI can name
    its flag instead (`--admin-token must be ...`) while the library names the field."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"ServeOptions.{field} {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class ServeOptions:
    """Everything the server needs; `verakit serve` flags map one to one onto these fields.

    model: base model: a transformers folder, a hub id (when online), or the aliases "minilm" / "smollm2";
        None picks the default for `task` (MiniLM for classify, SmolLM2 for generate).
    adapters: directory of `<name>.safetensors` adapter files, loaded on first use.
    host, port: where to listen; loopback by default so nothing is exposed unless asked; port 0 takes a free
        port (the start-up line names it).
    capacity: adapters resident at once (slot tables are allocated for all of them at start-up); the
        least recently used one is evicted when a new one is needed.
    admin_token: bearer token for POST/DELETE /v1/adapters; None disables those endpoints.
    api_key: bearer key every inference route (and /v1/models) requires; it may use every adapter. None,
        with no keys_file: those routes are open.
    keys_file: JSON file of tenant keys (SHA-256 hashes) and the adapter names or patterns each may use
        (serve/auth.py); re-read when it changes. With it, a request for an adapter outside its key's set is
        answered as an unknown adapter (404) and /v1/models lists only the key's adapters.
    protect_metrics: put /health and /metrics behind the admin token (needs admin_token).
    max_batch: most model rows (inputs, or prompts x n) in one forward.
    max_wait_ms: how long the batcher waits after the first request for more to join its batch.
    task: "classify" or "generate"; None infers it from the model (causal LM -> generate).
    rank: the bank's rank R; None takes the largest rank among the adapters on disk (256 if none).
    max_body_bytes / max_upload_bytes: request body limits for JSON requests / adapter uploads.
    max_inputs: most inputs per classify request and prompts per completion request.
    max_input_tokens: most tokens per input or prompt (also capped by the model's context).
    max_new_tokens: largest allowed `max_tokens`; max_n: largest allowed `n`.
    max_concurrency: most requests in progress at once (/health and /metrics aside); beyond it a request is
        answered 503 with Retry-After before its body is read. Bounds the server's memory under a flood.
    max_queue: most model rows (inputs, or prompts x n) accepted and not yet answered; a request that would
        exceed it is answered 503 with Retry-After instead of waiting (one is always admitted when none are
        pending). The default is 16 full batches at the default max_batch.
    body_timeout_s: seconds from a request's start within which its whole body must arrive (408 beyond), so
        a client trickling its body holds a connection and a max_concurrency slot only that long.
    shutdown_timeout_s: on SIGTERM or Ctrl-C, how long the requests in progress may take to finish (new
        connections are refused meanwhile); those still running then are cut (503 if their answer had not
        started).
    dtype: dtype of the base model weights (the adapter vectors stay float32).
    check_base: refuse (409) an adapter whose recorded base-weight samples differ from this base model's
        weights (another checkpoint of the same architecture; docs/format.md, "Base-weight samples").
    threads: torch intra-op threads for the model; None keeps torch's default (one per core). On a
        machine shared with other work, 1 avoids threads waiting on each other at every op.
    """

    model: str | None
    adapters: str
    host: str = "127.0.0.1"
    port: int = 8000
    capacity: int = 256
    admin_token: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    task: str | None = None
    rank: int | None = None
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
    max_inputs: int = 64
    max_input_tokens: int = 512
    max_new_tokens: int = 256
    max_n: int = 8
    dtype: str = "float32"
    threads: int | None = None
    api_key: str | None = None
    keys_file: str | None = None
    protect_metrics: bool = False
    max_concurrency: int = 512
    max_queue: int = 512
    body_timeout_s: float = 30.0
    shutdown_timeout_s: float = 30.0
    check_base: bool = True

    def __post_init__(self) -> None:
        for f in ("capacity", "max_batch", "max_body_bytes", "max_upload_bytes", "max_inputs",
                  "max_input_tokens", "max_new_tokens", "max_n", "max_concurrency", "max_queue"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f, f"must be an integer >= 1, got {v!r}")
        if not 0 <= self.port < 65536:
            raise OptionError("port", f"must be in 0..65535, got {self.port}")
        for f in ("body_timeout_s", "shutdown_timeout_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise OptionError(f, f"must be a number of seconds > 0, got {v!r}")
        if not (math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0):  # nan / inf would start a server
            raise OptionError("max_wait_ms", f"must be a finite number >= 0, got {self.max_wait_ms}")
        if self.task is not None and self.task not in TASKS:
            raise OptionError("task", f"must be one of {TASKS} or None, got {self.task!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise OptionError("rank", f"must be an integer >= 1 or None, got {self.rank!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise OptionError("threads", f"must be an integer >= 1 or None, got {self.threads!r}")
        if self.dtype not in DTYPES:
            raise OptionError("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.admin_token is not None and len(self.admin_token) < 8:
            # The value is never echoed: it is a secret, perhaps one typed into the wrong variable.
            raise OptionError("admin_token", "must be at least 8 characters")
        if self.api_key is not None and len(self.api_key) < 8:
            raise OptionError("api_key", "must be at least 8 characters")
        if self.protect_metrics and self.admin_token is None:
            raise OptionError("protect_metrics", "needs an admin token (--admin-token) to protect them with")

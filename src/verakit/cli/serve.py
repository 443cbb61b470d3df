"""`verakit serve`: many adapters over one base model over HTTP (docs/serving.md).

Every flag is a ServeOptions field (`--max-batch` is `max_batch`) and takes its default from the dataclass,
so `--help` shows the defaults the server really uses and an invalid value is reported under its flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from typing import Any

from .common import fields_of

__all__ = ["add_parsers", "flag_of", "run_hash_key", "run_serve"]

_RAY_FIELDS = ("replicas", "min_replicas", "max_replicas", "address")  # RayOptions fields with a flag

_TOKEN_ENV = "VERAKIT_ADMIN_TOKEN"
_KEY_ENV = "VERAKIT_API_KEY"
_ENV = {"admin_token": _TOKEN_ENV, "api_key": _KEY_ENV}


def flag_of(field: str) -> str:
    """The `verakit serve` flag of ServeOptions field `field` (`admin_token` -> `--admin-token`)."""
    flag = "--" + field.replace("_", "-")
    return f"{flag} (or ${_ENV[field]})" if field in _ENV else flag


def run_serve(args: argparse.Namespace) -> int:
    """Validate the options, load the model and bind the port (2 and the message when any of that fails),
    then print where it listens and serve until stopped."""
    from ..models import ModelNotInstalledError
    from ..serve.options import OptionError, ServeOptions
    from ..serve.server import Server

    try:
        options = ServeOptions(**fields_of(ServeOptions, args))
    except OptionError as e:
        print(f"verakit serve: error: {flag_of(e.field)} {e.rule}", file=sys.stderr)
        return 2
    ray_flags = [f for f in _RAY_FIELDS if getattr(args, f) is not None]
    if args.engine != "ray" and ray_flags:
        print(f"verakit serve: error: {flag_of(ray_flags[0])} needs --engine ray", file=sys.stderr)
        return 2
    if args.engine == "ray":
        return _run_ray(options, args)
    try:
        server = Server(options)
    # ValueError: a model alias of the other task, a model whose adapters do not fit; OSError: a port in use,
    # a model folder transformers cannot read; KeyFileError (a ValueError): a missing or malformed --keys-file.
    # Each message names the model, folder, file or address.
    except (ValueError, OSError, ModelNotInstalledError) as e:
        print(f"verakit serve: error: {e}", file=sys.stderr)
        return 2
    print(f"verakit serve: {server.describe()}", flush=True)
    server.serve()
    return 0


def _run_ray(options: Any, args: argparse.Namespace) -> int:
    """`--engine ray`: the same app on Ray Serve replicas (serve/ray_engine.py)."""
    try:
        import ray  # noqa: F401 - only to report a missing extra here, naming it

        from ..serve.ray_engine import RayOptionError, RayOptions, RayServer
    except ImportError as e:
        print(f"verakit serve: error: --engine ray needs Ray Serve: pip install 'verakit[ray]' ({e})", file=sys.stderr)
        return 2
    try:
        given = {f: getattr(args, f) for f in _RAY_FIELDS if getattr(args, f) is not None}
        ray_options = RayOptions(**given, cpus_per_replica=float(options.threads or 1))
    except RayOptionError as e:
        print(f"verakit serve: error: {flag_of(e.field)} {e.rule}", file=sys.stderr)
        return 2
    try:
        server = RayServer(options, ray_options)
    # ValueError/OSError as for the local engine (the driver reads the adapter headers); RuntimeError: Ray
    # could not start or join the cluster, or the replicas failed to start (Ray's message names why).
    except (ValueError, OSError, RuntimeError, ConnectionError) as e:
        print(f"verakit serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while the replicas loaded: the cluster is already stopped
        return 130
    print(f"verakit serve: {server.describe()}", flush=True)
    server.serve()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `serve`."""
    from ..serve.options import DTYPES, TASKS, ServeOptions

    # A field without a default (model: the CLI's default is None, resolved from --task) reads as None.
    default: dict[str, Any] = {f.name: None if f.default is MISSING else f.default for f in fields(ServeOptions)}
    s = sub.add_parser("serve", help="serve many adapters over one base model over HTTP (mixed-adapter batches)",
                       description="Serve many VeRA adapters over one base model over HTTP (docs/serving.md). "
                       "Prints 'listening on URL' once the model is loaded and the port bound.")

    def opt(field: str, help: str, **kw: Any) -> None:
        s.add_argument(flag_of(field).split()[0], dest=field, default=default[field], help=help, **kw)

    opt("model", "base model folder, hub id (when online), or the alias minilm / smollm2 (default: minilm for "
        "classify, smollm2 for generate)")
    s.add_argument("--adapters", required=True, help="directory of NAME.safetensors adapters, loaded on first use")
    opt("host", "bind address (default: %(default)s, loopback only)")
    opt("port", "port (default: %(default)s; 0 picks a free port, named in the start-up line)", type=int)
    opt("capacity", "adapters resident at once, LRU-evicted (default: %(default)s)", type=int)
    s.add_argument("--admin-token", dest="admin_token", default=os.environ.get(_TOKEN_ENV),
                   help=f"bearer token, 8+ characters, enabling adapter upload/delete (default: ${_TOKEN_ENV}; "
                   "admin endpoints off without it)")
    s.add_argument("--api-key", dest="api_key", default=os.environ.get(_KEY_ENV),
                   help=f"bearer key, 8+ characters, every inference route and /v1/models then require "
                   f"(default: ${_KEY_ENV}; open without it or --keys-file)")
    opt("keys_file", "JSON file of tenant keys: SHA-256 hashes and the adapter names or patterns each may use; "
        "re-read when it changes; entries from `verakit hash-key` (default: none; docs/serving.md, Keys and tenants)")
    s.add_argument("--protect-metrics", dest="protect_metrics", action="store_true",
                   help="put /health and /metrics behind the admin token (default: open)")
    opt("max_batch", "most model rows (inputs, or prompts x n) per batched forward (default: %(default)s)", type=int)
    opt("max_wait_ms", "how long a batch waits for more requests to join it (default: %(default)s)", type=float)
    opt("max_concurrency", "most requests in progress; beyond: 503 with Retry-After (default: %(default)s)", type=int)
    opt("max_queue", "most model rows accepted and not yet answered; beyond: 503 with Retry-After "
        "(default: %(default)s)", type=int)
    opt("body_timeout_s", "seconds within which a request's whole body must arrive; beyond: 408 "
        "(default: %(default)s)", type=float)
    opt("shutdown_timeout_s", "on SIGTERM/Ctrl-C, seconds the requests in progress get to finish "
        "(default: %(default)s)", type=float)
    opt("task", "default: from the adapters on disk (a causal-LM adapter serves generate), else from the model "
        "(a causal LM serves generate, anything else classify)", choices=TASKS)
    opt("rank", "bank rank (default: the largest adapter rank on disk, 256 without adapters)", type=int)
    opt("max_body_bytes", "largest JSON request body (default: %(default)s)", type=int)
    opt("max_upload_bytes", "largest adapter upload (default: %(default)s)", type=int)
    opt("max_inputs", "inputs per classify request / prompts per completion (default: %(default)s)", type=int)
    opt("max_input_tokens", "tokens per input or prompt, also capped by the model's context (default: %(default)s)",
        type=int)
    opt("max_new_tokens", "largest max_tokens allowed (default: %(default)s)", type=int)
    opt("max_n", "largest n allowed (default: %(default)s)", type=int)
    opt("dtype", "dtype of the base model weights; adapter vectors stay float32 (default: %(default)s)", choices=DTYPES)
    opt("threads", "torch threads; 1 suits a machine shared with other work (default: torch's, one per core)",
        type=int)
    s.add_argument("--no-base-check", dest="check_base", action="store_false",
                   help="serve adapters whose recorded base-weight samples differ from this base model (another "
                   "checkpoint of the same architecture; default: refused with 409, docs/format.md)")
    s.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: one process; ray: replicas on Ray Serve over the same --adapters directory, "
                   "pip install 'verakit[ray]' (default: %(default)s; docs/serving.md, Ray Serve)")
    s.add_argument("--replicas", type=int, help="--engine ray: number of replicas (default: 1)")
    s.add_argument("--min-replicas", dest="min_replicas", type=int,
                   help="--engine ray: autoscaling range, with --max-replicas (default: a fixed --replicas)")
    s.add_argument("--max-replicas", dest="max_replicas", type=int, help="--engine ray: see --min-replicas")
    s.add_argument("--address", help="--engine ray: Ray cluster to join, e.g. auto or ray://HOST:10001 (default: "
                   "start a local one for this command; each replica reserves --threads CPUs, default 1)")
    s.set_defaults(func=run_serve)

    h = sub.add_parser("hash-key", help="make a --keys-file entry for a tenant key (prints JSON; the key is not stored)",
                       description="Print one entry of a `verakit serve --keys-file` file: the key's SHA-256, the "
                       "tenant's name and the adapters it may use. Without --key a new random key is made and "
                       "printed on stderr: hand it to the tenant, it is stored nowhere.")
    h.add_argument("--name", required=True, help="the tenant's name (for logs and your own records)")
    h.add_argument("--adapter", dest="adapters", action="append", required=True,
                   help="an adapter name or fnmatch pattern (acme-*) the key may use; repeat for more")
    h.add_argument("--key", help="hash this key instead of making a new one (beware: it lands in shell history)")
    h.set_defaults(func=run_hash_key)


def run_hash_key(args: argparse.Namespace) -> int:
    """Print a keys-file entry for `--key` (or a fresh key, printed on stderr)."""
    import json
    import secrets

    from ..serve.auth import hash_key

    key = args.key if args.key is not None else "vk-" + secrets.token_urlsafe(32)
    if len(key) < 8:
        print("verakit hash-key: error: --key must be at least 8 characters", file=sys.stderr)
        return 2
    if args.key is None:
        print(f"new key (give it to {args.name}; it is stored nowhere): {key}", file=sys.stderr)
    print(json.dumps({"sha256": hash_key(key), "name": args.name, "adapters": args.adapters}))
    return 0

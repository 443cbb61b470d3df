"""`verakit serve`: many adapters over one base model over HTTP (docs/serving.md).

Every flag is a ServeOptions field (`--max-batch` is `max_batch`) and takes its default from the dataclass,
so `--help` shows the defaults the server really uses and an invalid value is reported under its flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any

from .common import fields_of

__all__ = ["add_parsers", "flag_of", "run_serve"]

_TOKEN_ENV = "VERAKIT_ADMIN_TOKEN"


def flag_of(field: str) -> str:
    """The `verakit serve` flag of ServeOptions field `field` (`admin_token` -> `--admin-token`)."""
    flag = "--" + field.replace("_", "-")
    return f"{flag} (or ${_TOKEN_ENV})" if field == "admin_token" else flag


def run_serve(args: argparse.Namespace) -> int:
    """Validate the options, load the model and bind the port (2 and the message when any of that fails),
    then print where it listens and serve until stopped."""
    from ..models import ModelNotInstalledError
    from ..serve.app import Server
    from ..serve.options import OptionError, ServeOptions

    try:
        options = ServeOptions(**fields_of(ServeOptions, args))
    except OptionError as e:
        print(f"verakit serve: error: {flag_of(e.field)} {e.rule}", file=sys.stderr)
        return 2
    try:
        server = Server(options)
    # ValueError: a model alias of the other task, a model whose adapters do not fit; OSError: a port in use,
    # a model folder transformers cannot read. Each message names the model, folder or address.
    except (ValueError, OSError, ModelNotInstalledError) as e:
        print(f"verakit serve: error: {e}", file=sys.stderr)
        return 2
    print(f"verakit serve: {server.describe()}", flush=True)
    server.serve()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `serve`."""
    from ..serve.options import DTYPES, TASKS, ServeOptions

    default: dict[str, Any] = {f.name: f.default for f in fields(ServeOptions)}
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
    opt("max_batch", "most model rows (inputs, or prompts x n) per batched forward (default: %(default)s)", type=int)
    opt("max_wait_ms", "how long a batch waits for more requests to join it (default: %(default)s)", type=float)
    opt("task", "default: from the model (a causal LM serves generate, anything else classify)", choices=TASKS)
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
    s.set_defaults(func=run_serve)

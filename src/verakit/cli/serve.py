"""`verakit serve`: many adapters over one base model over HTTP (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import fields_of

__all__ = ["add_parsers", "run_serve"]


def run_serve(args: argparse.Namespace) -> int:
    """Validate the options (2 and the message when bad), then serve until stopped."""
    from ..serve.app import run_server
    from ..serve.options import ServeOptions

    fields = fields_of(ServeOptions, args)
    try:
        options = ServeOptions(**fields)
    except ValueError as e:
        print(f"verakit serve: error: {e}", file=sys.stderr)
        return 2
    run_server(options)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `serve`."""
    s = sub.add_parser("serve", help="serve many adapters over one base model over HTTP (mixed-adapter batches)")
    s.add_argument("--model", default=None, help="base model folder, hub id, or minilm / smollm2 (default: per task)")
    s.add_argument("--adapters", required=True, help="directory of NAME.safetensors adapters, loaded on first use")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--capacity", type=int, default=256, help="adapters resident at once, LRU-evicted (default 256)")
    s.add_argument("--admin-token", default=os.environ.get("VERAKIT_ADMIN_TOKEN"),
                   help="bearer token enabling adapter upload/delete (default: $VERAKIT_ADMIN_TOKEN; off without)")
    s.add_argument("--max-batch", type=int, default=32, help="most rows per batched forward (default 32)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    s.add_argument("--task", default=None, choices=["classify", "generate"], help="default: from the model")
    s.add_argument("--rank", type=int, default=None, help="bank rank (default: the largest adapter rank on disk)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-upload-bytes", type=int, default=64 << 20)
    s.add_argument("--max-inputs", type=int, default=64, help="inputs per classify request / prompts per completion")
    s.add_argument("--max-input-tokens", type=int, default=512)
    s.add_argument("--max-new-tokens", type=int, default=256, help="largest max_tokens allowed")
    s.add_argument("--max-n", type=int, default=8, help="largest n allowed")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    s.set_defaults(func=run_serve)

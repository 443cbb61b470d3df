"""The `verakit` command line. Each subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _inspect(args: argparse.Namespace) -> int:
    from .fileformat import read_adapter

    ad = read_adapter(args.file)
    size = Path(args.file).stat().st_size
    vec = sum(t.numel() for t in (*ad.d.values(), *ad.b.values()))
    info = {
        "file": str(args.file),
        "bytes": size,
        "dtype": ad.dtype,
        "config": ad.config.to_dict(),
        "model_type": ad.model_type,
        "architecture": ad.architecture,
        "fingerprint": ad.fingerprint,
        "layers": len(ad.modules),
        "vector_params": vec,
        "saved_params": ad.trained_numel - vec,
        "saved_tensors": sorted(ad.saved),
        "extra": ad.extra,
    }
    if args.json:
        info["modules"] = {n: list(v) for n, v in ad.modules.items()}
        print(json.dumps(info, indent=2))
        return 0
    cfg = ad.config
    print(f"{args.file}: verakit adapter, {size:,} bytes ({ad.dtype})")
    print(f"  base          {ad.architecture} (model_type={ad.model_type}), fingerprint {ad.fingerprint}")
    print(f"  projection    seed={cfg.seed} distribution={cfg.distribution} sharing={cfg.projection_sharing} r={cfg.r}")
    print(f"  targets       {cfg.target_modules} -> {len(ad.modules)} layers")
    print(f"  trained       {vec:,} vector params (d, b) + {info['saved_params']:,} in saved modules")
    if ad.saved:
        print(f"  saved modules {', '.join(cfg.modules_to_save)}")
    if ad.extra:
        print(f"  extra         {json.dumps(ad.extra)[:200]}")
    for n, (d_out, d_in, kind) in list(ad.modules.items())[: args.max_layers]:
        print(f"    {n}  ({d_out} x {d_in}, {kind})")
    if len(ad.modules) > args.max_layers:
        print(f"    ... {len(ad.modules) - args.max_layers} more (--max-layers)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_pretrained

    out = merge_pretrained(args.model, args.adapter, args.out)
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="verakit", description="VeRA adapters: train, inspect, merge, serve.")
    p.add_argument("--version", action="version", version=f"verakit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show an adapter file's config, layers, size and fingerprint")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--max-layers", type=int, default=8, help="layers to list (default 8)")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("merge", help="merge an adapter into a transformers model directory")
    s.add_argument("--model", required=True, help="base model directory (or hub id when online)")
    s.add_argument("--adapter", required=True, help="adapter .safetensors file")
    s.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    s.set_defaults(func=_merge)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .fileformat import AdapterError

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (AdapterError, ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"verakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `verakit` command line. Each subcommand parses arguments and calls one library function.

One module per subcommand family: adapters (inspect, convert, merge), serve, train (train, eval), tune,
generate; common holds the option groups and error handling they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import adapters, generate, serve, train, tune

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The whole `verakit` parser; each subcommand's `func` takes the parsed namespace, returns the exit code."""
    from .. import __version__

    p = argparse.ArgumentParser(prog="verakit", description="VeRA adapters: train, inspect, merge, serve.")
    p.add_argument("--version", action="version", version=f"verakit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # The order of `verakit --help`'s command list.
    adapters.add_parsers(sub)
    serve.add_parsers(sub)
    train.add_parsers(sub)
    tune.add_parsers(sub)
    generate.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `verakit` command; errors that name their file or field become exit code 2 and one line."""
    from ..config import ConfigError
    from ..fileformat import AdapterError
    from ..train.data import DataError  # stdlib only
    from ..train.lm_data import LMDataError
    from ..train.methods import ArtifactError

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (AdapterError, ConfigError, FileExistsError, FileNotFoundError, DataError, ArtifactError, LMDataError) as e:
        print(f"verakit {args.command}: error: {e}", file=sys.stderr)
        return 2

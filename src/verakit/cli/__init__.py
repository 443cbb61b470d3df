"""The `verakit` command line. Each subcommand parses arguments and calls one library function.

One module per subcommand family: adapters (inspect, convert, merge), serve (serve, hash-key), train (train,
eval), tune, generate, plan; common holds the option groups and error handling they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import adapters, generate, plan, serve, train, tune

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The whole `verakit` parser; each subcommand's `func` takes the parsed namespace, returns the exit code."""
    from .._version import __version__

    p = argparse.ArgumentParser(prog="verakit", description="VeRA adapters: train, inspect, merge, serve.")
    p.add_argument("--version", action="version", version=f"verakit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # The order of `verakit --help`'s command list: the README's order, the main job (train, eval) first.
    train.add_parsers(sub)
    tune.add_parsers(sub)
    generate.add_parsers(sub)
    plan.add_parsers(sub)
    adapters.add_parsers(sub)
    serve.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `verakit` command; errors that name their file or field become exit code 2 and one line.

    A reader that stops early (`verakit inspect FILE | head`) ends the command quietly with exit code 1.
    """
    from ..config import ConfigError
    from ..fileformat import AdapterError
    from ..models import ModelNotInstalledError  # stdlib only
    from ..train.artifacts import ArtifactError
    from ..train.causal.lm_data import LMDataError
    from ..train.errors import DataError  # stdlib only

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a reader gone before a short output was flushed shows up here, not at exit
        return code
    except BrokenPipeError:
        # Python's documented recipe: stdout's remaining buffer would raise again when the interpreter
        # flushes it at exit, so point stdout at devnull first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (AdapterError, ConfigError, FileExistsError, FileNotFoundError, DataError, ArtifactError, LMDataError,
            ModelNotInstalledError) as e:
        print(f"verakit {args.command}: error: {e}", file=sys.stderr)
        return 2

"""What several `verakit` subcommands share: option groups, value parsers, logging, and how a training
or evaluation call becomes an exit code and its message on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_vera_options", "csv_list", "fields_of", "log_to_stderr", "print_evaluation", "run_training"]


def csv_list(value: str) -> tuple[str, ...]:
    """A comma-separated option value as a tuple of its non-empty, stripped items."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def fields_of(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} of dataclass `cls`'s fields read from the parsed arguments (each must exist)."""
    return {k: getattr(args, k) for k in cls.__dataclass_fields__}


def add_vera_options(s: argparse.ArgumentParser) -> None:
    """The VeRA ablation flags of `verakit train` and `verakit tune` (VeraConfig's fields)."""
    from ..config import DISTRIBUTIONS, SHARING_MODES

    g = s.add_argument_group("VeRA options (the paper's ablations; docs/tuning.md)")
    g.add_argument("--train-d", action=argparse.BooleanOptionalAction, default=True,
                   help="train d (--no-train-d: d stays at --d-initial; the paper's 'only b' uses 1.0)")
    g.add_argument("--train-b", action=argparse.BooleanOptionalAction, default=True,
                   help="train b (--no-train-b: b is fixed at ones; the paper's 'only d' uses --d-initial 0)")
    g.add_argument("--distribution", default="kaiming_uniform", choices=DISTRIBUTIONS,
                   help="projection values (default kaiming_uniform; uniform is on [0, 0.1), the paper's bad case)")
    g.add_argument("--projection-sharing", default="shared", choices=SHARING_MODES,
                   help="one projection pair for all layers (default) or a unique pair per layer")
    g.add_argument("--adapter-compute-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: VeRA's own products (delta, g^T x, A x) in bf16 during training steps, faster on "
                   "CPUs with avx512_bf16/AMX and on GPUs; evaluation and the saved file stay exact (default fp32; "
                   "classification tasks only; docs/performance.md)")


def log_to_stderr() -> None:
    """INFO log lines with timestamps on stderr: training progress without a progress bar."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def run_training(train: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(exit code, metrics) of one `verakit train` call: 0 and what `train()` returned (empty on a non-main
    DDP process); after Ctrl-C 130, and for bad data or settings 2, each with its message on stderr, and {}.
    """
    from ..train.loop import TrainingInterrupted

    log_to_stderr()
    try:
        return 0, train()
    except TrainingInterrupted as e:
        print(f"verakit train: {e}", file=sys.stderr)
        return 130, {}
    except ValueError as e:  # bad data, groups or settings, a mismatched --resume: the message names the culprit
        print(f"verakit train: error: {e}", file=sys.stderr)
        return 2, {}


def print_evaluation(evaluate: Callable[[], dict[str, Any]]) -> int:
    """`verakit eval`: print what `evaluate()` returns as JSON (0), or its error on stderr (2)."""
    log_to_stderr()
    try:
        result = evaluate()
    except ValueError as e:  # bad data, an unusable artifact, labels, classes or a split that do not match
        print(f"verakit eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0

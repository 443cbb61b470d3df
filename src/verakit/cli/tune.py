"""`verakit tune`: a resumable Optuna search over `verakit train` runs (docs/tuning.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    add_run_options,
    add_target_options,
    add_vera_options,
    baseline_note,
    defaults_help,
    dev_once_note,
    field_default,
    log_to_stderr,
)

__all__ = ["add_parsers", "run_tune"]


def run_tune(args: argparse.Namespace) -> int:
    """Run the study; print its one-line summary (0), or why it stopped (130 on Ctrl-C, 2 when bad)."""
    from ..train.classify import TrainArgs
    from ..train.tune import TuneArgs, TuneInterrupted, default_space, load_space, parse_dim, tune

    log_to_stderr()
    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__ if hasattr(args, k)}
    try:
        space = tuple(parse_dim(p) for p in args.param or ())
        space += load_space(args.space) if args.space else ()
        if not args.param and not args.space:
            space = default_space(args.method)
        s = tune(TuneArgs(TrainArgs(**fields), space, trials=args.trials, timeout=args.timeout, pruner=args.pruner,
                          seed=args.sampler_seed, study_name=args.study_name))
    except TuneInterrupted as e:
        print(f"verakit tune: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # between trials, or a second Ctrl-C
        print(f"verakit tune: interrupted; the study in {args.out}/study.db keeps every finished trial: run the "
              "same `verakit tune` command again to continue it", file=sys.stderr)
        return 130
    except ValueError as e:  # bad space, budget, data or settings: the message names the culprit
        print(f"verakit tune: error: {e}", file=sys.stderr)
        return 2
    st, best = s["states"], s["best"]
    print(f"{s['n_trials']} trials ({st['COMPLETE']} complete, {st['PRUNED']} pruned, {st['FAIL']} failed); "
          + (f"best {s['split'].split(' (')[0]} {s['main_metric']} {best['value']:.4f} (trial {best['number']}: "
             + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
             + ")" + baseline_note(best["value"], s.get("baseline"), s["main_metric"])
             + dev_once_note(best, s["main_metric"])
             if best else "no trial completed") + f"; report in {s['report']}")
    return 0


def _spec(d: Any) -> str:
    """A SearchDim as the --param spec that declares it."""
    if d.kind == "categorical":
        return f"{d.name}=choice:" + ",".join(str(c) for c in d.choices)
    return f"{d.name}={d.kind}:{d.low:g}:{d.high:g}" + (":log" if d.log else "")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `tune`."""
    from ..train.classify import TASKS
    from ..train.methods import METHODS
    from ..train.tune import PRUNERS, TUNABLE, TuneArgs, default_space

    what = ("hyperparameter search (Optuna) over `verakit train` runs of a classification task: resumable by "
            "rerunning the same command, with a report")
    s = sub.add_parser("tune", help=what, description=what[0].upper() + what[1:] + " (docs/tuning.md).")
    add_target_options(s, tasks=TASKS, methods=METHODS, task="classification task", data="as for verakit train",
                       out="RUN_DIR: study.db (resume by rerunning), trials/NNNN/, report.md, importance.png, "
                       "summary.json", model="all-MiniLM-L6-v2, offline")
    tune_default = lambda dest: field_default(dest, (TuneArgs,))  # noqa: E731
    g = s.add_argument_group("budget and search")
    g.add_argument("--trials", type=int, default=None, help="finished (complete + pruned) trials the study should "
                   "hold; a rerun runs only the missing ones (default: none, give --trials and/or --timeout)")
    g.add_argument("--timeout", type=float, default=None, help="seconds for this invocation, no trial starts after "
                   "it (default: none, give --trials and/or --timeout)")
    spaces = "; ".join(f"{m}: " + ", ".join(_spec(d) for d in default_space(m)) for m in METHODS)
    g.add_argument("--param", action="append", metavar="SPEC", help="a searched setting (repeatable): NAME=float:LOW:"
                   "HIGH[:log], NAME=int:LOW:HIGH[:log] or NAME=choice:A,B,...; NAME one of " + ", ".join(TUNABLE)
                   + f" (default, without --param and --space: {spaces})")
    g.add_argument("--space", default=None, help="JSON file of dimensions (docs/tuning.md), with or instead of --param "
                   "(default: none)")
    g.add_argument("--pruner", default=tune_default("pruner"), choices=list(PRUNERS), help="median: stop a trial below "
                   f"the median of earlier ones at the same point; none: never (default {tune_default('pruner')})")
    g.add_argument("--sampler-seed", type=int, default=tune_default("seed"),
                   help=f"seed of the TPE sampler (default {tune_default('seed')})")
    g.add_argument("--study-name", default=tune_default("study_name"),
                   help=f"name of the study in study.db (default {tune_default('study_name')})")
    f = s.add_argument_group("fixed training settings (as verakit train; a searched setting overrides its flag)")
    # Tune searches classification runs only; its batch default stays the explicit 32 studies record.
    add_run_options(f, lambda dest: defaults_help(dest, ("classification",)), per_trial=True, batch_size=32)
    add_vera_options(s)
    s.set_defaults(func=run_tune)

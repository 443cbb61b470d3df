"""What several `verakit` subcommands share: option groups, value parsers, logging, and how a training
or evaluation call becomes an exit code and its message on stderr.

Every training option is declared once, here, for `verakit train` and `verakit tune` alike, and its
default is read from the recipes' argument dataclasses (`field_default`), never written again here."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["RECIPES", "add_base_check_option", "add_run_options", "add_target_options", "add_vera_options",
           "baseline_note", "command_line", "csv_list",
           "decode_config", "dev_once_note",
           "defaults_help", "field_default", "fields_of", "folder_arg", "interrupted_run", "log_to_stderr", "print_evaluation",
           "run_training"]

RECIPES = ("classification", "causal LMs", "images")  # the recipes `defaults_help` describes, in this order
_UNUSED = {"r": ("full", "head"), "lr": ("head",)}  # methods for which an option's resolved value means nothing


def csv_list(value: str) -> tuple[str, ...]:
    """A comma-separated option value as a tuple of its non-empty, stripped items."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def folder_arg(value: str) -> str:
    """A folder option (--data-dir, --out): an empty value would silently mean the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; pass a folder (use . for the current one)")
    return value


def fields_of(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} of dataclass `cls`'s fields read from the parsed arguments (each must exist)."""
    return {k: getattr(args, k) for k in cls.__dataclass_fields__}


def _recipe_args() -> tuple[type, ...]:
    """The dataclasses `verakit train` fills from its options: one per recipe (grouped adds its own fields)."""
    from ..train.causal import CausalArgs
    from ..train.classify import TrainArgs
    from ..train.grouped import GroupedArgs
    from ..train.vision import ImageArgs

    return TrainArgs, GroupedArgs, CausalArgs, ImageArgs


def field_default(dest: str, classes: Iterable[type] | None = None) -> Any:
    """The default of field `dest` in the dataclasses `classes` (default: every recipe's arguments) that have
    it: one value, which the option declared once takes; a recipe whose default differed would need its own
    option, so that is an error naming them, as is a field none of them has."""
    import dataclasses

    found = {cls.__name__: f.default for cls in (classes or _recipe_args()) for f in dataclasses.fields(cls)
             if f.name == dest and f.default is not dataclasses.MISSING}
    if len({repr(v) for v in found.values()}) != 1:
        raise ValueError(f"option {dest!r}: defaults {found or 'none'} in the recipes' arguments; one option needs one")
    return next(iter(found.values()))


def _recipe_grid(recipe: str) -> tuple[type, dict[str, dict[str, dict[str, Any]]]]:
    """(args dataclass, {budget: {method: {task: resolved args}}}) of one recipe: every combination resolved
    exactly as a run would resolve it, so help texts show the values in force (hparams.py and friends)."""
    from ..train.hparams import BUDGETS

    if recipe == "classification":
        from ..train.classify import TASKS, TrainArgs
        from ..train.methods import METHODS

        def make(t: str, m: str, b: str) -> Any:
            return TrainArgs(task=t, data_dir=None, out="", method=m, budget=b).resolved()

        # peft-vera resolves exactly as vera (hparams.task_defaults): naming it would only lengthen each help.
        cls, tasks, methods = TrainArgs, list(TASKS), tuple(m for m in METHODS if m != "peft-vera")
    elif recipe == "causal LMs":
        from ..train.causal import CAUSAL_METHODS, CAUSAL_TASKS, CausalArgs

        def make(t: str, m: str, b: str) -> Any:
            return CausalArgs(task=t, data_dir="", out="", method=m, budget=b).budgeted()

        cls, tasks, methods = CausalArgs, list(CAUSAL_TASKS), CAUSAL_METHODS
    else:
        from ..train.hparams import IMAGE_DEFAULTS
        from ..train.vision import IMAGE_TASK, ImageArgs

        def make(t: str, m: str, b: str) -> Any:
            return ImageArgs(data_dir="", out="", model="m", method=m).resolved()

        # The methods with image defaults: PEFT's VeRA is a text-classification comparison only.
        cls, tasks, methods = ImageArgs, [IMAGE_TASK], tuple(IMAGE_DEFAULTS)
    budgets = BUDGETS if "budget" in cls.__dataclass_fields__ else ("",)
    return cls, {b: {m: {t: make(t, m, b) for t in tasks} for m in methods} for b in budgets}


def _fmt(v: Any) -> str:
    if v is None:
        return "all"  # the only None a resolved sample-count option keeps
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return ",".join(v) if isinstance(v, (tuple, list)) else str(v)


def _same(values: Iterable[Any]) -> bool:
    return len({repr(v) for v in values}) == 1


def _cell(by_method: Mapping[str, Mapping[str, Any]]) -> str:
    """'3', 'sst2 1, mrpc 3, ...' or 'vera/full/head (sst2 60, ...), lora (...)': identical parts merged."""
    texts: dict[str, list[str]] = {}
    for method, by_task in by_method.items():
        text = _fmt(next(iter(by_task.values()))) if _same(by_task.values()) else ", ".join(
            f"{t} {_fmt(v)}" for t, v in by_task.items())
        texts.setdefault(text, []).append(method)
    if len(texts) == 1:
        return next(iter(texts))
    return ", ".join(f"{'/'.join(ms)} ({t})" if "," in t else f"{'/'.join(ms)} {t}" for t, ms in texts.items())


def defaults_help(dest: str, recipes: Iterable[str] = RECIPES, budget: str | None = None) -> str:
    """The default of option `dest` as each recipe resolves it, per --budget, method and task where it
    varies, e.g. "classification, cpu budget: sst2 1, mrpc 3, ...; causal LMs: 1; images: 10". Read from
    the recipes' tables when the parser is built, so it follows any change of those tables. `budget`: only
    that preset's values (for a command without --budget)."""
    recipes = list(recipes)
    parts = []
    for recipe in recipes:
        cls, grid = _recipe_grid(recipe)
        if dest not in cls.__dataclass_fields__:
            continue
        cells = {b: _cell({m: {t: getattr(a, dest) for t, a in by_task.items()}
                           for m, by_task in by_method.items() if m not in _UNUSED.get(dest, ())})
                 for b, by_method in grid.items() if budget is None or b in (budget, "")}
        label = f"{recipe}, " if len(recipes) > 1 else ""  # one recipe described: no need to name it
        if _same(cells.values()):
            parts.append(f"{label.removesuffix(', ')}: {next(iter(cells.values()))}" if label else
                         next(iter(cells.values())))
        else:
            parts += [f"{label}{b} budget: {text}" for b, text in cells.items()]
    return "; ".join(parts)


def add_base_check_option(s: argparse.ArgumentParser) -> None:
    """`--no-base-check` of the commands that load an adapter to evaluate or generate (args.check_base)."""
    s.add_argument("--no-base-check", dest="check_base", action="store_false", help="load a verakit adapter even when "
                   "its recorded base-weight samples differ from this base model (another checkpoint of the same "
                   "architecture; names and shapes are still checked; the check's default: on, such adapters are "
                   "refused)")


def add_vera_options(s: argparse.ArgumentParser) -> None:
    """The VeRA ablation flags of `verakit train` and `verakit tune` (VeraConfig's fields, TrainArgs's defaults)."""
    from ..config import DISTRIBUTIONS, SHARING_MODES
    from ..train.classify import ADAPTER_COMPUTE_DTYPES

    on = {True: "on", False: "off"}
    g = s.add_argument_group("VeRA options (the paper's ablations; docs/tuning.md)")
    g.add_argument("--train-d", action=argparse.BooleanOptionalAction, default=field_default("train_d"),
                   help=f"train d (default {on[field_default('train_d')]}; --no-train-d: d stays at --d-initial; "
                   "the paper's 'only b' uses 1.0)")
    g.add_argument("--train-b", action=argparse.BooleanOptionalAction, default=field_default("train_b"),
                   help=f"train b (default {on[field_default('train_b')]}; --no-train-b: b is fixed at ones; the "
                   "paper's 'only d' uses --d-initial 0)")
    g.add_argument("--distribution", default=field_default("distribution"), choices=DISTRIBUTIONS,
                   help=f"projection values (default {field_default('distribution')}; uniform is on [0, 0.1), the "
                   "paper's bad case)")
    g.add_argument("--projection-sharing", default=field_default("projection_sharing"), choices=SHARING_MODES,
                   help="shared: one projection pair for all layers; unique: a pair per layer (default "
                   f"{field_default('projection_sharing')})")
    g.add_argument("--magnitude", action="store_true", default=field_default("magnitude"),
                   help="DVoRA: a trained magnitude per output row on top of VeRA's delta (DoRA's decomposition; "
                   "--method vera; classification, causal-LM and image tasks, --group-column too; the file carries vera_m; "
                   "docs/dvora.md) (default off)")
    g.add_argument("--adapter-compute-dtype", default=field_default("adapter_compute_dtype"),
                   choices=list(ADAPTER_COMPUTE_DTYPES),
                   help="bf16: VeRA's own products (delta, g^T x, A x) in bf16 during training steps, faster on "
                   "CPUs with avx512_bf16/AMX and on GPUs; evaluation and the saved file stay exact (default "
                   f"{field_default('adapter_compute_dtype')}; classification tasks only; docs/performance.md)")


def interrupted_run(adapter: str | Path) -> Path | None:
    """RUN_DIR when `adapter` is a run folder, or an artifact in one (RUN_DIR/adapters/NAME for groups),
    whose training was stopped by Ctrl-C and not finished: RUN_DIR/checkpoint/state.pt exists."""
    adapter = Path(adapter)
    candidates = [adapter] if adapter.is_dir() else []
    candidates += [adapter.parent] + ([adapter.parent.parent] if adapter.parent.name == "adapters" else [])
    return next((d for d in candidates if (d / "checkpoint" / "state.pt").is_file()), None)


def command_line(parser: argparse.ArgumentParser, prog: str, values: Mapping[str, Any], extra: Iterable[str] = ()) -> str:
    """The `prog` command line that gives `parser` these values (e.g. a run's config.json "args"): one flag per
    option whose value is set and differs from the parser's default; values no option takes are left out."""
    argv = prog.split()
    for action in parser._actions:  # argparse has no public list of its options
        if not action.option_strings or action.dest not in values or action.dest in ("resume", "quiet"):
            continue
        v = values[action.dest]
        if v is None or v == action.default or (isinstance(v, list) and tuple(v) == action.default):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0] if v else action.option_strings[1])
        elif action.nargs == 0:  # store_true
            argv += [action.option_strings[0]] if v else []
        else:
            argv += [action.option_strings[0], ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return shlex.join([*argv, *extra])


def _not_hub_kernel_noise(record: Any) -> bool:
    """False for bitsandbytes' "Failed to load CPU ... from kernels-community" line: bitsandbytes (imported by
    transformers -> peft in every run, quantized or not) tries to fetch an optional CPU kernel from the Hub,
    which offline or untrusted always fails, and falls back to its own CPU code; the line alarms for nothing."""
    return not (record.name.startswith("bitsandbytes") and "kernels-community" in record.getMessage())


def log_to_stderr() -> None:
    """INFO log lines with timestamps on stderr: training progress without a progress bar."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if _not_hub_kernel_noise not in handler.filters:
            handler.addFilter(_not_hub_kernel_noise)


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


def baseline_note(value: float, baseline: Mapping[str, float] | None, metric: str) -> str:
    """"; no better than the trivial baseline (...)" when `value` does not beat the constant prediction's
    `metric`, else "". report.md says so; the one summary line a user reads must say it too, since a run
    that ends at the baseline (a majority-class F1 of 0.81) looks like a result. NaN never gets a note."""
    base = (baseline or {}).get(metric)
    if base is None or not value <= base:
        return ""
    return f"; no better than the trivial baseline ({metric} {base:.4f}, one constant answer): nothing was learned"


def dev_once_note(scores: Mapping[str, Any], metric: str) -> str:
    """", dev METRIC X (scored once; trivial baseline Y)" for a run (or a tune's best trial) that chose on
    held-out training rows, else "". Dev's own floor is given: the held-out rows' majority share is not dev's."""
    from ..train.report import dev_floor

    if "dev" not in scores:
        return ""
    floor = dev_floor(scores, metric)
    return (f", dev {metric} {scores['dev'][metric]:.4f} (scored once"
            + ("" if floor is None else f"; trivial baseline {floor:.4f}") + ")")


def decode_config(**given: Any) -> Any:
    """`DecodeConfig(**given)` from command-line values: a refused value is named by its flag
    (--num-beams), not by the dataclass field (DecodeConfig.num_beams) a Python caller sees."""
    import re

    from ..train.causal import DecodeConfig

    try:
        return DecodeConfig(**given)
    except ValueError as e:
        raise ValueError(re.sub(r"DecodeConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None


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


def _head_defaults() -> str:
    """classify.DEFAULT_HEAD in words: "vera for vera and peft-vera, full for lora, full and head"."""
    from ..train.classify import DEFAULT_HEAD

    by_head: dict[str, list[str]] = {}
    for method, head in DEFAULT_HEAD.items():
        by_head.setdefault(head, []).append(method)
    return ", ".join(f"{head} for {', '.join(ms[:-1]) + ' and ' if len(ms) > 1 else ''}{ms[-1]}"
                     for head, ms in by_head.items())


def add_run_options(g: Any, default: Callable[[str], str], *, per_trial: bool,
                    batch_size: int | None = None) -> None:
    """The settings of one training run, declared once for `verakit train` and `verakit tune` (whose trials
    are such runs): rank, budget and its overrides, seed, subsets, evaluation cadence. `default(dest)` says
    an option's resolved default; `per_trial` words the help for tune; `batch_size` is the parser default."""
    from ..train.hparams import BUDGETS
    from ..train.methods import HEADS

    each = "every trial's " if per_trial else ""
    # --adapter-rank: the same flag under torchrun, whose own parser rejects "--r" as an ambiguous prefix.
    g.add_argument("--r", "--adapter-rank", dest="r", type=int, default=None, help=f"rank (default: {default('r')})")
    g.add_argument("--d-initial", type=float, default=field_default("d_initial"),
                   help=f"VeRA's initial d (default {field_default('d_initial')})")
    g.add_argument("--target-modules", type=csv_list, default=None, help="comma-separated leaf names "
                   "(default: the model type's, query,value for BERT)")
    g.add_argument("--head", choices=list(HEADS), default=None,
                   help="classification head: vera (VeRA vectors on its hidden layer, e.g. BERT's pooler, and the "
                   "output layer in full: a file a fraction of the size) or full (the whole head trained and "
                   f"saved) (default: {_head_defaults()}; full where the base checkpoint lacks the head's hidden layer)")
    g.add_argument("--budget", default=field_default("budget"), choices=list(BUDGETS),
                   help=f"{each}preset of epochs, training rows and learning rates (default "
                   f"{field_default('budget')}): cpu (minutes "
                   f"{'a trial ' if per_trial else ''}on a laptop CPU with the default MiniLM) or paper (the VeRA/LoRA "
                   "papers' GPU budgets over the whole training set); --epochs, --max-train-samples, --lr and "
                   f"--head-lr{' and searched settings' if per_trial else ''} override single values (docs/training.md)")
    g.add_argument("--epochs", type=int, default=None, help=f"training epochs (default: {default('epochs')})")
    g.add_argument("--batch-size", type=int, default=batch_size, help="global batch size, split across processes "
                   f"(default: {default('batch_size') if batch_size is None else batch_size})")
    g.add_argument("--max-length", type=int, default=field_default("max_length"),
                   help=f"max tokens per example, truncated (default {field_default('max_length')})")
    g.add_argument("--lr", type=float, default=None,
                   help=f"adapter (full: body) learning rate (default: {default('lr')})")
    g.add_argument("--head-lr", type=float, default=None,
                   help=f"classifier head learning rate (default: {default('head_lr')})")
    g.add_argument("--warmup-ratio", type=float, default=field_default("warmup_ratio"), help="fraction of the steps "
                   f"with a linear warm-up of the learning rate (default {field_default('warmup_ratio')})")
    g.add_argument("--seed", type=int, default=field_default("seed"), help=f"{'training seed of every trial: ' if per_trial else ''}"
                   f"data subset and order, head init, dropout and VeRA's projection (default {field_default('seed')})")
    g.add_argument("--max-train-samples", type=int, default=None, help=f"train {'each trial ' if per_trial else ''}"
                   f"on a seeded subset of this many rows (default: {default('max_train_samples')})")
    g.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a seeded subset of this many "
                   f"rows (default: {default('max_eval_samples')})")
    g.add_argument("--selection-rows", type=int, default=field_default("selection_rows"), help="classification: "
                   f"carve this many training rows (seeded) to score {'the trials and their checkpoints' if per_trial else 'the checkpoints'} "
                   "on, and score dev once with the chosen adapter, an honest figure (default 0: choose on dev)")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=field_default("group_by_length"),
                   help="batches of similar-length examples: far less padding (GLUE: 1.3-2.7x fewer tokens, 1.5-2.9x "
                   "faster steps), each batch still a random draw; --no-group-by-length: uniformly random batches "
                   f"(text tasks; default: {default('group_by_length')}; docs/performance.md)")
    g.add_argument("--mixed-precision", choices=["no", "bf16"], default=field_default("mixed_precision"),
                   help="bf16: training forwards under bf16 autocast: steps 1.1-1.7x faster on CPUs with bf16 "
                   "units (AMX, AVX-512 BF16) and faster on GPUs, slower on CPUs without bf16 units; parameters, "
                   "optimizer and evaluation stay fp32 "
                   f"(text tasks; default {field_default('mixed_precision')}; docs/performance.md)")
    g.add_argument("--eval-every", type=int, default=None, help=f"also evaluate{' (and maybe prune)' if per_trial else ''}"
                   " every N optimizer steps (default: only before training and at each epoch end)")


def add_target_options(s: argparse.ArgumentParser, *, tasks: Iterable[str], methods: Iterable[str], task: str,
                       data: str, out: str, model: str, method: str = "") -> None:
    """What a run trains on, declared once for `verakit train` and `verakit tune`: --task (one of `tasks`),
    --data-dir, --out (all three required), --model and --method (one of `methods`, default the recipes'
    own). `task`, `data`, `out`, `model`: the command's words for the tasks, the data folder, what RUN_DIR
    receives and the default model; `method`: a note after the method's default."""
    s.add_argument("--task", required=True, choices=list(tasks), help=f"{task} (required)")
    s.add_argument("--data-dir", required=True, type=folder_arg, help=f"{data} (required)")
    s.add_argument("--out", required=True, type=folder_arg, help=f"{out} (required)")
    s.add_argument("--model", default=None, help=f"model folder or hub id (default: {model})")
    s.add_argument("--method", default=field_default("method"), choices=list(methods),
                   help=f"what trains (default {field_default('method')}{method})")

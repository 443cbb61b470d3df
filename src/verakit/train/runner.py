"""The skeletons every recipe runs, written once.

Training (`train_classifier`, `train_images`, `train_causal`, `train_grouped`):
    run = open_run(args)              # process state; RUN_DIR checked before any data is read
    data = <load and validate>        # bad data leaves nothing behind
    torch.manual_seed(args.seed); model = <build>; prepared = prepare_model(model, spec)
    config = run.start(args_json, method_config)    # config.json (a --resume with other settings is refused)
    result = run.train(recipe)        # loop.run_loop: the best evaluation's artifact lands in RUN_DIR
    if not result.best: return {}     # a non-main process: the main one writes the results
    return run.finish(metrics, write_report)        # metrics.json, report.md, curve.png
Evaluation (`evaluate_classifier`, `evaluate_images`, `evaluate_causal`): read the run info saved with
the artifact, load the data it names, `load_trained(...)`, score as training scored.

Also here, what several recipes' Recipe classes share: their param groups (adapter, head), the
classification loss, and the length-sorted evaluation batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import load_artifact
from .loop import LoopConfig, LoopResult, ParamGroup, Recipe, run_loop
from .methods import Prepared
from .rundir import ProcessState, check_run_dir, start_run, write_json

__all__ = [
    "EVAL_BATCH",
    "Run",
    "RunArgs",
    "check_settings",
    "classification_loss",
    "length_batches",
    "loop_config",
    "load_trained",
    "open_run",
    "param_groups",
]

EVAL_BATCH = 64  # classification, grouped and image evaluation: fixed, so `verakit eval` pads as training did


class RunArgs(Protocol):
    """The fields of a recipe's (resolved) arguments that the runner reads."""

    out: str  # RUN_DIR
    resume: bool
    quiet: bool
    seed: int
    epochs: int | None
    batch_size: int | None
    warmup_ratio: float
    eval_every: int | None
    # group_by_length (bool) and mixed_precision (str) are optional: a recipe without them trains with
    # random batches in fp32 (images: one length, and no bf16 path measured).


def loop_config(a: RunArgs) -> LoopConfig:
    """The LoopConfig of (resolved) run arguments `a`; LoopConfig refuses bad epochs, batch size and the like."""
    if a.epochs is None or a.batch_size is None:
        raise ValueError(f"{type(a).__name__}: epochs and batch_size are None; run on the resolved arguments")
    return LoopConfig(epochs=a.epochs, batch_size=a.batch_size, warmup_ratio=a.warmup_ratio, seed=a.seed,
                      eval_every=a.eval_every, quiet=a.quiet,
                      group_by_length=bool(getattr(a, "group_by_length", False)),
                      mixed_precision=getattr(a, "mixed_precision", "no"))


@dataclass
class Run:
    """One training run in RUN_DIR, from the checks before data is read to metrics.json."""

    dir: Path
    state: ProcessState
    args: RunArgs
    config: dict[str, Any] = field(default_factory=dict)  # config.json, once `start` wrote it

    @property
    def loop(self) -> LoopConfig:
        return loop_config(self.args)

    def start(self, args: dict[str, Any], method: dict[str, Any], *, defaults: dict[str, Any] | None = None,
              data: str | None = None) -> dict[str, Any]:
        """Write config.json ({"args", "loop", "method"}, and "data") once every process got here; with --resume,
        first refuse settings other than the interrupted run's (`defaults`: values of options an older config
        lacks) and other data (`data`: `rundir.data_fingerprint` of the examples)."""
        self.config = {"args": args, "loop": asdict(self.loop), "method": method}
        if data is not None:
            self.config["data"] = data
        start_run(self.dir, self.config, resume=self.args.resume, state=self.state, defaults=defaults)
        return self.config

    def train(self, recipe: Recipe, **loop_options: Any) -> LoopResult:
        """`run_loop` over RUN_DIR (`loop_options`: on_eval, optimizer_factory)."""
        return run_loop(recipe, self.loop, self.dir, resume=self.args.resume, **loop_options)

    def finish(self, metrics: dict[str, Any],
               write_report: Callable[[Path, dict[str, Any], dict[str, Any]], None]) -> dict[str, Any]:
        """Write metrics.json, then the recipe's report (report.md, curve.png); return `metrics`."""
        write_json(self.dir / "metrics.json", metrics)
        write_report(self.dir, metrics, self.config)
        return metrics


def open_run(args: RunArgs) -> Run:
    """The process state and the RUN_DIR checks, before any data is read. Under torchrun every rank checks
    RUN_DIR before any writes to it (`Run.start` waits for all); rank 0 writes."""
    from accelerate import PartialState

    run_dir = Path(args.out)
    state = PartialState(cpu=not torch.cuda.is_available())
    check_run_dir(run_dir, args.resume)
    check_settings(args)
    return Run(run_dir, state, args)


# Options whose nonsense values torch or the tokenizer would take without complaint: a negative or NaN
# learning rate trains (ascent, or NaN weights refused only when the artifact is saved, with RUN_DIR already
# written), max_length 0 tokenizes to nothing, a negative count slices off the last rows (dev[:-1]).
_RATES = ("lr", "head_lr")
_COUNTS = {"max_length": 1, "gen_eval_samples": 0, "report_samples": 0}  # field: least value


def check_settings(args: RunArgs) -> None:
    """Refuse, naming the flag, learning rates that are not finite and > 0 and counts below their least
    value, among the fields `args` has (None: the recipe's default); the loop's own settings (epochs,
    batch size, warm-up, --eval-every) are LoopConfig's checks, run here too. Called before RUN_DIR is
    written, so a bad value leaves nothing behind; `verakit tune` calls it before creating its study."""
    for name in _RATES:
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
    for name, least in _COUNTS.items():
        v = getattr(args, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {v!r}")
    loop_config(args)


def load_trained(adapter: str | Path, build: Callable[[], tuple[nn.Module, Any]],
                 check_base: bool = True) -> tuple[nn.Module, Any]:
    """(the base from `build()` with the artifact's trained weights, in eval mode; what `build` returned
    beside the model: its tokenizer or image processor). `check_base`: as `load_artifact`."""
    base, preprocess = build()
    return load_artifact(adapter, base, check_base).eval(), preprocess


def param_groups(prepared: Prepared, lr: float | None, head_lr: float | None = None) -> list[ParamGroup]:
    """The adapter's parameters at `lr` and, unless `head_lr` is None (no task head), the head's at `head_lr`."""
    groups = [ParamGroup("adapter", tuple(p for _, p in prepared.adapter), float(lr or 0.0))]
    if head_lr is not None:
        groups.append(ParamGroup("head", tuple(p for _, p in prepared.head), float(head_lr)))
    return groups


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> tuple[torch.Tensor, int]:
    """Semantics: (sum over rows of CE(logits[i], labels[i]), or of (logits[i, 0] - labels[i])^2 for
    regression; the row count). logits: (B, C); labels: (B,) class ids, or scores (fp32) for regression."""
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels, reduction="sum"), len(labels)
    return F.cross_entropy(logits, labels, reduction="sum"), len(labels)


def length_batches(lengths: Sequence[int], batch_size: int = EVAL_BATCH) -> Iterator[list[int]]:
    """Indices in order of length (stable: equal lengths keep their order), `batch_size` at a time: each
    evaluation batch pads to about its own length, and the result does not depend on the data's order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]

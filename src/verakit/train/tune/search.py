"""`verakit tune`: hyperparameter search with Optuna over `verakit train` runs (classification).

Semantics: trial k trains `replace(base, out=RUN_DIR/trials/k, **params_k)` with `train_classifier`
and scores the run's best dev main metric (maximized), where params_k is drawn from the search space
by Optuna's TPE sampler. After every dev evaluation the trial reports that metric at step = training
examples seen so far, and the pruner may stop it (state PRUNED; its best artifact so far stays in its
folder). The study lives in RUN_DIR/study.db (Optuna's own SQLite storage): the same command run again
resumes it. `trials` counts finished (complete + pruned) trials of the whole study, so a rerun after an
interruption runs only what is missing and a larger `trials` extends the study; `timeout` bounds the
seconds of one invocation (Optuna starts no trial after it; the running one finishes).

The search space is data (`SearchDim`), validated before anything is written. Every call ends by writing
RUN_DIR/report.md, importance.png and summary.json (tune_report.py).

Progress goes to the "verakit.tune" logger (tune_progress.py): a line when each trial starts (its settings) and ends (its
score, time, the best so far and the time left), with each trial's own training lines ("verakit.train")
in between; Optuna's own INFO lines, which would repeat them, are muted while the study runs. Ctrl-C
stops the running trial (Optuna records it as failed; it is never continued) and raises TuneInterrupted:
the same command run again resumes the study.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..classify.recipe import TrainArgs

__all__ = ["SearchDim", "SpaceError", "TuneArgs", "TuneInterrupted", "TUNABLE", "PRUNERS", "default_space",
           "parse_dim", "load_space", "tune"]

# TrainArgs fields a search may vary -> their value type. VeRA-only fields need method "vera".
TUNABLE: dict[str, type] = {
    "lr": float, "head_lr": float, "d_initial": float, "warmup_ratio": float,
    "r": int, "epochs": int, "batch_size": int, "max_length": int,
    "distribution": str, "projection_sharing": str, "train_d": bool, "train_b": bool,
}
_VERA_ONLY = {"d_initial", "distribution", "projection_sharing", "train_d", "train_b"}
KINDS = ("float", "int", "categorical")
PRUNERS = ("median", "none")
SAMPLER_STARTUP = 5  # TPE samples at random for this many trials before it models the results
PRUNER_STARTUP = 2  # the median pruner never prunes one of the first trials of a study


class SpaceError(ValueError):
    """A search space (dimension, file or CLI spec) is invalid; the message names the dimension."""


class TuneInterrupted(Exception):
    """Ctrl-C stopped trial `number` (recorded as failed, not continued); the study keeps every finished trial."""

    def __init__(self, number: int, run_dir: Path) -> None:
        super().__init__(f"interrupted during trial {number}, which is recorded as failed and not continued; "
                         f"the study in {run_dir / 'study.db'} keeps every finished trial: run the same "
                         "`verakit tune` command again to continue it with new trials")
        self.number = number


@dataclass(frozen=True)
class SearchDim:
    """One searched TrainArgs field: a float or int range (optionally log-scaled) or a set of choices."""

    name: str  # a key of TUNABLE
    kind: str  # "float", "int" or "categorical"
    low: float | None = None  # ranges: inclusive bounds
    high: float | None = None
    log: bool = False  # ranges: sample uniformly in log space (needs low > 0)
    choices: tuple[Any, ...] = ()  # categorical: the values, each of the field's type

    def __post_init__(self) -> None:
        where = f"search space: {self.name}"
        if self.name not in TUNABLE:
            raise SpaceError(f"{where}: not a tunable field; choose from {', '.join(TUNABLE)}")
        if self.kind not in KINDS:
            raise SpaceError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        typ = TUNABLE[self.name]
        if self.kind == "categorical":
            object.__setattr__(self, "choices", tuple(self.choices))
            if len(set(self.choices)) < 2:
                raise SpaceError(f"{where}: needs at least two distinct choices, got {list(self.choices)} "
                                 "(a single value is not a search: pass it as a fixed option)")
            for c in self.choices:
                if type(c) is not typ and not (typ is float and type(c) is int):
                    raise SpaceError(f"{where}: choice {c!r} is not a {typ.__name__}")
            _check_values(self.name, self.choices)
            return
        if typ not in (int, float) or (self.kind == "float" and typ is int):
            raise SpaceError(f"{where}: a {typ.__name__} field takes kind 'categorical'"
                             + (" or 'int'" if typ is int else ""))
        if self.low is None or self.high is None or not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise SpaceError(f"{where}: a range needs finite low and high, got {self.low!r}, {self.high!r}")
        if self.kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise SpaceError(f"{where}: int bounds must be integers, got {self.low!r}, {self.high!r}")
        if not self.low < self.high:
            raise SpaceError(f"{where}: low {self.low!r} must be below high {self.high!r}")
        if self.log and self.low <= 0:
            raise SpaceError(f"{where}: a log range needs low > 0, got {self.low!r}")
        _check_values(self.name, (self.low, self.high))


def _check_values(name: str, values: tuple[Any, ...]) -> None:
    """Values a trial could receive must be valid settings of that field."""
    from ...config import DISTRIBUTIONS, SHARING_MODES

    allowed = {"distribution": DISTRIBUTIONS, "projection_sharing": SHARING_MODES}.get(name)
    for v in values:
        if allowed is not None and v not in allowed:
            raise SpaceError(f"search space: {name}: {v!r} is not one of {allowed}")
        if name in ("lr", "head_lr") and v <= 0:
            raise SpaceError(f"search space: {name}: learning rates must be > 0, got {v!r}")
        if name in ("r", "epochs", "batch_size", "max_length") and v < 1:
            raise SpaceError(f"search space: {name}: must be >= 1, got {v!r}")
        if name == "warmup_ratio" and not 0 <= v < 1:
            raise SpaceError(f"search space: warmup_ratio: must be in [0, 1), got {v!r}")


def default_space(method: str) -> tuple[SearchDim, ...]:
    """The space searched when none is given: both learning rates, and r (and d_initial for VeRA)."""
    if method in ("vera", "peft-vera"):  # PEFT's VeRA has the same knobs (its d_initial, its projection rank)
        return (SearchDim("lr", "float", 1e-3, 5e-2, log=True), SearchDim("head_lr", "float", 1e-3, 2e-2, log=True),
                SearchDim("d_initial", "float", 1e-7, 1.0, log=True), SearchDim("r", "categorical", choices=(256, 1024)))
    if method == "lora":
        return (SearchDim("lr", "float", 1e-4, 1e-2, log=True), SearchDim("head_lr", "float", 1e-3, 2e-2, log=True),
                SearchDim("r", "categorical", choices=(4, 8, 16)))
    head = (SearchDim("head_lr", "float", 1e-3, 2e-2, log=True),)
    return head if method == "head" else (SearchDim("lr", "float", 1e-6, 1e-3, log=True), *head)


def _value(name: str, text: str) -> Any:
    typ = TUNABLE.get(name, str)
    if typ is bool:
        if text.lower() not in ("true", "false"):
            raise SpaceError(f"search space: {name}: {text!r} is not true or false")
        return text.lower() == "true"
    try:
        return typ(text)
    except ValueError:
        raise SpaceError(f"search space: {name}: {text!r} is not a valid {typ.__name__}") from None


def parse_dim(spec: str) -> SearchDim:
    """`NAME=float:LOW:HIGH[:log]`, `NAME=int:LOW:HIGH[:log]` or `NAME=choice:A,B,...` -> SearchDim."""
    name, sep, rest = spec.partition("=")
    kind, _, args = rest.partition(":")
    name = name.strip().replace("-", "_")
    if not sep or not args:
        raise SpaceError(f"search space: {spec!r}: expected NAME=float:LOW:HIGH[:log], NAME=int:LOW:HIGH[:log] "
                         "or NAME=choice:A,B,...")
    if kind == "choice":
        return SearchDim(name, "categorical", choices=tuple(_value(name, v.strip()) for v in args.split(",")))
    parts = args.split(":")
    if kind not in ("float", "int") or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise SpaceError(f"search space: {spec!r}: expected {name}=float:LOW:HIGH[:log], int:LOW:HIGH[:log] "
                         "or choice:A,B,...")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise SpaceError(f"search space: {spec!r}: bounds must be numbers") from None
    return SearchDim(name, kind, low, high, log=len(parts) == 3)


def load_space(path: str | Path) -> tuple[SearchDim, ...]:
    """A JSON file {name: {"type": "float"|"int"|"categorical", "low", "high", "log", "choices"}}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpaceError(f"{path}: cannot read the search space ({e})") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: the search space must be a JSON object of dimensions")
    dims = []
    for name, d in data.items():
        if not isinstance(d, dict) or set(d) - {"type", "low", "high", "log", "choices"}:
            raise SpaceError(f"{path}: dimension {name!r} must be an object with type, low, high, log or choices")
        try:
            dims.append(SearchDim(name, d.get("type", ""), d.get("low"), d.get("high"), bool(d.get("log", False)),
                                  tuple(d.get("choices", ()))))
        except SpaceError as e:
            raise SpaceError(f"{path}: {e}") from None
    if not dims:
        raise SpaceError(f"{path}: the search space is empty: give at least one dimension")
    return tuple(dims)


@dataclass(frozen=True)
class TuneArgs:
    """`verakit tune`'s arguments. base.out is the study's RUN_DIR; trials train in RUN_DIR/trials/NNNN."""

    base: TrainArgs  # every setting a dimension does not vary (task, data, model, method, budget)
    space: tuple[SearchDim, ...]
    trials: int | None = None  # finished (complete + pruned) trials the study should hold
    timeout: float | None = None  # seconds for this invocation
    pruner: Any = "median"  # "median", "none", or any optuna.pruners.BasePruner
    seed: int = 0  # the sampler's seed (offset by the trials already in the study when resuming)
    study_name: str = "verakit-tune"

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", tuple(self.space))
        if self.trials is None and self.timeout is None:
            raise SpaceError("tune budget: give a number of trials (--trials N) and/or a timeout (--timeout SECONDS)")
        if self.trials is not None and (isinstance(self.trials, bool) or not isinstance(self.trials, int)
                                        or self.trials < 1):
            raise SpaceError(f"tune budget: --trials must be an integer >= 1, got {self.trials!r}")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0
                                             and math.isfinite(self.timeout)):
            raise SpaceError(f"tune budget: --timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not self.space:
            raise SpaceError("search space is empty: give at least one dimension (--param or --space)")
        names = [d.name for d in self.space]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpaceError(f"search space: {', '.join(dup)} given more than once")
        if isinstance(self.pruner, str) and self.pruner not in PRUNERS:
            raise SpaceError(f"tune: pruner must be one of {PRUNERS} or an Optuna pruner, got {self.pruner!r}")
        if self.base.resume:
            raise SpaceError("tune: base.resume must be False (a study resumes from RUN_DIR/study.db by itself)")
        vera_only = sorted(set(names) & _VERA_ONLY)
        if vera_only and self.base.method != "vera":
            raise SpaceError(f"search space: {', '.join(vera_only)}: VeRA options, but the method is "
                             f"{self.base.method!r}")
        if "r" in names and self.base.method not in ("vera", "lora"):
            raise SpaceError(f"search space: r: method {self.base.method!r} has no rank")
        if "lr" in names and self.base.method == "head":
            raise SpaceError("search space: lr: method 'head' trains the head only (search head_lr)")

    def settings(self) -> dict[str, Any]:
        """What must not change when a study resumes (the budget and seed may)."""
        base = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.base).items()
                if k not in ("out", "resume", "quiet")}
        pruner = self.pruner if isinstance(self.pruner, str) else type(self.pruner).__name__
        return {"base": base, "space": [_jsonable_dim(d) for d in self.space], "pruner": pruner}


def _jsonable_dim(d: SearchDim) -> dict[str, Any]:
    out = asdict(d)
    out["choices"] = list(d.choices)
    return out


def _suggest(trial: Any, d: SearchDim) -> Any:
    if d.kind == "categorical":
        return trial.suggest_categorical(d.name, list(d.choices))
    if d.kind == "int":
        return trial.suggest_int(d.name, int(d.low), int(d.high), log=d.log)
    return trial.suggest_float(d.name, float(d.low), float(d.high), log=d.log)


def _check_resume(study: Any, settings: dict[str, Any], data: str, db: Path) -> None:
    """Refuse to add trials to a study started with other settings or over other data (`data`: the
    `rundir.data_fingerprint` of the training and dev examples): the best trial would be chosen among
    scores of different things."""
    saved_data = study.user_attrs.get("verakit_data")
    if saved_data is not None and saved_data != data:
        raise ValueError(f"{db}: the study was started over other data (examples' sha256 {saved_data[:12]} -> "
                         f"{data[:12]}): the training or dev files changed since; its trials would not compare. "
                         "Restore them, or choose another --out")
    if saved_data is None:  # a new study, or one from before the fingerprint
        study.set_user_attr("verakit_data", data)
    saved = study.user_attrs.get("verakit_settings")
    if saved is None:
        study.set_user_attr("verakit_settings", settings)
        return
    saved_base, base = saved.get("base", {}), settings["base"]
    diff = [f"{k}: {saved_base.get(k)!r} -> {base[k]!r}" for k in base if saved_base.get(k) != base[k]]
    diff += [f"{k}: changed" for k in ("space", "pruner") if saved.get(k) != settings[k]]
    if diff:
        raise ValueError(f"{db}: the study was started with other settings ({'; '.join(diff)}); repeat its "
                         "command (only --trials, --timeout and --sampler-seed may change) or choose another --out")


def tune(args: TuneArgs) -> dict[str, Any]:
    """Run (or resume) the study per `args`; write the report; return summary.json's content."""
    import optuna

    from ..classify.data import load_task
    from ..classify.metrics import trivial_baseline
    from ..classify.recipe import train_classifier
    from ..loop import TrainingInterrupted
    from ..rundir import data_fingerprint
    from ..runner import check_settings
    from .progress import MuteOptuna, TrialProgress
    from .report import FINISHED, write_report

    base = args.base.resolved()  # bad base options fail here, before anything is written
    check_settings(base)
    run_dir = Path(base.out)
    db = run_dir / "study.db"
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir}: --out is a file, not a study folder; choose another --out")
    if not db.is_file() and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: folder exists, is not empty and holds no study.db; choose another --out")
    # The data is read (and validated) once here so that bad data fails before the study is created;
    # every trial reads it again (train_classifier owns its run from data to report).
    data = load_task(base.task, base.data_dir, max_train_samples=base.max_train_samples,
                     max_eval_samples=base.max_eval_samples, seed=base.seed)
    main_metric, n_train = data.spec.main_metric, len(data.train)
    scored = data.dev  # what each trial's evaluations score: dev, or the rows --selection-rows carves off
    if base.selection_rows:
        from ..classify.data import carve_selection

        scored = carve_selection(data.train, base.selection_rows, base.seed)[1]
    split = "held-out" if base.selection_rows else "dev"
    baseline = trivial_baseline(data.spec, [e.label for e in scored])
    for d in args.space:  # every trial's settings would be valid (e.g. VeRA options for this r)
        for v in (d.choices or (d.low, d.high)):
            check_settings(replace(base, **{d.name: TUNABLE[d.name](v)}).resolved())

    run_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{db.resolve()}"
    with MuteOptuna():  # "A new study created in RDB ..." would be Optuna's first INFO line
        study = optuna.create_study(storage=storage, study_name=args.study_name, direction="maximize",
                                    load_if_exists=True)
    _check_resume(study, args.settings(), data_fingerprint(data.train, data.dev), db)
    finished = sum(t.state.name in FINISHED for t in study.trials)
    if args.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP, n_warmup_steps=0)
    else:
        pruner = optuna.pruners.NopPruner() if args.pruner == "none" else args.pruner
    # A resumed study reseeds the sampler past the trials it holds: the same seed would redraw them.
    sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials), n_startup_trials=SAMPLER_STARTUP)
    study = optuna.load_study(study_name=args.study_name, storage=storage, sampler=sampler, pruner=pruner)

    remaining = None if args.trials is None else args.trials - finished
    progress, mute = TrialProgress(study, main_metric, finished, args.trials, args.timeout), MuteOptuna()

    def objective(trial: Any) -> float:
        params = {d.name: _suggest(trial, d) for d in args.space}
        out = run_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(out))
        trial_args = replace(base, out=str(out), quiet=True, **params).resolved()
        last = n_train * int(trial_args.epochs or 1)

        def on_eval(record: dict[str, Any]) -> None:
            # Examples seen, not optimizer steps: comparable across trials of different batch sizes.
            step = round(record["epoch"] * n_train)
            trial.report(record["metrics"][main_metric], step)
            # The final evaluation is never pruned: training is over, nothing would be saved.
            if step < last and trial.should_prune():
                raise optuna.TrialPruned(f"{split} {main_metric} {record['metrics'][main_metric]:.4f} after {step} "
                                         "examples is below the median of earlier trials")

        progress.start(trial.number, params)
        try:
            metrics = train_classifier(trial_args, on_eval=on_eval)
        except optuna.TrialPruned as e:
            progress.end(trial.number, f"pruned ({e})")
            raise
        except (TrainingInterrupted, KeyboardInterrupt):
            # The trial is never continued (a rerun draws new trials), so its checkpoint would only suggest
            # a --resume that `verakit tune` does not have.
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
            mute.interrupted.add(trial.number)
            raise TuneInterrupted(trial.number, run_dir) from None
        value = float(metrics["metric"][main_metric])
        trial.set_user_attr("train_seconds", metrics["train_seconds"])
        dev = f", dev {main_metric} {metrics['dev'][main_metric]:.4f} (not used to choose)" if "dev" in metrics else ""
        progress.end(trial.number, f"{split} {main_metric} {value:.4f}{dev}", value)
        return value

    if remaining is None or remaining > 0:
        with mute:
            study.optimize(objective, n_trials=remaining, timeout=args.timeout)
    return write_report(study, args, base, main_metric, run_dir, baseline)


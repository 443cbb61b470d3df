"""What `verakit tune` tells a user while a study runs: a line as each trial starts (k/N, its settings) and
ends (its score, time, the best so far and the time left), and the muting of what would repeat or bury
those lines (Optuna's INFO lines, its "Trial N failed" traceback for a Ctrl-C, transformers' loading bars).
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["MuteOptuna", "TrialProgress"]

log = logging.getLogger("verakit.tune")


class TrialProgress:
    """The lines `tune` logs as trials start and end: trial k/N, its settings, score, time, best, time left."""

    def __init__(self, study: Any, metric: str, finished: int, target: int | None, timeout: float | None) -> None:
        self.study, self.metric, self.finished, self.target, self.timeout = study, metric, finished, target, timeout
        self.t0 = time.perf_counter()
        self.started = self.t0
        self.durations: list[float] = []  # of the trials that ended in this invocation

    def _of(self) -> str:
        return f"{self.finished + 1}/{self.target}" if self.target is not None else f"{self.finished + 1}"

    def start(self, number: int, params: dict[str, Any]) -> None:
        self.started = time.perf_counter()
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        log.info("trial %s (#%d) starts: %s", self._of(), number, shown)

    def end(self, number: int, outcome: str, value: float | None = None) -> None:
        now = time.perf_counter()
        self.durations.append(now - self.started)
        done = self._of()
        self.finished += 1
        values = [t.value for t in self.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        values += [] if value is None else [value]
        best = f"best so far {max(values):.4f}" if values else "no trial complete yet"
        line = f"trial {done} (#{number}) ends: {outcome} in {_minutes(self.durations[-1])}; {best}"
        mean = sum(self.durations) / len(self.durations)
        left = None if self.target is None else mean * (self.target - self.finished)
        if self.timeout is not None:
            until_timeout = max(0.0, self.timeout - (now - self.t0))
            left = until_timeout if left is None else min(left, until_timeout)
        if left is not None and (self.target is None or self.finished < self.target):
            line += f"; about {_minutes(left)} left"
        log.info("%s", line)


class MuteOptuna:
    """While the study runs: Optuna's INFO lines off (`TrialProgress` says the same, in context), no "Trial N
    failed" warning with a traceback for a trial that Ctrl-C interrupted (TuneInterrupted says it), and no
    model-loading progress bar from transformers in every trial."""

    def __init__(self) -> None:
        self.interrupted: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.getMessage().startswith(f"Trial {n} failed") for n in self.interrupted)

    def __enter__(self) -> MuteOptuna:
        import optuna
        from transformers.utils import logging as hf_logging

        self._verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(max(self._verbosity, optuna.logging.WARNING))
        logging.getLogger("optuna.study._optimize").addFilter(self)  # where "Trial N failed" is logged
        self._bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc: object) -> None:
        import optuna
        from transformers.utils import logging as hf_logging

        optuna.logging.set_verbosity(self._verbosity)
        logging.getLogger("optuna.study._optimize").removeFilter(self)
        if self._bars_were_on:
            hf_logging.enable_progress_bar()


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"

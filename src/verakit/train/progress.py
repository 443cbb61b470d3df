"""What the training loop tells a user while it runs: the plan, the evaluation lines, the estimate of the
whole run (with a warning naming the budget flags when a CPU run would take over an hour) and per-step
progress, as a tqdm bar or, with `quiet`, as a log line at most once a minute.

Pure formatting over numbers the loop measures: nothing here reads a clock, so the loop's own clock
(`loop._clock`, which tests replace) is the only one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = [
    "BUDGET_FLAGS",
    "ESTIMATE_AFTER",
    "LONG_RUN_SECONDS",
    "QUIET_PROGRESS_SECONDS",
    "Progress",
    "duration",
    "estimate",
    "eval_line",
    "evaluations",
    "plan_line",
]

log = logging.getLogger("verakit.train")
ESTIMATE_AFTER = 5  # optimizer steps timed before the loop prints its estimate of the whole run
LONG_RUN_SECONDS = 3600.0  # a CPU run estimated above this gets a warning naming the budget flags
BUDGET_FLAGS = "--max-train-samples N and/or --epochs N"  # how `verakit train` / `tune` shrink a run
QUIET_PROGRESS_SECONDS = 60.0  # with `quiet`, a progress line at most this often (there is no bar)


class Progress:
    """Where the loop's lines go: above a tqdm bar on the main process, to the "verakit.train" log when
    `quiet` (no bar); other ranks say nothing."""

    def __init__(self, main: bool, quiet: bool, total_steps: int, start_step: int, epochs: int, now: float) -> None:
        self._main, self._total, self._epochs = main, total_steps, epochs
        self._bar = _bar(total_steps, start_step) if main and not quiet else None
        self._last_line = now  # quiet: when the latest progress line (or evaluation) was printed

    def say(self, line: str, warning: bool = False) -> None:
        if not self._main:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            (log.warning if warning else log.info)(line)

    def stepped(self, now: float, epoch: int, step: int, loss: float, lr: float, examples_per_second: float,
                seconds_left: float) -> None:
        """After optimizer step `step` (1-based) of 0-based `epoch`: the bar moves, or (quiet) a line."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"epoch {epoch + 1}/{self._epochs} loss {loss:.4f} lr {lr:.2e} "
                                      f"{examples_per_second:.1f} ex/s", refresh=False)
            self._bar.update(1)
        elif self._main and now - self._last_line >= QUIET_PROGRESS_SECONDS:
            self._last_line = now
            self.say(f"step {step}/{self._total} (epoch {epoch + 1}/{self._epochs}) loss {loss:.4f}; "
                     f"about {duration(seconds_left)} of steps left")

    def evaluated(self, now: float) -> None:
        """An evaluation line was just printed: the next quiet progress line is a full interval away."""
        self._last_line = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plan_line(n_train: int, epochs: int, batch_size: int, eval_every: int | None, steps_per_epoch: int,
              total_steps: int, world: int, start_step: int, eval_note: str | None = None) -> str:
    evals = "at step 0 and each epoch end" + (f" and every {eval_every} steps" if eval_every else "")
    evals += f" ({eval_note})" if eval_note else ""
    return (f"plan: {n_train:,} training rows, {epochs} epoch{'s' if epochs > 1 else ''} x "
            f"{steps_per_epoch:,} steps of batch {batch_size} = {total_steps:,} optimizer steps"
            + (f" on {world} processes" if world > 1 else "") + f"; dev evaluation {evals}"
            + (f"; resuming at step {start_step:,}" if start_step else ""))


def eval_line(record: dict[str, Any], baseline: dict[str, float] | None) -> str:
    """The line of one evaluation record; step 0 (before training) shows the trivial baseline beside it."""
    shown = " ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
    if record["step"] == 0:
        return f"eval step 0 (before training): {shown}" + (
            "; trivial baseline: " + " ".join(f"{k} {v:.4f}" for k, v in baseline.items()) if baseline else "")
    return f"eval epoch {record['epoch']:.2f} step {record['step']}: train_loss {record['train_loss']:.4f} {shown}"


def evaluations(step: int, total_steps: int, steps_per_epoch: int, eval_every: int | None) -> int:
    """The evaluations still to come after `step`: at each epoch end and every `eval_every` steps."""
    ends = total_steps // steps_per_epoch - step // steps_per_epoch
    if not eval_every:
        return ends
    both = math.lcm(steps_per_epoch, eval_every)  # steps counted twice above
    return ends + total_steps // eval_every - step // eval_every - (total_steps // both - step // both)


def estimate(seconds_per_step: float, eval_seconds: float | None, steps_left: int, evals_left: int,
             elapsed: float, on_cpu: bool) -> list[tuple[str, bool]]:
    """The estimate line (and the CPU warning) after the first timed steps: [(line, is_warning)]."""
    left = seconds_per_step * steps_left + (eval_seconds or 0.0) * evals_left
    total = elapsed + left
    evals = (f", {evals_left} evaluation{'s' if evals_left != 1 else ''} of {eval_seconds:.1f} s"
             if eval_seconds is not None else ", evaluations not included")
    out = [(f"estimated {duration(total)} in all, {duration(left)} left for {steps_left:,} more "
            f"step{'s' if steps_left != 1 else ''} ({seconds_per_step:.2f} s/step{evals})", False)]
    if on_cpu and total > LONG_RUN_SECONDS:
        out.append((f"warning: this run needs about {duration(total)} on this CPU (over an hour); to shrink "
                    f"it, pass {BUDGET_FLAGS} (fewer rows per epoch, fewer epochs)", True))
    return out


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bar(total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=True)

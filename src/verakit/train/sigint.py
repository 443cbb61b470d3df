"""Ctrl-C during training: the first SIGINT becomes a flag the loop checks between steps (it then writes a
resumable checkpoint); a second one interrupts at once."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["SigintFlag"]


class SigintFlag:
    """Turns the first SIGINT into a flag checked between steps; a second one interrupts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> SigintFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

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
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> SigintFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            return self
        self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python (an embedding host); Python's own
            # default then, rather than leaving ours to swallow the next Ctrl-C into a flag no one reads
            previous = signal.default_int_handler if self._previous is None else self._previous
            signal.signal(signal.SIGINT, previous)
            self._installed = False

"""The adapter-name rule: what an adapter may be called wherever it is stored or served (the server's store
files `NAME.safetensors`, grouped training's `adapters/NAME.safetensors`). Stdlib only, below both training and
serving, so neither imports the other for it."""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "InvalidName", "check_name"]

# A safe file name: no path separators, no leading dot (hidden files, "." and ".."), at most 128 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class InvalidName(ValueError):
    """An adapter name is not a safe file name; the message quotes the rule."""


def check_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise InvalidName."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidName(
            f"invalid adapter name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ - , not starting with '.'"
        )
    return name

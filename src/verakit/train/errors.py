"""DataError, the error every recipe's data loader raises (`verakit` exits 2 with its message)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Missing or malformed data; the message names the file and line at fault."""

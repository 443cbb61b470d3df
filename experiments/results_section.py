"""Replace one `## ` section of a Markdown results file, keeping every other byte (experiments' reports)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["replace_section", "write_atomic"]


def replace_section(old: str, heading: str, text: str) -> str:
    """`old` with the section under `heading` (up to the next "## " heading) replaced by `text`, or `text`
    appended; every other byte of `old` is kept."""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    body = text.rstrip("\n") + "\n"
    if start is None:
        return old.rstrip("\n") + "\n\n" + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + tail if tail else "")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

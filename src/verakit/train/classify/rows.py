"""Rows of data files -> Examples, for the GLUE, hub and user (csv task) loaders: csv/tsv reading, the
split files of a folder, and label encoding, every failure a DataError naming ``path:line``."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .tasks import DataError, Example

__all__ = ["Labels", "Row", "find_split", "open_text", "raw_label", "read_delimited", "refuse_scores_with_words",
           "to_examples"]

Row = tuple[int, Mapping[str, object]]  # (1-based line number, column -> raw value)


def find_split(folder: Path, stems: Sequence[str], exts: Sequence[str]) -> Path | None:
    """The one file `folder/STEM.EXT` that exists, or None; two candidates are ambiguous (DataError)."""
    found = [folder / f"{stem}.{ext}" for stem in stems for ext in exts]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise DataError(f"{found[1]}: ambiguous split, {found[0].name} exists too; keep one of them")
    return found[0] if found else None


def to_examples(
    path: Path,
    rows: Iterable[Row],
    text: str,
    pair: str | None,
    label: str,
    labels: Labels,
    group: str | None,
) -> list[Example]:
    """One Example per row from these columns (`pair` and `group` optional), labels encoded by `labels`."""
    return [
        Example(
            _text(path, line, row, text),
            None if pair is None else _text(path, line, row, pair),
            labels.encode(path, line, label, raw_label(path, line, row, label)),
            None if group is None else _text(path, line, row, group),
        )
        for line, row in rows
    ]


def _require(path: Path, line: int, row: Mapping[str, object], column: str) -> object:
    value = row.get(column)
    if value is None and column in row:  # JSON null: the column is there, its value is not
        raise DataError(f"{path}:{line}: no value (null) in column {column!r}")
    if value is None:
        raise DataError(f"{path}:{line}: missing column {column!r} (found: {', '.join(map(str, row))})")
    return value


def _text(path: Path, line: int, row: Mapping[str, object], column: str) -> str:
    value = _require(path, line, row, column)
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: column {column!r} must be text, found {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}:{line}: empty text in column {column!r}")
    return value


def raw_label(path: Path, line: int, row: Mapping[str, object], column: str) -> str:
    """The label as a stripped string; JSON and datasets numbers become their decimal text."""
    value = _require(path, line, row, column)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{path}:{line}: label must be a string or a number, found {value!r}")
    raw = value.strip() if isinstance(value, str) else repr(value)
    if not raw:
        raise DataError(f"{path}:{line}: empty label in column {column!r}")
    return raw


def _as_float(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def refuse_scores_with_words(path: Path, raws: list[tuple[int, str]]) -> None:
    """Scores (numbers, one not an integer) beside a label that is no number are almost surely a column of
    regression targets with a stray value ("n/a", a typo); fitted as classes, every distinct score would
    become a class of its own. Refused, naming both lines; integers with words stay classes ("0", "1", "other")."""
    score = next(((line, raw) for line, raw in raws if (x := _as_float(raw)) is not None and not x.is_integer()), None)
    word = next(((line, raw) for line, raw in raws if _as_float(raw) is None), None)
    if score is not None and word is not None:
        raise DataError(f"{path}:{word[0]}: label {word[1]!r} is not a number, but line {score[0]} has the score "
                        f"{score[1]!r}: regression needs every label a finite number (classes: no fractional labels)")


@dataclass(frozen=True)
class Labels:
    """How raw label strings become Example.label: class ids, or float scores for regression."""

    is_regression: bool
    integer: bool  # labels are integers: "1.0" and "1" are the same class
    names: tuple[str, ...]  # raw labels in class-id order; empty for regression
    ids: Mapping[str, int]  # the inverse of names

    @classmethod
    def regression(cls) -> Labels:
        return cls(True, False, (), {})

    @classmethod
    def classes(cls, names: Sequence[str], integer: bool) -> Labels:
        return cls(False, integer, tuple(names), {name: i for i, name in enumerate(names)})

    @classmethod
    def fit(cls, raws: list[str]) -> Labels:
        """The user's train labels: regression if all are numbers and one is not an integer;
        else classes in sorted order (numeric order for integers, so "2" < "10")."""
        numbers = [_as_float(raw) for raw in raws]
        values = [x for x in numbers if x is not None]
        if len(values) < len(raws):
            return cls.classes(sorted(set(raws)), False)
        if not all(x.is_integer() for x in values):
            return cls.regression()
        return cls.classes([str(v) for v in sorted({int(x) for x in values})], True)

    def encode(self, path: Path, line: int, column: str, raw: str) -> int | float:
        if self.is_regression:
            value = _as_float(raw)
            if value is None:
                raise DataError(f"{path}:{line}: label {raw!r} in column {column!r} is not a finite number")
            return value
        key = raw
        if self.integer and (number := _as_float(raw)) is not None and number.is_integer():
            key = str(int(number))
        label = self.ids.get(key)
        if label is None:
            raise DataError(
                f"{path}:{line}: unknown label {raw!r} in column {column!r}; expected one of: {', '.join(self.names)}"
            )
        return label


def read_delimited(path: Path, delimiter: str, columns: tuple[str, ...] | None) -> list[Row]:
    """Rows of a csv/tsv file keyed by header (or by ``columns`` for a header-less file)."""
    # GLUE tsv files contain bare quotes (" the witness "), so tsv is read without quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: list[Row] = []
    header = columns
    with open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        try:
            for record in reader:
                if not record:  # a blank line, e.g. a doubled newline at the end
                    continue
                if header is None:
                    header = tuple(name.strip() for name in record)
                    _refuse_repeated_names(path, reader.line_num, header)
                    continue
                if columns is None and tuple(field.strip() for field in record) == header:
                    # two files joined with `cat`: read as data, the header would be one more example whose
                    # label is the word "label", an extra class trained on silently
                    raise DataError(f"{path}:{reader.line_num}: repeats the header line ({', '.join(header)}); "
                                    "remove it (were two files joined?)")
                if len(record) != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: expected {len(header)} fields "
                        f"({', '.join(header)}), found {len(record)}"
                    )
                rows.append((reader.line_num, dict(zip(header, record, strict=True))))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{reader.line_num + 1}: not valid UTF-8 ({exc.reason})") from exc
    if not rows:
        raise DataError(f"{path}:1: empty split: no examples in the file")
    return rows


def _refuse_repeated_names(path: Path, line: int, header: tuple[str, ...]) -> None:
    """A column named twice would be read as its last copy alone, the other dropped without a word."""
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}:{line}: the header names column {name!r} twice; rename one of them")
        seen.add(name)


def open_text(path: Path) -> TextIO:
    """`path` opened for reading text as data loaders want it; DataError when it cannot be opened."""
    try:
        # utf-8-sig: MRPC's header line starts with a byte-order mark.
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror}") from exc

"""The user's own classification or regression data (``--task csv``): ``train`` and ``dev`` (or
``validation``) files in one folder, each .csv, .jsonl or .tsv, with columns ``text``, optional
``text_pair``, ``label``. Labels that are all numbers with a non-integer among them make a regression
task; non-integer numbers beside labels that are no number are refused (a stray value in a column of
scores); any others are classes, sorted. Every bad-data case raises DataError naming ``path:line``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .rows import (
    Labels,
    Row,
    find_split,
    open_text,
    raw_label,
    read_delimited,
    refuse_scores_with_words,
    to_examples,
)
from .tasks import REGRESSION_METRICS, TASKS, DataError, Example, TaskSpec

__all__ = ["USER_EXTS", "load_user_task"]

USER_EXTS = ("csv", "jsonl", "tsv")
log = logging.getLogger("verakit.train")


def load_user_task(folder: Path, group_column: str | None) -> tuple[TaskSpec, list[Example], list[Example]]:
    """(the task's TaskSpec, fitted to the train labels; train Examples; dev Examples) of `folder`."""
    paths: dict[str, Path] = {}
    for split, stems in (("train", ("train",)), ("dev", ("dev", "validation"))):
        path = find_split(folder, stems, USER_EXTS)
        if path is None:
            raise DataError(f"{folder / (split + '.csv')}: file not found (also tried .jsonl and .tsv)")
        paths[split] = path
    rows = {split: _user_rows(path) for split, path in paths.items()}
    raws = [(line, raw_label(paths["train"], line, row, "label")) for line, row in rows["train"]]
    labels = Labels.fit([raw for _, raw in raws])
    refuse_scores_with_words(paths["train"], raws)
    if not labels.is_regression and len(labels.names) < 2:
        raise DataError(
            f"{paths['train']}:{rows['train'][0][0]}: every label is {labels.names[0]!r}; "
            "classification needs at least two classes"
        )
    # text_pair is optional; once train has it, every row of both splits must.
    pair = "text_pair" if any("text_pair" in row for _, row in rows["train"]) else None
    if pair is None and (line := next((n for n, row in rows["dev"] if "text_pair" in row), None)) is not None:
        # read as single texts, dev would be scored on half of each example
        raise DataError(f"{paths['dev']}:{line}: column 'text_pair' is in dev but not in {paths['train'].name}; "
                        "give both splits the same columns")
    used = {"text", "label", "text_pair", *([group_column] if group_column else [])}
    for split, path in paths.items():
        unused = sorted({str(c) for _, row in rows[split] for c in row} - used)
        if unused:  # a misspelt or renamed text_pair (text_b, sentence2) would be dropped without a word
            log.warning("%s: column(s) %s not used (the csv task reads text, text_pair, label)", path,
                        ", ".join(repr(c) for c in unused))
    train, dev = (to_examples(paths[s], rows[s], "text", pair, "label", labels, group_column) for s in paths)
    # Said once where the kind is inferred from numbers: integer ratings (1-5) are classes unless one score is
    # fractional. Word labels are classes without doubt, and say nothing.
    if labels.is_regression:
        log.info("%s: labels are scores with a fraction: a regression task", paths["train"])
        return TaskSpec("csv", (), True, REGRESSION_METRICS, "pearson"), train, dev
    if labels.integer:
        shown = ", ".join(labels.names[:10]) + (", ..." if len(labels.names) > 10 else "")
        log.info("%s: %d classes (%s); integer labels are classes (a fractional one would make scores for "
                 "regression)", paths["train"], len(labels.names), shown)
    template = TASKS["csv"]
    return TaskSpec("csv", labels.names, False, template.metric_names, template.main_metric), train, dev


def _user_rows(path: Path) -> list[Row]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return read_delimited(path, "\t" if path.suffix == ".tsv" else ",", None)


def _read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    line_no = 0
    with open_text(path) as fh:
        try:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{line_no}: invalid JSON: {exc.msg} (column {exc.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, found {type(obj).__name__}")
                rows.append((line_no, obj))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{line_no + 1}: not valid UTF-8 ({exc.reason})") from exc
    if not rows:
        raise DataError(f"{path}:1: empty split: no examples in the file")
    return rows

"""Data loading for GLUE-style sentence(-pair) classification and regression.

``load_task(task, data_dir)`` returns a TaskData: the task's TaskSpec plus train and dev Examples.
Where the data comes from:

* GLUE tsv files as written by GLUE's ``download_glue_data.py``: ``data_dir`` is either the task
  folder (``train.tsv``, ``dev.tsv``) or the GLUE root holding ``SST-2/``, ``MRPC/``, ...
  QNLI's train.tsv (about 28 MB) is often missing offline; then the official dev set is split in
  file order: all rows but the last 1,000 train (4,463 of the 5,463), the last 1,000 evaluate.
* ``task="csv"``: the user's own ``train`` and ``dev`` (or ``validation``) files, each .csv, .jsonl
  or .tsv, with columns ``text``, optional ``text_pair``, ``label``.
* No ``data_dir``: ``datasets.load_dataset("glue", task)``, if ``datasets`` is installed and online.

Every bad-data case raises DataError, whose message starts with ``path:line:``.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TextIO

__all__ = ["TASKS", "DataError", "Example", "TaskData", "TaskSpec", "load_task"]


class DataError(ValueError):
    """Missing or malformed data; the message names the file and line at fault."""


@dataclass(frozen=True, slots=True)  # slots: SST-2 alone is 67k of these
class Example:
    text: str  # first (or only) sentence, verbatim from the file
    text_pair: str | None  # second sentence of pair tasks (MRPC, RTE, STS-B, QNLI), else None
    label: int | float  # class id in [0, num_labels), or the score for regression
    group: str | None = None  # value of the optional group column, for per-group training


@dataclass(frozen=True)
class TaskSpec:
    name: str  # key in TASKS, e.g. "sst2"
    label_names: tuple[str, ...]  # index = class id; empty for regression
    is_regression: bool
    metric_names: tuple[str, ...]  # what compute_metrics reports, in this order
    main_metric: str  # the one used for model selection; one of metric_names

    def __post_init__(self) -> None:
        if self.main_metric not in self.metric_names:
            raise ValueError(
                f"TaskSpec {self.name!r}: main_metric {self.main_metric!r} is not in {self.metric_names}"
            )
        if self.is_regression and self.label_names:
            raise ValueError(f"TaskSpec {self.name!r}: a regression task has no label_names")

    @property
    def num_labels(self) -> int:
        """Width of the model head: 1 for regression."""
        return 1 if self.is_regression else len(self.label_names)


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    train: tuple[Example, ...]
    dev: tuple[Example, ...]


_ENTAILMENT = ("entailment", "not_entailment")  # GLUE / Hugging Face order: entailment = 0
_REGRESSION_METRICS = ("pearson", "spearmanr")

TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        "sst2": TaskSpec("sst2", ("negative", "positive"), False, ("accuracy",), "accuracy"),
        "mrpc": TaskSpec("mrpc", ("not_equivalent", "equivalent"), False, ("f1", "accuracy"), "f1"),
        "rte": TaskSpec("rte", _ENTAILMENT, False, ("accuracy",), "accuracy"),
        "cola": TaskSpec(
            "cola", ("unacceptable", "acceptable"), False, ("matthews_correlation",), "matthews_correlation"
        ),
        "stsb": TaskSpec("stsb", (), True, _REGRESSION_METRICS, "pearson"),
        "qnli": TaskSpec("qnli", _ENTAILMENT, False, ("accuracy",), "accuracy"),
        # A template: load_task fills label_names / is_regression from the user's train file, and
        # switches to pearson/spearmanr for regression. macro F1 because classes may be many.
        "csv": TaskSpec("csv", (), False, ("accuracy", "macro_f1"), "accuracy"),
    }
)


@dataclass(frozen=True)
class _GlueFiles:
    folder: str  # folder name in GLUE's download, e.g. "SST-2"
    text: str  # column names in the tsv header
    text_pair: str | None
    label: str
    labels: tuple[str, ...] | None  # raw labels in class-id order; None: float score (regression)
    hub_text: tuple[str, str | None]  # the two text columns in datasets' "glue" config
    columns: tuple[str, ...] | None = None  # names for the fields of a header-less file (CoLA)


_BIN = ("0", "1")
_COLA_COLUMNS = ("source", "label", "annotation", "sentence")
_GLUE: Mapping[str, _GlueFiles] = MappingProxyType(
    {
        "sst2": _GlueFiles("SST-2", "sentence", None, "label", _BIN, ("sentence", None)),
        "mrpc": _GlueFiles("MRPC", "#1 String", "#2 String", "Quality", _BIN, ("sentence1", "sentence2")),
        "rte": _GlueFiles("RTE", "sentence1", "sentence2", "label", _ENTAILMENT, ("sentence1", "sentence2")),
        "cola": _GlueFiles("CoLA", "sentence", None, "label", _BIN, ("sentence", None), _COLA_COLUMNS),
        "stsb": _GlueFiles("STS-B", "sentence1", "sentence2", "score", None, ("sentence1", "sentence2")),
        "qnli": _GlueFiles("QNLI", "question", "sentence", "label", _ENTAILMENT, ("question", "sentence")),
    }
)
_QNLI_EVAL_ROWS = 1000  # rows at the end of QNLI's dev.tsv kept for evaluation when train.tsv is absent
_USER_EXTS = ("csv", "jsonl", "tsv")

_Row = tuple[int, Mapping[str, object]]  # (1-based line number, column -> raw value)


def load_task(
    task: str,
    data_dir: str | Path | None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    group_column: str | None = None,
) -> TaskData:
    """Load train and dev examples of ``task`` (a TASKS key; "SST-2", "sts-b" also work).

    ``max_*_samples`` keep a random subset chosen by ``seed`` (same seed, same subset), in file
    order. ``group_column`` names a column copied into ``Example.group``; it must exist.
    """
    key = task.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    for name, limit in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{name} must be a positive int or None, got {limit!r}")
    if key == "csv":
        if data_dir is None:
            raise DataError(
                "task 'csv' needs --data-dir DIR holding train.{csv,jsonl,tsv} and dev.{csv,jsonl,tsv}"
            )
        spec, train, dev = _load_user(_existing_dir(data_dir), group_column)
    elif data_dir is None:
        spec = TASKS[key]
        train, dev = _load_hub(key, group_column)
    else:
        spec = TASKS[key]
        train, dev = _load_glue(key, _existing_dir(data_dir), group_column)
    return TaskData(
        spec,
        _subset(train, max_train_samples, seed, "train"),
        _subset(dev, max_eval_samples, seed, "dev"),
    )


def _subset(examples: Sequence[Example], limit: int | None, seed: int, split: str) -> tuple[Example, ...]:
    if limit is None or limit >= len(examples):
        return tuple(examples)
    # One stream per split, so changing max_eval_samples never changes the train subset. A str seed
    # is hashed with SHA-512 by random, hence identical across processes and PYTHONHASHSEED.
    picked = sorted(random.Random(f"verakit:{split}:{seed}").sample(range(len(examples)), limit))
    return tuple(examples[i] for i in picked)


def _existing_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"{path}: data directory not found")
    return path


def _find_split(folder: Path, stems: Sequence[str], exts: Sequence[str]) -> Path | None:
    found = [folder / f"{stem}.{ext}" for stem in stems for ext in exts]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise DataError(f"{found[1]}: ambiguous split, {found[0].name} exists too; keep one of them")
    return found[0] if found else None


# ---------------------------------------------------------------- the three sources


def _load_glue(key: str, data_dir: Path, group_column: str | None) -> tuple[list[Example], list[Example]]:
    files = _GLUE[key]
    folder = data_dir / files.folder if (data_dir / files.folder).is_dir() else data_dir
    labels = _Labels.regression() if files.labels is None else _Labels.classes(files.labels, False)

    def examples(path: Path) -> list[Example]:
        rows = _read_delimited(path, "\t", files.columns)
        return _examples(path, rows, files.text, files.text_pair, files.label, labels, group_column)

    dev_path = _find_split(folder, ("dev", "validation"), ("tsv",))
    if dev_path is None:
        raise DataError(f"{folder / 'dev.tsv'}: file not found (GLUE {files.folder} dev split)")
    dev = examples(dev_path)
    train_path = _find_split(folder, ("train",), ("tsv",))
    if train_path is not None:
        return examples(train_path), dev
    if key != "qnli":
        raise DataError(f"{folder / 'train.tsv'}: file not found (GLUE {files.folder} train split)")
    # No QNLI train.tsv: split the official dev set in file order (see the module docstring).
    if len(dev) <= _QNLI_EVAL_ROWS:
        raise DataError(
            f"{dev_path}: {len(dev)} rows; without train.tsv, QNLI's dev.tsv is split into train and "
            f"its last {_QNLI_EVAL_ROWS} rows, so it needs more than {_QNLI_EVAL_ROWS}"
        )
    return dev[:-_QNLI_EVAL_ROWS], dev[-_QNLI_EVAL_ROWS:]


def _load_hub(key: str, group_column: str | None) -> tuple[list[Example], list[Example]]:
    files, spec = _GLUE[key], TASKS[key]

    def unavailable(reason: str) -> DataError:
        return DataError(
            f"cannot load GLUE task {key!r} without --data-dir: {reason}. Download the GLUE tsv files "
            f"(GLUE's download_glue_data.py writes {files.folder}/train.tsv and {files.folder}/dev.tsv) "
            f"and pass --data-dir DIR, where DIR holds train.tsv and dev.tsv or is the GLUE root "
            f"holding {files.folder}/"
        )

    try:
        import datasets
    except ImportError as exc:
        raise unavailable("the `datasets` package is not installed") from exc
    try:
        loaded = datasets.load_dataset("glue", key)
    except Exception as exc:  # offline, datasets raises many unrelated types; all mean "not available"
        raise unavailable(f"datasets.load_dataset('glue', {key!r}) failed: {exc}") from exc
    # datasets already maps labels to GLUE's class ids (ints), or floats for STS-B.
    ids = tuple(str(i) for i in range(spec.num_labels))
    labels = _Labels.regression() if spec.is_regression else _Labels.classes(ids, True)
    out = []
    for split in ("train", "validation"):
        where = Path(f"hub:glue/{key}/{split}")  # datasets rows have no file; name the split instead
        rows = list(enumerate(loaded[split], 1))
        if not rows:
            raise DataError(f"{where}:1: empty split: no examples")
        out.append(_examples(where, rows, *files.hub_text, "label", labels, group_column))
    return out[0], out[1]


def _load_user(folder: Path, group_column: str | None) -> tuple[TaskSpec, list[Example], list[Example]]:
    paths: dict[str, Path] = {}
    for split, stems in (("train", ("train",)), ("dev", ("dev", "validation"))):
        path = _find_split(folder, stems, _USER_EXTS)
        if path is None:
            raise DataError(f"{folder / (split + '.csv')}: file not found (also tried .jsonl and .tsv)")
        paths[split] = path
    rows = {split: _user_rows(path) for split, path in paths.items()}
    labels = _Labels.fit([_raw_label(paths["train"], line, row, "label") for line, row in rows["train"]])
    if not labels.is_regression and len(labels.names) < 2:
        raise DataError(
            f"{paths['train']}:{rows['train'][0][0]}: every label is {labels.names[0]!r}; "
            "classification needs at least two classes"
        )
    # text_pair is optional; once train has it, every row of both splits must.
    pair = "text_pair" if any("text_pair" in row for _, row in rows["train"]) else None
    train, dev = (_examples(paths[s], rows[s], "text", pair, "label", labels, group_column) for s in paths)
    if labels.is_regression:
        return TaskSpec("csv", (), True, _REGRESSION_METRICS, "pearson"), train, dev
    template = TASKS["csv"]
    return TaskSpec("csv", labels.names, False, template.metric_names, template.main_metric), train, dev


def _user_rows(path: Path) -> list[_Row]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_delimited(path, "\t" if path.suffix == ".tsv" else ",", None)


# ---------------------------------------------------------------- rows -> examples


def _examples(
    path: Path,
    rows: Iterable[_Row],
    text: str,
    pair: str | None,
    label: str,
    labels: _Labels,
    group: str | None,
) -> list[Example]:
    return [
        Example(
            _text(path, line, row, text),
            None if pair is None else _text(path, line, row, pair),
            labels.encode(path, line, label, _raw_label(path, line, row, label)),
            None if group is None else _text(path, line, row, group),
        )
        for line, row in rows
    ]


def _require(path: Path, line: int, row: Mapping[str, object], column: str) -> object:
    value = row.get(column)
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


def _raw_label(path: Path, line: int, row: Mapping[str, object], column: str) -> str:
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


@dataclass(frozen=True)
class _Labels:
    """How raw label strings become Example.label: class ids, or float scores for regression."""

    is_regression: bool
    integer: bool  # labels are integers: "1.0" and "1" are the same class
    names: tuple[str, ...]  # raw labels in class-id order; empty for regression
    ids: Mapping[str, int]  # the inverse of names

    @classmethod
    def regression(cls) -> _Labels:
        return cls(True, False, (), {})

    @classmethod
    def classes(cls, names: Sequence[str], integer: bool) -> _Labels:
        return cls(False, integer, tuple(names), {name: i for i, name in enumerate(names)})

    @classmethod
    def fit(cls, raws: list[str]) -> _Labels:
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


# ---------------------------------------------------------------- reading rows


def _read_delimited(path: Path, delimiter: str, columns: tuple[str, ...] | None) -> list[_Row]:
    """Rows of a csv/tsv file keyed by header (or by ``columns`` for a header-less file)."""
    # GLUE tsv files contain bare quotes (" the witness "), so tsv is read without quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: list[_Row] = []
    header = columns
    with _open(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        try:
            for record in reader:
                if not record:  # a blank line, e.g. a doubled newline at the end
                    continue
                if header is None:
                    header = tuple(name.strip() for name in record)
                    continue
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


def _read_jsonl(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    line_no = 0
    with _open(path) as fh:
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


def _open(path: Path) -> TextIO:
    try:
        # utf-8-sig: MRPC's header line starts with a byte-order mark.
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror}") from exc

"""Data loading for GLUE-style sentence(-pair) classification and regression.

``load_task(task, data_dir)`` returns a TaskData: the task's TaskSpec plus train and dev Examples.
Where the data comes from:

* GLUE tsv files as written by GLUE's ``download_glue_data.py``: ``data_dir`` is either the task
  folder (``train.tsv``, ``dev.tsv``) or the GLUE root holding ``SST-2/``, ``MRPC/``, ...
  QNLI's train.tsv (about 28 MB) is often missing offline; then the official dev set is split in
  file order: all rows but the last 1,000 train (4,463 of the 5,463), the last 1,000 evaluate.
* ``task="csv"``: the user's own ``train`` and ``dev`` (or ``validation``) files, each .csv, .jsonl
  or .tsv, with columns ``text``, optional ``text_pair``, ``label`` (read by userdata.py).
* No ``data_dir``: ``datasets.load_dataset("glue", task)``, if ``datasets`` is installed and online.

Every bad-data case raises DataError, whose message starts with ``path:line:``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from .rows import Labels, find_split, read_delimited, to_examples
from .tasks import ENTAILMENT, TASKS, DataError, Example, TaskData, TaskSpec
from .userdata import load_user_task

# TASKS, DataError, Example, TaskData and TaskSpec live in tasks.py (the user's files: userdata.py); they
# are this module's public names too, where callers have always imported them from.
__all__ = ["TASKS", "DataError", "Example", "TaskData", "TaskSpec", "carve_selection", "load_task"]


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
        "rte": _GlueFiles("RTE", "sentence1", "sentence2", "label", ENTAILMENT, ("sentence1", "sentence2")),
        "cola": _GlueFiles("CoLA", "sentence", None, "label", _BIN, ("sentence", None), _COLA_COLUMNS),
        "stsb": _GlueFiles("STS-B", "sentence1", "sentence2", "score", None, ("sentence1", "sentence2")),
        "qnli": _GlueFiles("QNLI", "question", "sentence", "label", ENTAILMENT, ("question", "sentence")),
    }
)
_QNLI_EVAL_ROWS = 1000  # rows at the end of QNLI's dev.tsv kept for evaluation when train.tsv is absent


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
        spec, train, dev = load_user_task(_existing_dir(data_dir), group_column)
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


def carve_selection(train: Sequence[Example], rows: int, seed: int) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(the training rows left, `rows` of them carved off): a seeded choice (`seed`), its own random stream,
    both in file order. The carved rows choose the checkpoint (`verakit train --selection-rows`), so the dev
    split is scored once, by the chosen adapter, and stays an honest estimate."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows < len(train):
        raise ValueError(f"--selection-rows must be between 1 and {len(train) - 1} (the training rows less one), "
                         f"got {rows!r}")
    picked = set(random.Random(f"verakit:selection:{seed}").sample(range(len(train)), rows))
    return (tuple(e for i, e in enumerate(train) if i not in picked),
            tuple(e for i, e in enumerate(train) if i in picked))


def _existing_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if path.is_file():  # e.g. --data-dir DIR/train.csv
        raise DataError(f"{path}: --data-dir is a file; pass the folder that holds the train and dev files")
    if not path.is_dir():
        raise DataError(f"{path}: data directory not found")
    return path


# ---------------------------------------------------------------- GLUE files and the hub (csv: userdata.py)


def _load_glue(key: str, data_dir: Path, group_column: str | None) -> tuple[list[Example], list[Example]]:
    files = _GLUE[key]
    folder = data_dir / files.folder if (data_dir / files.folder).is_dir() else data_dir
    labels = Labels.regression() if files.labels is None else Labels.classes(files.labels, False)

    def examples(path: Path) -> list[Example]:
        rows = read_delimited(path, "\t", files.columns)
        return to_examples(path, rows, files.text, files.text_pair, files.label, labels, group_column)

    dev_path = find_split(folder, ("dev", "validation"), ("tsv",))
    if dev_path is None:
        raise DataError(f"{folder / 'dev.tsv'}: file not found (GLUE {files.folder} dev split)")
    dev = examples(dev_path)
    train_path = find_split(folder, ("train",), ("tsv",))
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
    labels = Labels.regression() if spec.is_regression else Labels.classes(ids, True)
    out = []
    for split in ("train", "validation"):
        where = Path(f"hub:glue/{key}/{split}")  # datasets rows have no file; name the split instead
        rows = list(enumerate(loaded[split], 1))
        if not rows:
            raise DataError(f"{where}:1: empty split: no examples")
        out.append(to_examples(where, rows, *files.hub_text, "label", labels, group_column))
    return out[0], out[1]

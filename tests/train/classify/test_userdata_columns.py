"""The csv task's files where a mistake once trained without a word (exit 0): a header line repeated
inside the data, a column named twice, dev's text_pair dropped, a pair column under another name."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from verakit.train.classify.data import DataError, load_task

GOOD = "text,label\na good film,pos\na bad film,neg\n"


def task(folder: Path, train: str, dev: str = GOOD, ext: str = "csv") -> Path:
    (folder / f"train.{ext}").write_text(train, encoding="utf-8")
    (folder / f"dev.{ext}").write_text(dev, encoding="utf-8")
    return folder


def test_a_repeated_header_line_is_refused(tmp_path: Path) -> None:
    """`cat a.csv b.csv > train.csv`: the second header was an example labelled "label", a third class."""
    task(tmp_path, GOOD + "text,label\nnice one,pos\n")
    with pytest.raises(DataError, match=r"train\.csv:4: repeats the header line \(text, label\); remove it"):
        load_task("csv", tmp_path)
    task(tmp_path, "text\tlabel\na\tpos\nb\tneg\n text \tlabel\n", "text\tlabel\na\tpos\n", "tsv")
    (tmp_path / "train.csv").unlink()
    (tmp_path / "dev.csv").unlink()
    with pytest.raises(DataError, match=r"train\.tsv:4: repeats the header line"):
        load_task("csv", tmp_path)


def test_a_column_named_twice_is_refused(tmp_path: Path) -> None:
    """The last of two `text` columns was read, the first dropped."""
    task(tmp_path, "text,text,label\nx,a good film,pos\ny,a bad film,neg\n")
    with pytest.raises(DataError, match=r"train\.csv:1: the header names column 'text' twice"):
        load_task("csv", tmp_path)


def test_text_pair_in_dev_only_is_refused(tmp_path: Path) -> None:
    """Dev was scored on its first texts alone."""
    task(tmp_path, GOOD, "text,text_pair,label\na,good,pos\nb,bad,neg\n")
    with pytest.raises(DataError, match=r"dev\.csv:2: column 'text_pair' is in dev but not in train\.csv"):
        load_task("csv", tmp_path)


def test_unused_columns_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pair under another name (text_b) trained on the first texts alone; now a warning names it, once per file,
    and the examples are those of the same files without it."""
    pairs = "text,text_b,label\na,good film,pos\nb,bad film,neg\n"
    with caplog.at_level(logging.WARNING, logger="verakit.train"):
        data = load_task("csv", task(tmp_path, pairs, pairs))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{tmp_path / s}.csv: column(s) 'text_b' not used (the csv task reads text, text_pair, label)"
                      for s in ("train", "dev")]
    assert [e.text_pair for e in data.train] == [None, None]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="verakit.train"):
        load_task("csv", task(tmp_path, "text,text_pair,label\na,x,pos\nb,y,neg\n", "text,text_pair,label\na,x,pos\n"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_inferred_kind_of_task_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Integer ratings (1-5) meant as scores trained a 5-class classifier with nothing but the metric's name
    ("accuracy") to tell; the loader now says which kind it inferred, and from what."""
    ratings = "text,label\na,1\nb,2\nc,5\n"
    with caplog.at_level(logging.INFO, logger="verakit.train"):
        load_task("csv", task(tmp_path, ratings, ratings))
        load_task("csv", task(tmp_path, ratings + "d,2.5\n", ratings))
        load_task("csv", task(tmp_path, "text,label\na,pos\nb,neg\n", "text,label\na,pos\n"))  # words: no doubt
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'train.csv'}: 3 classes (1, 2, 5); integer labels are classes (a fractional one would make "
        "scores for regression)",
        f"{tmp_path / 'train.csv'}: labels are scores with a fraction: a regression task"]

"""load_task on the real GLUE files in ../shared/data, and every DataError on small files in tmp_path."""

from __future__ import annotations

import functools
import re
import sys
import time
import types
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from verakit.train.classify.data import TASKS, DataError, Example, TaskData, TaskSpec, load_task

GLUE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").is_file(),
    reason=f"real GLUE tsv files not found under {GLUE} (see shared/data/README.md)",
)


@functools.cache
def glue(task: str) -> TaskData:
    return load_task(task, GLUE)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the real GLUE files


@needs_glue
@pytest.mark.parametrize(
    ("task", "n_train", "n_dev"),
    [
        ("sst2", 67_349, 872),
        ("mrpc", 3_668, 408),
        ("rte", 2_490, 277),
        ("cola", 8_551, 1_043),
        ("stsb", 5_749, 1_500),
        # No QNLI train.tsv is stored: its 5,463-row dev.tsv is split, first 4,463 train, last 1,000 dev.
        ("qnli", 4_463, 1_000),
    ],
)
def test_real_row_counts(task: str, n_train: int, n_dev: int) -> None:
    data = glue(task)
    assert (len(data.train), len(data.dev)) == (n_train, n_dev)
    assert data.spec is TASKS[task]


@needs_glue
@pytest.mark.parametrize(
    ("task", "counts"),
    [
        ("sst2", {1: 37_569, 0: 29_780}),
        ("mrpc", {1: 2_474, 0: 1_194}),
        ("rte", {0: 1_249, 1: 1_241}),  # entailment = 0
        ("cola", {1: 6_023, 0: 2_528}),
    ],
)
def test_real_train_label_balance(task: str, counts: dict[int, int]) -> None:
    assert Counter(e.label for e in glue(task).train) == counts


@needs_glue
def test_qnli_split_is_dev_tsv_in_file_order() -> None:
    data = glue("qnli")
    labels = Counter(e.label for e in data.train + data.dev)
    assert labels == {0: 2_702, 1: 2_761}  # README's dev balance: entailment / not_entailment
    assert data.train[0].text == "What came into force after the new constitution was herald?"
    assert data.dev[0].text == "What venue hosted Super Bowl Opening Night?"  # dev.tsv row index 4463
    assert data.dev[-1].text == "Who discovered this and where did they come from?"


@needs_glue
@pytest.mark.parametrize(
    ("task", "split", "example"),
    [
        ("sst2", "train", Example("hide new secretions from the parental units ", None, 0)),
        ("sst2", "dev", Example("it 's a charming and often affecting journey . ", None, 1)),
        (
            "mrpc",
            "train",
            Example(
                'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting '
                "his evidence .",
                'Referring to him as only " the witness " , Amrozi accused his brother of deliberately '
                "distorting his evidence .",
                1,
            ),
        ),
        (
            "rte",
            "train",
            Example(
                "No Weapons of Mass Destruction Found in Iraq Yet.",
                "Weapons of Mass Destruction Found in Iraq.",
                1,
            ),
        ),
        (
            "cola",
            "train",
            Example("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
        ),
        ("cola", "dev", Example("The sailors rode the breeze clear of the rocks.", None, 1)),
        ("stsb", "train", Example("A plane is taking off.", "An air plane is taking off.", 5.0)),
        (
            "stsb",
            "dev",
            Example("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
        ),
        (
            "qnli",
            "train",
            Example(
                "What came into force after the new constitution was herald?",
                "As of that day, the new constitution heralding the Second Republic came into force.",
                0,
            ),
        ),
    ],
)
def test_real_first_rows(task: str, split: str, example: Example) -> None:
    assert getattr(glue(task), split)[0] == example


@needs_glue
def test_stsb_scores_and_group_column() -> None:
    data = load_task("STS-B", GLUE / "STS-B", group_column="genre")  # alias, and the task folder itself
    assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in data.train + data.dev)
    assert data.train[1].label == pytest.approx(3.8)
    assert Counter(e.group for e in data.train) == {
        "main-news": 3_299,
        "main-captions": 2_000,
        "main-forum": 450,
    }
    assert data.spec.num_labels == 1


@needs_glue
def test_header_less_cola_has_named_columns() -> None:
    data = load_task("cola", GLUE, group_column="source")
    assert data.train[0].group == "gj04"


@needs_glue
def test_full_sst2_train_loads_fast() -> None:
    start = time.perf_counter()
    load_task("sst2", GLUE)
    # Target is well under 1 s (plain csv parsing); the bound is loose for busy shared CPUs.
    assert time.perf_counter() - start < 3.0


@needs_glue
def test_subsets_are_seeded_and_keep_file_order() -> None:
    full = glue("rte")
    a = load_task("rte", GLUE, max_train_samples=100, max_eval_samples=50, seed=3)
    b = load_task("rte", GLUE, max_train_samples=100, max_eval_samples=50, seed=3)
    c = load_task("rte", GLUE, max_train_samples=100, max_eval_samples=50, seed=4)
    assert a == b
    assert (len(a.train), len(a.dev)) == (100, 50)
    assert a.train != c.train and a.dev != c.dev
    positions = [full.train.index(e) for e in a.train]
    assert positions == sorted(positions)
    # Each split has its own stream: the eval limit never changes the train subset.
    assert load_task("rte", GLUE, max_train_samples=100, max_eval_samples=10, seed=3).train == a.train
    # A limit at or above the split size keeps everything.
    assert load_task("rte", GLUE, max_eval_samples=10_000).dev == full.dev


def test_task_table() -> None:
    assert set(TASKS) == {"sst2", "mrpc", "rte", "cola", "stsb", "qnli", "csv"}
    assert TASKS["mrpc"].metric_names == ("f1", "accuracy") and TASKS["mrpc"].main_metric == "f1"
    assert TASKS["stsb"].main_metric == "pearson" and TASKS["stsb"].is_regression
    assert TASKS["cola"].main_metric == "matthews_correlation"
    assert TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert TASKS["sst2"].label_names == ("negative", "positive") and TASKS["sst2"].num_labels == 2
    with pytest.raises(ValueError, match="main_metric"):
        TaskSpec("x", ("a", "b"), False, ("accuracy",), "f1")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        load_task("mnli", tmp_path)
    with pytest.raises(ValueError, match="max_train_samples"):
        load_task("sst2", tmp_path, max_train_samples=0)


# ---------------------------------------------------------------- DataError on small GLUE-format files


def sst2_dir(tmp_path: Path, train: str, dev: str = "sentence\tlabel\ngood\t1\n") -> Path:
    write(tmp_path, "train.tsv", train)
    write(tmp_path, "dev.tsv", dev)
    return tmp_path


def raises_at(
    where: str, match: str | None = None
) -> AbstractContextManager[pytest.ExceptionInfo[DataError]]:
    """DataError whose message names ``where`` (e.g. "/tmp/x/train.tsv:3")."""
    return pytest.raises(DataError, match=re.escape(where) + (".*" + match if match else ""))


def test_missing_train_file(tmp_path: Path) -> None:
    write(tmp_path, "dev.tsv", "sentence\tlabel\ngood\t1\n")
    with raises_at(f"{tmp_path / 'train.tsv'}", "file not found"):
        load_task("sst2", tmp_path)


def test_missing_data_dir(tmp_path: Path) -> None:
    with raises_at(f"{tmp_path / 'nope'}", "not found"):
        load_task("sst2", tmp_path / "nope")


def test_missing_column(tmp_path: Path) -> None:
    sst2_dir(tmp_path, "sentence\tstars\ngood\t1\n")
    with raises_at(f"{tmp_path / 'train.tsv'}:2", "missing column 'label'"):
        load_task("sst2", tmp_path)


def test_missing_group_column(tmp_path: Path) -> None:
    sst2_dir(tmp_path, "sentence\tlabel\ngood\t1\n")
    with raises_at(f"{tmp_path / 'dev.tsv'}:2", "missing column 'domain'"):
        load_task("sst2", tmp_path, group_column="domain")


def test_empty_split(tmp_path: Path) -> None:
    sst2_dir(tmp_path, "sentence\tlabel\n")
    with raises_at(f"{tmp_path / 'train.tsv'}:1", "empty split"):
        load_task("sst2", tmp_path)


def test_unknown_glue_label(tmp_path: Path) -> None:
    sst2_dir(tmp_path, "sentence\tlabel\ngood\t1\nodd\t2\n")
    with raises_at(f"{tmp_path / 'train.tsv'}:3", "unknown label '2'"):
        load_task("sst2", tmp_path)


def test_wrong_number_of_fields(tmp_path: Path) -> None:
    sst2_dir(tmp_path, "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with raises_at(f"{tmp_path / 'train.tsv'}:3", "expected 2 fields"):
        load_task("sst2", tmp_path)


def test_non_numeric_score(tmp_path: Path) -> None:
    header = "index\tsentence1\tsentence2\tscore\n"
    write(tmp_path, "train.tsv", header + "0\ta\tb\t4.5\n1\tc\td\thigh\n")
    write(tmp_path, "dev.tsv", header + "0\ta\tb\t1.0\n")
    with raises_at(f"{tmp_path / 'train.tsv'}:3", "'high' in column 'score' is not a finite number"):
        load_task("stsb", tmp_path)


def test_empty_text(tmp_path: Path) -> None:
    sst2_dir(tmp_path, "sentence\tlabel\ngood\t1\n  \t0\n")
    with raises_at(f"{tmp_path / 'train.tsv'}:3", "empty text in column 'sentence'"):
        load_task("sst2", tmp_path)


def test_mrpc_bom_header_and_quotes(tmp_path: Path) -> None:
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(tmp_path, "train.tsv", header + '1\t1\t2\tHe said " hi .\tHe said hi .\n0\t3\t4\tA .\tB .\n')
    write(tmp_path, "dev.tsv", header + "0\t5\t6\tC .\tD .\n")
    data = load_task("mrpc", tmp_path)
    assert data.train[0] == Example('He said " hi .', "He said hi .", 1)


def test_qnli_without_train_needs_enough_rows(tmp_path: Path) -> None:
    write(tmp_path, "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tq?\ts.\tentailment\n")
    with raises_at(f"{tmp_path / 'dev.tsv'}", "needs more than 1000"):
        load_task("qnli", tmp_path)


# ---------------------------------------------------------------- --task csv: the user's own files


def test_csv_string_labels_sorted_and_pairs(tmp_path: Path) -> None:
    write(tmp_path, "train.csv", 'text,text_pair,label\n"a, quoted",b,pos\nc,d,neg\ne,f,neutral\n')
    write(tmp_path, "validation.csv", "text,text_pair,label\ng,h,neg\n")
    data = load_task("csv", tmp_path)
    assert data.spec.label_names == ("neg", "neutral", "pos")
    assert data.spec.metric_names == ("accuracy", "macro_f1") and not data.spec.is_regression
    assert data.train[0] == Example("a, quoted", "b", 2)
    assert data.dev == (Example("g", "h", 0),)


def test_jsonl_int_labels_in_numeric_order_with_groups(tmp_path: Path) -> None:
    rows = ['{"text": "a", "label": 10, "g": "x"}', '{"text": "b", "label": 2, "g": "y"}', ""]
    write(tmp_path, "train.jsonl", "\n".join(rows))
    write(tmp_path, "dev.jsonl", '{"text": "c", "label": "10", "g": "x"}\n')
    data = load_task("csv", tmp_path, group_column="g")
    assert data.spec.label_names == ("2", "10")
    assert data.train == (Example("a", None, 1, "x"), Example("b", None, 0, "y"))
    assert data.dev == (Example("c", None, 1, "x"),)


def test_tsv_float_labels_are_regression(tmp_path: Path) -> None:
    write(tmp_path, "train.tsv", "text\tlabel\na\t0.5\nb\t3\n")
    write(tmp_path, "dev.tsv", "text\tlabel\nc\t1.25\n")
    data = load_task("csv", tmp_path)
    assert data.spec.is_regression and data.spec.main_metric == "pearson"
    assert [e.label for e in data.train] == [0.5, 3.0]


def test_csv_dev_label_unseen_in_train(tmp_path: Path) -> None:
    write(tmp_path, "train.csv", "text,label\na,pos\nb,neg\n")
    write(tmp_path, "dev.csv", "text,label\nc,neg\nd,meh\n")
    with raises_at(f"{tmp_path / 'dev.csv'}:3", "unknown label 'meh'"):
        load_task("csv", tmp_path)


def test_csv_missing_group_column(tmp_path: Path) -> None:
    write(tmp_path, "train.csv", "text,label\na,pos\nb,neg\n")
    write(tmp_path, "dev.csv", "text,label\nc,neg\n")
    with raises_at(f"{tmp_path / 'train.csv'}:2", "missing column 'user'"):
        load_task("csv", tmp_path, group_column="user")


def test_csv_missing_dev_file(tmp_path: Path) -> None:
    write(tmp_path, "train.csv", "text,label\na,pos\nb,neg\n")
    with raises_at(f"{tmp_path / 'dev.csv'}", "file not found"):
        load_task("csv", tmp_path)


def test_csv_ambiguous_split(tmp_path: Path) -> None:
    write(tmp_path, "train.csv", "text,label\na,pos\nb,neg\n")
    write(tmp_path, "train.jsonl", '{"text": "a", "label": "pos"}\n')
    with raises_at(f"{tmp_path / 'train.jsonl'}", "ambiguous"):
        load_task("csv", tmp_path)


def test_csv_single_class(tmp_path: Path) -> None:
    write(tmp_path, "train.csv", "text,label\na,pos\nb,pos\n")
    write(tmp_path, "dev.csv", "text,label\nc,pos\n")
    with raises_at(f"{tmp_path / 'train.csv'}:2", "at least two classes"):
        load_task("csv", tmp_path)


def test_jsonl_invalid_json(tmp_path: Path) -> None:
    write(tmp_path, "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    write(tmp_path, "dev.jsonl", '{"text": "c", "label": 1}\n')
    with raises_at(f"{tmp_path / 'train.jsonl'}:2", "invalid JSON"):
        load_task("csv", tmp_path)


def test_jsonl_empty_label(tmp_path: Path) -> None:
    write(tmp_path, "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": " "}\n')
    write(tmp_path, "dev.jsonl", '{"text": "c", "label": 1}\n')
    with raises_at(f"{tmp_path / 'train.jsonl'}:2", "empty label"):
        load_task("csv", tmp_path)


def test_csv_needs_data_dir() -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_task("csv", None)


# ---------------------------------------------------------------- no data_dir: Hugging Face datasets


def test_without_datasets_says_what_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as info:
        load_task("rte", None)
    message = str(info.value)
    assert "`datasets` package is not installed" in message
    assert "RTE/train.tsv" in message and "--data-dir DIR" in message and "dev.tsv" in message


def test_offline_datasets_says_what_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(path: str, name: str) -> None:
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"Couldn't reach.*--data-dir DIR") as info:
        load_task("sst2", None)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_datasets_rows_become_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "train": [{"sentence1": "a", "sentence2": "b", "label": 4.2, "idx": 0}],
        "validation": [{"sentence1": "c", "sentence2": "d", "label": 1.0, "idx": 0}],
    }
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda path, name: fake))
    data = load_task("stsb", None)
    assert data.train == (Example("a", "b", 4.2),) and data.dev == (Example("c", "d", 1.0),)
    fake["train"] = [{"sentence": "x", "label": -1, "idx": 0}]  # GLUE's unlabeled test rows use -1
    with raises_at("hub:glue/sst2/train:1", "unknown label '-1'"):
        load_task("sst2", None)

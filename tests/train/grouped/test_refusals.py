"""What grouped training refuses, naming the column, the groups or the option, and writing nothing: bad
groupings, group options without --group-column, adapter names outside the store's rule, and options the
slot tables do not support (refused by GroupedArgs itself, with the message `verakit train` prints)."""

from __future__ import annotations

import pytest

from train.grouped.test_recipe import write_grouped_task
from verakit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


BAD_GROUPS = {
    # case -> (groups written to the customer column, extra flags, message that must appear in stderr)
    "missing column": (None, [], "train.csv:2: missing column 'customer'"),
    "name collision": (["acme corp", "acme/corp", "b"], [], "groups 'acme corp' and 'acme/corp' of column 'customer' "
                       "both become adapter name 'acme_corp'"),
    "case collision": (["Acme", "acme", "b"], [], "groups 'Acme' and 'acme' of column 'customer' become adapter "
                       "names 'Acme' and 'acme', which differ only in case"),
    "too many groups": (["a", "b", "c"], ["--max-groups", "2"], "column 'customer' has 3 distinct groups, more than "
                        "--max-groups 2"),
    "too few rows": (["a", "b", "c"], ["--min-group-examples", "11"], "3 group(s) in column 'customer' have fewer "
                     "than --min-group-examples 11 training rows: 'a' (10), 'b' (10), 'c' (10)"),
    "not vera": (["a", "b"], ["--method", "lora"], "--method lora is not supported"),
}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
def test_bad_groupings_name_the_column_and_groups_and_write_nothing(tmp_path, capsys, tiny_bert_dir, case):
    groups, flags, message = BAD_GROUPS[case]
    data_dir = write_grouped_task(tmp_path / "data", groups or ["x"], 30, 6)
    if groups is None:  # drop the column
        for split in ("train", "dev"):
            path = data_dir / f"{split}.csv"
            path.write_text("\n".join(line.rsplit(",", 1)[0] for line in path.read_text().splitlines()) + "\n")
    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(data_dir), "--out", str(run_dir), "--model", tiny_bert_dir,
               "--group-column", "customer", "--quiet", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert not run_dir.exists()


def test_group_options_need_a_group_column(tmp_path, capsys, tiny_bert_dir, tiny_task):
    rc = main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(tmp_path / "run"),
               "--model", tiny_bert_dir, "--shared-head"])
    assert rc == 2
    assert "--shared-head, --max-groups and --min-group-examples need --group-column" in capsys.readouterr().err


def test_adapter_names_follow_the_serve_store_rule():
    from verakit.serve.store import NAME_PATTERN
    from verakit.train.grouped import adapter_name

    cases = {"acme corp": "acme_corp", "café/ü": "caf___", ".hidden": "_hidden", "..": "_.", "a-b.c_D9": "a-b.c_D9"}
    for group, name in cases.items():
        assert adapter_name(group) == name and NAME_PATTERN.fullmatch(name)
    assert adapter_name("x" * 300) == "x" * 128


def test_grouped_training_refuses_bf16_adapter_products_in_the_library(capsys):
    """The CLI refused --adapter-compute-dtype bf16 with --group-column; the library used to ignore it."""
    from verakit.train.classify import TrainArgs
    from verakit.train.grouped import GroupedArgs

    targs = TrainArgs(task="csv", data_dir=None, out="unused", adapter_compute_dtype="bf16")
    from verakit.cli import main

    message = "--adapter-compute-dtype is wired for classification tasks without --group-column only"
    with pytest.raises(ValueError) as refused:
        GroupedArgs(targs, "customer")
    assert str(refused.value) == message
    # The CLI no longer checks it: the library's error is what `verakit train` prints, before any data is read.
    assert main(["train", "--task", "csv", "--data-dir", "/nonexistent", "--out", "/nonexistent/run",
                 "--group-column", "customer", "--adapter-compute-dtype", "bf16"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"verakit train: error: {message}")
    GroupedArgs(TrainArgs(task="csv", data_dir=None, out="unused"), "customer")  # fp32 is fine


def test_no_dev_row_in_a_trained_group_is_refused_before_run_dir(tmp_path, capsys, tiny_bert_dir):
    """docs/grouped.md "Bad input": dev rows that all belong to untrained groups leave no adapter to evaluate."""
    data_dir = write_grouped_task(tmp_path / "data", ["a", "b"], 30, 6)
    dev = data_dir / "dev.csv"
    lines = dev.read_text().splitlines()
    dev.write_text("\n".join([lines[0], *(line.rsplit(",", 1)[0] + ",zzz" for line in lines[1:])]) + "\n")
    run_dir = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--data-dir", str(data_dir), "--out", str(run_dir), "--model", tiny_bert_dir,
               "--group-column", "customer", "--quiet"])
    assert rc == 2
    assert (f"{data_dir} (dev split): no dev row belongs to a trained group of column 'customer', so no adapter "
            "could be evaluated") in capsys.readouterr().err
    assert not run_dir.exists()

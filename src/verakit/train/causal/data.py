"""Which prompt/completion examples a causal-LM task trains and evaluates on.

`load_causal_data(task, data_dir, ...)` returns (train, eval) lists of `LMExample` for the three tasks
of `verakit train`: E2E NLG (its official train/dev/test CSVs), Alpaca-style instructions (a seeded
held-out split of one JSON list) and the user's JSONL (train.jsonl + dev.jsonl, or a seeded split of one
file). Parsing and validation live in `lm_data`; errors name the file and line at fault.
"""

from __future__ import annotations

import random
from pathlib import Path

from .lm_data import LMExample, load_e2e, load_instruct, load_jsonl

__all__ = ["CAUSAL_TASKS", "load_causal_data"]

CAUSAL_TASKS = ("e2e", "instruct", "jsonl")


def load_causal_data(
    task: str,
    data_dir: str,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    held_out: float = 0.1,
    eval_split: str = "dev",
) -> tuple[list[LMExample], list[LMExample]]:
    """(train, eval) examples of `task`, each a seeded random subset (in file order) when a max is given.

    e2e: `data_dir` holds trainset.csv, devset.csv and testset_w_refs.csv; eval examples are one per
    meaning representation with all its references; `eval_split="test"` evaluates on the test set.
    instruct: `data_dir` is the Alpaca JSON file, or a folder holding exactly one .json file; the
    held-out part is `held_out` of it, chosen by `seed`.
    jsonl: a folder with train.jsonl and dev.jsonl, or one .jsonl file (or a folder holding one) split
    like instruct.
    """
    if eval_split not in ("dev", "test") or (eval_split == "test" and task != "e2e"):
        raise ValueError(f"eval_split {eval_split!r}: only e2e has a test split; use 'dev' (the held-out part)")
    if task == "e2e":
        train = load_e2e(data_dir, "train", max_train_samples, seed)
        return train, load_e2e(data_dir, eval_split, max_eval_samples, seed)  # type: ignore[arg-type]
    if task == "instruct":
        path = _data_file(data_dir, ".json", task)
        return (load_instruct(path, "train", held_out, seed, max_train_samples),
                load_instruct(path, "test", held_out, seed, max_eval_samples))
    if task != "jsonl":
        raise ValueError(f"unknown causal-LM task {task!r}; choose one of {', '.join(CAUSAL_TASKS)}")
    folder = Path(data_dir)
    if folder.is_dir() and (folder / "train.jsonl").is_file():
        train, dev = load_jsonl(folder / "train.jsonl"), load_jsonl(folder / "dev.jsonl")
    else:
        path = _data_file(data_dir, ".jsonl", task)
        examples = load_jsonl(path)
        # the range first: round() of a NaN fraction raises "cannot convert float NaN to integer"
        if not 0 < held_out < 1 or (n_dev := max(1, round(len(examples) * held_out))) >= len(examples):
            raise ValueError(f"{path}: held_out={held_out} leaves no train or no dev examples out of {len(examples)}")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        dev_idx = set(order[:n_dev])
        train = [e for i, e in enumerate(examples) if i not in dev_idx]
        dev = [e for i, e in enumerate(examples) if i in dev_idx]
    return _subset(train, max_train_samples, seed), _subset(dev, max_eval_samples, seed)


def _data_file(data_dir: str, suffix: str, task: str) -> Path:
    """`data_dir` itself when it is a file, else the one `*suffix` file in that folder."""
    path = Path(data_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such {task} data file or folder")
    found = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix == suffix)
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected exactly one *{suffix} file for task {task}, found {found}")
    return path / found[0]


def _subset(examples: list[LMExample], n: int | None, seed: int) -> list[LMExample]:
    """A seeded random subset of `n` examples in file order (all of them when n is None)."""
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ValueError(f"max samples must be >= 1 or None, got {n}")
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]

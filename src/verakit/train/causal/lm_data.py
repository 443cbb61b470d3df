"""Prompt/completion data for causal-LM fine-tuning: loaders, tokenization with loss masks, collation.

Loaders return :class:`LMExample` lists from three sources:

* E2E NLG (``trainset.csv`` / ``devset.csv`` / ``testset_w_refs.csv``, header ``mr,ref``). The prompt
  is the meaning representation followed by a newline, ``"{mr}\\n"``; the completion is a reference.
* Alpaca-style JSON (a list of ``{instruction, input, output}``). The prompt is ``"{instruction}\\n"``,
  or ``"{instruction}\\n\\n{input}\\n"`` when ``input`` is not empty; the completion is ``output``.
* The user's JSONL, one ``{"prompt": ..., "completion": ...}`` object a line.

Prompts are plain text on purpose, so one example serves a base model and an instruct model alike.
:func:`tokenize_examples` and :func:`prompt_ids` decide how a prompt reaches the model: as is, or
(``use_chat_template=True``) rendered by the tokenizer's chat template as one user message with
``add_generation_prompt=True``, the completion then being the assistant's reply. The encoding itself is
:mod:`verakit.prompting`'s, the one `verakit generate` and `verakit serve` use too.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ...prompting import end_token_ids, prompt_token_ids

__all__ = [
    "E2E_FILES",
    "IGNORE_INDEX",
    "LMDataError",
    "LMExample",
    "collate_lm",
    "load_e2e",
    "load_instruct",
    "load_jsonl",
    "prompt_ids",
    "tokenize_examples",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF causal-LM losses) skip
E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}


class LMDataError(ValueError):
    """Unusable training data; the message names the file and the line or index at fault."""


@dataclass(frozen=True, slots=True)  # slots: E2E train alone is 42k of these
class LMExample:
    prompt: str  # text the model conditions on; never trained on
    completion: str  # text the loss is computed on (followed by EOS / end-of-turn)
    references: tuple[str, ...] = ()  # every reference for evaluation (E2E dev/test: all refs of the MR)


# ----------------------------------------------------------------------------------------- loaders


def load_e2e(
    data_dir: str | Path,
    split: Literal["train", "dev", "test"],
    max_samples: int | None = None,
    seed: int = 0,
) -> list[LMExample]:
    """E2E NLG examples from ``data_dir`` (the folder holding the three official CSVs).

    ``train`` gives one example per ``(mr, ref)`` row. ``dev`` and ``test`` give one example per
    distinct MR, in order of first appearance, with ``references`` = all its refs and
    ``completion`` = the first. ``max_samples`` keeps a seeded random subset, in file order.
    """
    if split not in E2E_FILES:
        raise ValueError(f"load_e2e: split must be one of {sorted(E2E_FILES)}, got {split!r}")
    path = Path(data_dir) / E2E_FILES[split]
    rows = _read_e2e_csv(path)
    if split == "train":
        examples = [LMExample(prompt=f"{mr}\n", completion=ref) for mr, ref in rows]
    else:
        refs_by_mr: dict[str, list[str]] = {}  # dicts keep insertion order: first appearance
        for mr, ref in rows:
            refs_by_mr.setdefault(mr, []).append(ref)
        examples = [
            LMExample(prompt=f"{mr}\n", completion=refs[0], references=tuple(refs))
            for mr, refs in refs_by_mr.items()
        ]
    return _subsample(examples, max_samples, seed)


def _read_e2e_csv(path: Path) -> list[tuple[str, str]]:
    _check_file(path)
    rows: list[tuple[str, str]] = []
    # utf-8-sig: tolerate a BOM before the header, as some exports add one.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise LMDataError(f"{path}: empty file, expected a header 'mr,ref' and rows")
            if [h.strip() for h in header] != ["mr", "ref"]:
                raise LMDataError(f"{path}:1: header must be 'mr,ref', got {','.join(header)!r}")
            for row in reader:
                line = reader.line_num  # physical line where this record ends (refs may span lines)
                if not row:
                    continue
                if len(row) != 2:
                    raise LMDataError(f"{path}:{line}: bad CSV row, expected 2 fields (mr, ref), got {len(row)}")
                mr, ref = row[0].strip(), row[1].strip()
                if not mr:
                    raise LMDataError(f"{path}:{line}: empty 'mr' field")
                if not ref:
                    raise LMDataError(f"{path}:{line}: empty completion ('ref' field)")
                rows.append((mr, ref))
        except csv.Error as exc:
            raise LMDataError(f"{path}:{reader.line_num}: bad CSV: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise LMDataError(f"{path}: not UTF-8 text ({exc})") from exc
    if not rows:
        raise LMDataError(f"{path}: empty file, no data rows after the header")
    return rows


def load_instruct(
    path: str | Path,
    split: Literal["train", "test"],
    held_out: float | int = 0.1,
    seed: int = 0,
    max_samples: int | None = None,
) -> list[LMExample]:
    """Alpaca-format examples, split by a seeded shuffle into train and a held-out test part.

    Examples with an empty ``output`` are dropped with a logged warning naming their indices
    (Alpaca has a few); a missing key, a non-string field or an empty ``instruction`` is an error.

    ``held_out`` is a fraction in (0, 1) or a count of examples. The split depends only on the
    file and ``seed``, so ``"train"`` and ``"test"`` never overlap. ``max_samples`` keeps a seeded
    random subset of the split, in file order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_instruct: split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    items = _read_json_list(path)
    parsed = [_alpaca_example(path, i, item) for i, item in enumerate(items)]
    # Alpaca itself ships examples with an empty output (2 of the 5,000 in shared/data): nothing to
    # learn from, and refusing the whole file for them would make the standard data set unusable.
    empty = [i for i, ex in enumerate(parsed) if ex is None]
    if empty:
        log.warning("%s: dropped %d example(s) with an empty 'output' at index %s", path, len(empty), empty)
    examples = [ex for ex in parsed if ex is not None]
    if not examples:
        raise LMDataError(f"{path}: every example has an empty completion ('output' field)")
    n_test = _held_out_count(held_out, len(examples), path)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = sorted(order[:n_test] if split == "test" else order[n_test:])
    return _subsample([examples[i] for i in chosen], max_samples, seed)


def _read_json_list(path: Path) -> list[Any]:
    _check_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise LMDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise LMDataError(f"{path}: not UTF-8 text ({exc})") from exc
    if not isinstance(data, list):
        raise LMDataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    if not data:
        raise LMDataError(f"{path}: empty file, the JSON list has no examples")
    return data


def _alpaca_example(path: Path, index: int, item: Any) -> LMExample | None:
    """The example at ``index``, or None when its output is empty (the caller drops those)."""
    where = f"{path}[{index}]"
    if not isinstance(item, dict):
        raise LMDataError(f"{where}: expected an object, got {type(item).__name__}")
    missing = [k for k in ("instruction", "output") if k not in item]
    if missing:
        raise LMDataError(f"{where}: missing key(s) {missing}; need 'instruction' and 'output' ('input' optional)")
    fields = {k: item.get(k, "") for k in ("instruction", "input", "output")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise LMDataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    instruction, extra, output = (fields[k].strip() for k in ("instruction", "input", "output"))
    if not instruction:
        raise LMDataError(f"{where}: empty 'instruction'")
    if not output:
        return None
    prompt = f"{instruction}\n\n{extra}\n" if extra else f"{instruction}\n"
    return LMExample(prompt=prompt, completion=output)


def _held_out_count(held_out: float | int, n: int, path: Path) -> int:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise ValueError(f"held_out must be a fraction in (0, 1) or a count, got {held_out!r}")
    if isinstance(held_out, float):
        if not 0.0 < held_out < 1.0:
            raise ValueError(f"held_out fraction must be in (0, 1), got {held_out}")
        count = max(1, round(n * held_out))
    else:
        count = held_out
    if not 1 <= count < n:
        raise ValueError(f"held_out={held_out!r} leaves no train or no test examples out of {n} in {path}")
    return count


def load_jsonl(path: str | Path) -> list[LMExample]:
    """The user's JSONL: one ``{"prompt", "completion"}`` object per line (blank lines skipped).

    An optional ``"references"`` list of strings is kept for evaluation. ``prompt`` may be empty
    (plain language modelling); ``completion`` may not.
    """
    path = Path(path)
    _check_file(path)
    examples: list[LMExample] = []
    unused: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise LMDataError(f"{path}: not UTF-8 text ({exc})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LMDataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
        if not isinstance(item, dict):
            raise LMDataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = [k for k in ("prompt", "completion") if k not in item]
        if missing:
            raise LMDataError(f"{where}: missing key(s) {missing}; each line needs 'prompt' and 'completion'")
        prompt, completion = item["prompt"], item["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise LMDataError(f"{where}: 'prompt' and 'completion' must be strings")
        if not completion.strip():
            raise LMDataError(f"{where}: empty completion")
        refs = item.get("references", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise LMDataError(f"{where}: 'references' must be a list of strings")
        examples.append(LMExample(prompt=prompt, completion=completion, references=tuple(refs)))
        unused.update(str(k) for k in item if k not in _JSONL_KEYS)
    if not examples:
        raise LMDataError(f"{path}: empty file, no JSON lines")
    if unused:  # a misspelt key ("reference", "system") would be dropped without a word
        log.warning("%s: key(s) %s not used (the jsonl task reads %s)", path, ", ".join(map(repr, sorted(unused))),
                    ", ".join(_JSONL_KEYS))
    return examples


_JSONL_KEYS = ("prompt", "completion", "references")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise LMDataError(f"{path}: no such file")


def _subsample(examples: list[LMExample], max_samples: int | None, seed: int) -> list[LMExample]:
    if max_samples is None or max_samples >= len(examples):
        return examples
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_samples))
    return [examples[i] for i in keep]


# ------------------------------------------------------------------------------------ tokenization


def tokenize_examples(
    tokenizer: Any, examples: Sequence[LMExample], max_length: int, use_chat_template: bool
) -> list[dict[str, list[int]]]:
    """Tokenize prompt + completion + end marker, with labels only on the completion.

    Each result has ``input_ids``, ``attention_mask`` and ``labels`` (lists of equal length, no
    padding yet). ``labels`` is ``IGNORE_INDEX`` on prompt tokens and equals ``input_ids`` on the
    completion and its end marker (EOS, or the chat template's end-of-turn tokens). Prompt and
    completion are tokenized separately so the boundary is exact.

    When the sum exceeds ``max_length``, the completion keeps ``max(max_length - len(prompt),
    max_length // 2)`` tokens at most, cut from its right (end marker first), so it always keeps
    at least half the budget; the prompt gets the rest, cut from its left, since its end (the
    generation prompt, the last part of the MR) is what the completion follows from.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to hold a prompt and a completion token, got {max_length}")
    end = end_token_ids(tokenizer, use_chat_template)
    out: list[dict[str, list[int]]] = []
    for ex in examples:
        prompt = prompt_token_ids(tokenizer, ex.prompt, use_chat_template)
        completion = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + end
        if len(prompt) + len(completion) > max_length:
            keep_completion = min(len(completion), max(max_length - len(prompt), max_length // 2))
            completion = completion[:keep_completion]
            keep_prompt = max_length - keep_completion
            prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt else []
        ids = prompt + completion
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * len(prompt) + completion,
            }
        )
    return out


def collate_lm(batch: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch from :func:`tokenize_examples` to its longest row.

    Padding gets ``pad_token_id`` in ``input_ids``, 0 in ``attention_mask`` and ``IGNORE_INDEX`` in
    ``labels``, so padded positions never reach the loss. Returns ``(B, T)`` int64 tensors.
    """
    if not batch:
        raise ValueError("collate_lm: empty batch")
    width = max(len(row["input_ids"]) for row in batch)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {
        key: torch.tensor([row[key] + [value] * (width - len(row[key])) for row in batch], dtype=torch.long)
        for key, value in fill.items()
    }  # each (B, T)


def prompt_ids(
    tokenizer: Any,
    prompts: Sequence[str | LMExample],
    use_chat_template: bool,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for ``model.generate``, encoded exactly as in training.

    Left padding puts every prompt's last token in the last column, where generation continues.
    ``max_length`` cuts long prompts from the left, as :func:`tokenize_examples` does. The pad id is
    the tokenizer's pad token, else its EOS (the attention mask hides it either way). Returns
    ``input_ids`` and ``attention_mask``, ``(B, T)`` int64.
    """
    if not prompts:
        raise ValueError("prompt_ids: no prompts")
    if max_length is not None and max_length < 1:
        raise ValueError(f"prompt_ids: max_length must be >= 1 or None, got {max_length}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither pad_token_id nor eos_token_id")
    rows = []
    for p in prompts:
        ids = prompt_token_ids(tokenizer, p.prompt if isinstance(p, LMExample) else p, use_chat_template)
        rows.append(ids[-max_length:] if max_length is not None else ids)
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long),
    }  # each (B, T)

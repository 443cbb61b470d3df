"""Text generation for evaluation and quick use: greedy or beam search through `transformers.generate`.

Prompts are encoded exactly as in training (`lm_data.prompt_ids`: plain text, or the tokenizer's chat
template), left-padded so that every row's last prompt token sits in the last column, and generation
stops at the end marker training appended to completions (EOS, or the template's end-of-turn token).

Semantics: generate_texts(prompts)[i] = decode(argmax/beam continuation of prompt i), the same text
whether prompt i is generated alone or in a batch (up to float rounding of padded attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...prompting import prompt_format, recorded_prompt_info, stop_token_ids
from .data import CAUSAL_TASKS
from .lm_data import LMExample, prompt_ids

__all__ = ["DecodeConfig", "generate_ids", "generate_texts", "generate_with_artifact"]


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode. Greedy when num_beams == 1; never sampled, so results are reproducible."""

    max_new_tokens: int = 64  # tokens generated per prompt at most (the end marker included)
    num_beams: int = 1  # 1: greedy; > 1: beam search keeping the best beam
    batch_size: int = 16  # prompts per generate call
    max_prompt_length: int | None = None  # prompts cut from the left to this many tokens (None: no cut)
    length_penalty: float = 1.0  # beam search only: score = logprob / length ** length_penalty
    no_repeat_ngram_size: int = 0  # > 0 forbids repeating any n-gram of this size (0: off)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DecodeConfig.{name} must be an integer >= 1, got {v!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"DecodeConfig.max_prompt_length must be >= 1 or None, got {self.max_prompt_length!r}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"DecodeConfig.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size!r}")


def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | LMExample],
    *,
    use_chat_template: bool,
    config: DecodeConfig | None = None,
) -> list[list[int]]:
    """The generated token ids of each prompt, cut before the first stop token (see
    `verakit.prompting.stop_token_ids`).

    Prompts are batched by token length (less padding), and results come back in the input order.
    `model` is used as is: put it in eval mode, on its device, with or without an adapter.
    """
    if not prompts:
        raise ValueError("generate_texts: no prompts")
    config = config or DecodeConfig()
    stops = stop_token_ids(tokenizer, use_chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    # One tokenization pass decides the order; each batch is then encoded again with its own padding.
    lengths = [prompt_ids(tokenizer, [p], use_chat_template, config.max_prompt_length)["input_ids"].shape[1]
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        enc = prompt_ids(tokenizer, [prompts[i] for i in idx], use_chat_template, config.max_prompt_length)
        width = enc["input_ids"].shape[1]
        with torch.no_grad():
            seqs = model.generate(  # (b, width + new)
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=config.max_new_tokens,
                num_beams=config.num_beams,
                do_sample=False,
                length_penalty=config.length_penalty,
                no_repeat_ngram_size=config.no_repeat_ngram_size,
                eos_token_id=stops,
                pad_token_id=pad,
                # Plain greedy / beam search: ignore sampling defaults a model's generation_config may carry.
                temperature=None,
                top_p=None,
                top_k=None,
            )
        for row, i in enumerate(idx):
            new = seqs[row, width:].tolist()
            out[i] = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
    return out


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | LMExample],
    *,
    use_chat_template: bool,
    config: DecodeConfig | None = None,
) -> list[str]:
    """`generate_ids` decoded: special tokens dropped, surrounding whitespace stripped."""
    ids = generate_ids(model, tokenizer, prompts, use_chat_template=use_chat_template, config=config)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def generate_with_artifact(
    adapter: str | Path | None,
    prompts: Sequence[str],
    *,
    model: str | None = None,
    chat_template: bool | None = None,
    config: DecodeConfig | None = None,
    check_base: bool = True,
) -> list[str]:
    """Generations for `prompts` of a trained artifact (vera file, LoRA folder, full-model tensors), or of
    the base model alone when `adapter` is None.

    The base model defaults to the one the artifact was trained on (SmolLM2-135M-Instruct when none),
    the chat template setting to the one it was trained with (for a bare model: whether its tokenizer
    has a template). E2E and instruct prompts get the newline their loaders end every prompt with.
    """
    from ..artifacts import ArtifactError, load_artifact, read_artifact_info, warn_other_base
    from .model import build_causal_lm

    info = read_artifact_info(adapter) if adapter is not None else {}
    task = info.get("task")
    if task is not None and task not in CAUSAL_TASKS:  # say so before loading a base model it cannot attach to
        raise ArtifactError(f"{adapter}: a {task!r} adapter, not a causal-LM one: generate takes adapters trained "
                         f"with --task {' / '.join(CAUSAL_TASKS)} (score this one with verakit eval)")
    if adapter is not None:
        warn_other_base(adapter, info, model, "smollm2")
    base, tokenizer = build_causal_lm(model or info.get("model"))
    trained = (load_artifact(adapter, base, check_base) if adapter is not None else base).eval()
    recorded = info if adapter is not None else recorded_prompt_info(base.config)  # a merged folder's record
    fmt = prompt_format(recorded, bool(tokenizer.chat_template), chat_template)  # the rule `verakit serve` follows too
    texts = [fmt.text(p) for p in prompts]
    return generate_texts(trained, tokenizer, texts, use_chat_template=fmt.chat_template, config=config)

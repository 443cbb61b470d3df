"""Text generation for a batch whose rows have their own prompt, sampling settings, limits and stops.

One `transformers` `generate` call runs the whole batch (the caller sets the bank's per-row slots around
it; rows stay fixed, so the KV cache is per row as usual). What differs per row is handled here:

* `RowSampling`, a logits processor: greedy rows (temperature 0) keep only the argmax; the other rows
  are divided by their temperature and cut to their top-p nucleus; the batch then samples once.
* `RowStops`, a stopping criterion: per-row max_tokens, stop strings, stop tokens and EOS; it also decodes each row's
  new text as it grows and streams it to the row's sink, holding back text that may begin a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["GenRow", "GenResult", "RowSampling", "RowStops", "generate_rows"]


@dataclass(frozen=True)
class GenRow:
    """One sequence to generate."""

    prompt: tuple[int, ...]  # token ids, special tokens included
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text is cut before the first occurrence of any of these
    sink: Callable[[str], None] | None = None  # receives text deltas as they become final (streaming)
    stop_ids: tuple[int, ...] = ()  # tokens that end this row like EOS (e.g. the chat template's end of turn)
    cancelled: Callable[[], bool] | None = None  # true once nobody reads the row (client gone): it stops there


@dataclass(frozen=True)
class GenResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "cancelled" (GenRow.cancelled)
    tokens: int  # tokens generated, EOS / stop token excluded


class RowSampling:
    """Semantics: per row i, scores -> argmax-only if t_i == 0, else top-p_i nucleus of scores / t_i.

    A `transformers` LogitsProcessor (duck-typed: `__call__(input_ids, scores) -> scores`). Used with
    do_sample=True and no other warpers, so greedy rows are deterministic within a sampled batch.
    """

    def __init__(self, temperature: torch.Tensor, top_p: torch.Tensor) -> None:
        self.temperature, self.top_p = temperature, top_p  # [B] float32 each

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = self.temperature.to(scores.device)
        greedy = t == 0
        scaled = scores / torch.where(greedy, torch.ones_like(t), t).unsqueeze(1)  # (B, V)
        sorted_scores, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the mass of the tokens ranked above it already reaches top_p (the first stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p.to(scores.device).unsqueeze(1)
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
        if bool(greedy.any()):
            only_top = torch.full_like(scores, float("-inf")).scatter(1, scores.argmax(dim=-1, keepdim=True), 0.0)
            scaled = torch.where(greedy.unsqueeze(1), only_top, scaled)
        return scaled


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may still become part of a stop string or a UTF-8 character."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    while n < len(text) and text[len(text) - 1 - n] == "\ufffd":  # an incomplete multi-byte character
        n += 1
    return n


class RowStops:
    """Per-row stopping and streaming; a `transformers` StoppingCriteria returning a [B] bool tensor."""

    def __init__(self, tokenizer: Any, rows: Sequence[GenRow], prompt_len: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer, self.rows, self.prompt_len = tokenizer, rows, prompt_len
        self.eos = set(eos_ids)
        self.results: list[GenResult | None] = [None] * len(rows)
        self._sent = [0] * len(rows)  # characters already streamed per row

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :].tolist()
        for i, row in enumerate(self.rows):
            if self.results[i] is None:
                self._step(i, row, new[i])
        return torch.tensor([r is not None for r in self.results], device=input_ids.device)

    def _step(self, i: int, row: GenRow, tokens: list[int]) -> None:
        if row.cancelled is not None and row.cancelled():
            self.results[i] = GenResult("", "cancelled", len(tokens))
            return
        eos = bool(tokens) and (tokens[-1] in self.eos or tokens[-1] in row.stop_ids)
        if eos:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [p for p in (text.find(s) for s in row.stop) if p >= 0]
        reason = None
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        elif eos:
            reason = "stop"
        elif len(tokens) >= row.max_tokens:
            reason = "length"
        if row.sink is not None:
            final = len(text) if reason else len(text) - _held_back(text, row.stop)
            if final > self._sent[i]:
                row.sink(text[self._sent[i] : final])
                self._sent[i] = final
        if reason:
            self.results[i] = GenResult(text, reason, len(tokens))

    def finish(self, input_ids: torch.Tensor) -> list[GenResult]:
        """Results for every row; rows the loop ended without a verdict end with "length"."""
        new = input_ids[:, self.prompt_len :].tolist()
        for i, row in enumerate(self.rows):
            if self.results[i] is None:
                self._step(i, replace(row, max_tokens=0), new[i])
        return [r for r in self.results if r is not None]


def generate_rows(model: Any, tokenizer: Any, rows: Sequence[GenRow]) -> list[GenResult]:
    """Generate every row in one left-padded `model.generate` call. The caller sets per-row adapters."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)  # (B, T), left padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt) :] = 1
    eos = model.generation_config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if not eos_ids and tokenizer.eos_token_id is not None:
        eos_ids = [tokenizer.eos_token_id]
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max(r.max_tokens for r in rows),
        pad_token_id=pad, eos_token_id=eos_ids or None, bos_token_id=model.generation_config.bos_token_id,
    )
    stops = RowStops(tokenizer, rows, width, eos_ids)
    sampling = RowSampling(
        torch.tensor([r.temperature for r in rows], dtype=torch.float32),
        torch.tensor([r.top_p for r in rows], dtype=torch.float32),
    )
    dev = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config,
        logits_processor=LogitsProcessorList([sampling]), stopping_criteria=StoppingCriteriaList([stops]),
    )
    return stops.finish(out)

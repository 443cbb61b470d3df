"""Completion and chat prompts for the server: token ids in the format an adapter was trained with
(`verakit.prompting`, the rule training and `verakit generate` follow), or raw, checked against the input
and context limits, with the token ids that end the completion as training ended it.

Semantics: encode(text, max_tokens, fmt).ids == fmt.token_ids(tokenizer, text) (fmt None: tokenizer(text)),
refused with InputError when empty, over max_input_tokens, or when ids + max_tokens exceed the context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..prompting import PromptFormat, prompt_format, stop_token_ids

__all__ = ["EncodedPrompt", "InputError", "PromptEncoder"]


class InputError(ValueError):
    """A request is well-formed JSON but asks for something out of bounds (HTTP 422)."""


@dataclass(frozen=True)
class EncodedPrompt:
    ids: tuple[int, ...]  # what the model reads, special tokens included
    stop_ids: tuple[int, ...]  # tokens that end the completion as training ended it (beyond the model's EOS)


class PromptEncoder:
    """Encodes prompts with one tokenizer; reads nothing but what it was built with, so request threads share it
    (the engine warms the fast tokenizer up before they start)."""

    def __init__(self, tokenizer: Any, max_input_tokens: int, context: int, base_name: str, generate: bool) -> None:
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.context = context  # prompt + completion tokens the model can attend over
        self.base_name = base_name  # how errors name the base model
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._stop_ids: dict[bool, tuple[int, ...]] = {}  # chat template used -> stop ids (generation models only)
        if generate:
            for chat in (False, True) if self.has_chat_template else (False,):
                self._stop_ids[chat] = tuple(stop_token_ids(tokenizer, chat))

    def format(self, run_info: Mapping[str, Any]) -> PromptFormat:
        """The format recorded in an adapter's run info ({} for the base model)."""
        return prompt_format(run_info, self.has_chat_template)

    def encode(self, text: str, max_tokens: int, fmt: PromptFormat | None) -> EncodedPrompt:
        """A completion prompt in format `fmt` (None: raw, the text as sent, BOS as the tokenizer adds it)."""
        if fmt is None:
            return self._checked(self.tokenizer(text, truncation=False)["input_ids"], max_tokens, ())
        try:
            ids = fmt.token_ids(self.tokenizer, text)
        except ValueError as e:  # the adapter wants a chat template this tokenizer lacks
            raise InputError(str(e)) from None
        return self._checked(ids, max_tokens, self._stop_ids[fmt.chat_template])

    def encode_chat(self, messages: list[dict[str, str]], max_tokens: int, fmt: PromptFormat | None,
                    adapter: str | None) -> EncodedPrompt:
        """A conversation: the tokenizer's chat template over `messages` (raw, or an adapter trained with it);
        for an adapter trained on plain prompts, one user message encoded as its completion prompt would be."""
        if fmt is not None and not fmt.chat_template:
            if len(messages) != 1 or messages[0]["role"] != "user":
                who = (f"adapter {adapter!r} reads plain-text prompts (it was trained without a chat template)"
                       if adapter is not None else f"the base model {self.base_name!r} has no chat template")
                raise InputError(f"{who}: send one user message, use /v1/completions, or set \"raw\": true to "
                                 "apply the tokenizer's chat template anyway")
            return self.encode(messages[0]["content"], max_tokens, fmt)
        text = self.chat_text(messages)
        return self._checked(self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"], max_tokens,
                             self._stop_ids[True])

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """`messages` rendered by the tokenizer's chat template, ending with the assistant's generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"the model {self.base_name!r} has no chat template; use /v1/completions")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _checked(self, ids: Sequence[int], max_tokens: int, stop_ids: tuple[int, ...]) -> EncodedPrompt:
        if not ids:
            raise InputError("the prompt is empty after tokenization")
        if len(ids) > self.max_input_tokens:
            raise InputError(f"the prompt has {len(ids)} tokens; the limit is {self.max_input_tokens}")
        if len(ids) + max_tokens > self.context:
            raise InputError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the context of {self.context}")
        return EncodedPrompt(tuple(ids), stop_ids)

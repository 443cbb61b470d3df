"""How a causal-LM prompt reaches the model: the one rule shared by training, `verakit generate` and
`verakit serve`, so that a prompt sent to a trained adapter is encoded exactly as its training prompts were.

Semantics, for a prompt `p` and a format `f = prompt_format(run_info, tokenizer has a template)`:

    f.chat_template False: ids = tokenizer(p + "\\n" if f.newline and not p.endswith("\\n") else p)   (BOS as the
                           tokenizer adds it)
    f.chat_template True:  ids = tokenizer(template([{"role": "user", "content": p.rstrip()}], generation prompt),
                           no special tokens added: the template wrote them)
    a completion ends at end_token_ids(tokenizer, f.chat_template): the template's end-of-turn marker, else EOS.

`run_info` is what `verakit train` stores with an artifact (the adapter file's `extra`): its "task" decides
the newline (the E2E and instruct loaders end every training prompt with one, so a user's prompt gets it
too), its "chat_template" whether the template is used; without a record (a bare base model, an adapter
saved by hand) the template is used when the tokenizer has one. A folder written by `verakit merge` carries
its adapter's record in its config (`PROMPT_CONFIG_KEY`, read by `recorded_prompt_info`), so the merged model
alone is prompted as the adapter was.

Depends on nothing but the tokenizer object it is given (no transformers import), so training and serving,
which never import each other, can both use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NEWLINE_TASKS",
    "PROMPT_CONFIG_KEY",
    "PromptFormat",
    "end_token_ids",
    "prompt_format",
    "prompt_record",
    "prompt_token_ids",
    "recorded_prompt_info",
    "require_chat_template",
    "stop_token_ids",
]

NEWLINE_TASKS = ("e2e", "instruct")  # training tasks whose loaders end every prompt with "\n"
PROMPT_CONFIG_KEY = "verakit_prompt"  # config.json entry of a merged causal LM: {"task", "chat_template"}
_PROMPT_KEYS = ("task", "chat_template")  # the run info prompt_format reads


@dataclass(frozen=True)
class PromptFormat:
    """How one artifact's prompts are encoded."""

    chat_template: bool  # the prompt is one user message rendered by the tokenizer's chat template
    newline: bool  # plain prompts end with "\n" (appended when missing)

    def text(self, prompt: str) -> str:
        """The prompt with the newline this format wants (the chat template strips it again)."""
        return prompt + "\n" if self.newline and not prompt.endswith("\n") else prompt

    def token_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """Token ids of `prompt` in this format (see the module's Semantics)."""
        return prompt_token_ids(tokenizer, self.text(prompt), self.chat_template)


def prompt_format(run_info: Mapping[str, Any], has_chat_template: bool, chat_template: bool | None = None) -> PromptFormat:
    """The format recorded in an artifact's run info ({} for the base model alone).

    `chat_template` overrides the record (a `--chat-template` flag); without either, the template is used
    when the tokenizer has one.
    """
    if chat_template is None:
        chat_template = bool(run_info["chat_template"]) if "chat_template" in run_info else has_chat_template
    return PromptFormat(chat_template=bool(chat_template), newline=run_info.get("task") in NEWLINE_TASKS)


def recorded_prompt_info(config: Any) -> dict[str, Any]:
    """The prompt record a merged model's config carries (`PROMPT_CONFIG_KEY`), as run info; {} without one
    (any other base model, which is then prompted as a bare model)."""
    record = getattr(config, PROMPT_CONFIG_KEY, None)
    return prompt_record(record) if isinstance(record, dict) else {}


def prompt_record(run_info: Mapping[str, Any]) -> dict[str, Any]:
    """What a merged folder records of an adapter's run info (`PROMPT_CONFIG_KEY`)."""
    return {k: run_info[k] for k in _PROMPT_KEYS if k in run_info}


def require_chat_template(tokenizer: Any) -> None:
    """ValueError naming the tokenizer when it has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"use_chat_template=True but tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} "
            "has no chat_template; pass use_chat_template=False for a base model"
        )


def prompt_token_ids(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of the prompt as given (no newline rule): the one encoding shared by training and generation."""
    if not use_chat_template:
        # add_special_tokens: a BOS where the tokenizer wants one (Llama), nothing where it does not.
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    require_chat_template(tokenizer)
    # The trailing newline only separates prompt from completion in plain text; the template has its own.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.rstrip()}], add_generation_prompt=True, tokenize=False
    )
    # The template already wrote every special token; adding them again would double the BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_token_ids(tokenizer: Any, use_chat_template: bool) -> list[int]:
    """What closes a completion in training: the chat template's end-of-turn marker, else EOS."""
    if use_chat_template:
        require_chat_template(tokenizer)
        sentinel = "@@VERAKIT-SENTINEL@@"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        if sentinel in text:
            # Whatever the template writes after the reply, minus trailing newlines (e.g. "<|im_end|>").
            suffix = text.split(sentinel, 1)[1].rstrip()
            ids = list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else []
            if ids:
                return ids
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id to end completions with")
    return [tokenizer.eos_token_id]


def stop_token_ids(tokenizer: Any, use_chat_template: bool) -> list[int]:
    """Token ids that end a generation: the first token of training's end marker, and EOS."""
    ids = [end_token_ids(tokenizer, use_chat_template)[0]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids

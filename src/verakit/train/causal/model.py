"""The causal LM a run trains or an artifact loads into: built in fp32 with a tokenizer that pads, and
transformers' own gradient checkpointing. Both the recipe and generation build it here."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...recompute import enable_gradient_checkpointing  # core (verakit plan uses it too); re-exported here

__all__ = ["build_causal_lm", "enable_gradient_checkpointing"]


def build_causal_lm(model_name: str | None) -> tuple[nn.Module, Any]:
    """(fp32 AutoModelForCausalLM, its tokenizer with a pad id); None: SmolLM2-135M-Instruct, offline."""
    import transformers
    from transformers import AutoModelForCausalLM

    from ...models import load_tokenizer, resolve_model

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: noise before a result or an error line
    path = resolve_model(model_name, "causal-lm")
    tokenizer = load_tokenizer(path)  # first: a folder without one is refused before the weights load
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token_id is None:  # GPT-2: pad with EOS; the attention mask and -100 labels hide it
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer



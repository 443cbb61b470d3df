"""The `case` fixture: a BERT (real MiniLM), a GPT-2 (Conv1D) and a Llama (mixed shapes)."""

from __future__ import annotations

import warnings

import pytest
import torch

from interop.cases import Case
from verakit import VeraConfig


@pytest.fixture(params=["bert", "gpt2", "llama"])
def case(request) -> Case:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="peft")
    g = torch.Generator().manual_seed(0)
    if request.param == "bert":
        base = request.getfixturevalue("minilm_clf")
        return Case("bert", base, torch.randint(0, 1000, (2, 12), generator=g), ["query", "value"],
                    VeraConfig(r=16, seed=3), "SEQ_CLS")
    if request.param == "gpt2":
        base = request.getfixturevalue("tiny_gpt2")
        return Case("gpt2", base, torch.randint(0, 97, (2, 9), generator=g), ["c_attn", "c_proj"],
                    VeraConfig(r=8, target_modules=("c_attn", "c_proj"), seed=3), None)
    base = request.getfixturevalue("tiny_llama")
    return Case("llama", base, torch.randint(0, 101, (2, 9), generator=g), "all-linear",
                VeraConfig(r=8, target_modules="all-linear", seed=3), "CAUSAL_LM")

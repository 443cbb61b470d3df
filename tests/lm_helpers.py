"""Tiny causal-LM folders for the generation and causal-LM tests: a byte-level BPE tokenizer trained in
milliseconds on a small corpus (with a chat template), a random Llama or GPT-2 sized to it, and a small
prompt/completion data set that a VeRA adapter can learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

NAMES = ["Aromi", "Bibimbap", "Cotto", "Fitzbillies", "Giraffe", "Loch Fyne", "Strada", "Zizzi"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese"]
AREAS = ["city centre", "riverside"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def e2e_like(n: int, seed: int = 0) -> list[dict[str, str]]:
    """E2E-style prompt/completion pairs whose completion is a fixed function of the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, food, area = rng.choice(NAMES), rng.choice(FOODS), rng.choice(AREAS)
        rows.append({"prompt": f"name[{name}], food[{food}], area[{area}]\n",
                     "completion": f"{name} serves {food} food in the {area}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_tokenizer():
    """A byte-level BPE (vocab 400) with BOS/EOS/pad and a ChatML-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [r["prompt"] + r["completion"] for r in e2e_like(400, seed=1)] + ["Give three tips for staying healthy."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_lm(folder: Path, arch: str = "llama", seed: int = 0) -> str:
    """Save a random tiny causal LM ("llama": GQA, q 64x64 / v 32x64; "gpt2": Conv1D c_attn) with the tokenizer.

    initializer_range 0.2 (not 0.02): peakier logits, so greedy decoding does not just repeat one token."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                          initializer_range=0.2, **ids)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tokenizer), n_positions=128,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, **ids)
        model = GPT2LMHeadModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

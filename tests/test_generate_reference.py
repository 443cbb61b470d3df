"""`verakit generate` against decoding written here, independent of verakit's generation code: a greedy loop
over the adapted model's logits, and transformers' own beam search. (tests/train/causal compares the CLI with
the library function it calls; this file checks that function's answers from outside.)"""

from __future__ import annotations

import json

import pytest
import torch

from verakit import VeraConfig, attach, load_adapter, save_adapter
from verakit.cli import main

PROMPTS = ["name[The Eagle], food[French]", "area[riverside]"]


@pytest.fixture
def adapted(tmp_path):
    from transformers import AutoModelForCausalLM

    from lm_helpers import save_tiny_lm

    base_dir = save_tiny_lm(tmp_path / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    attach(model, VeraConfig(r=16, seed=3, target_modules=("q_proj", "v_proj", "down_proj")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a visible adapter: b random instead of zero, so the adapter changes the text
        for name, p in model.named_parameters():
            if name.endswith("vera_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    return str(base_dir), str(path)


def _reference_model(base_dir: str, adapter: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter:
        load_adapter(model, adapter)
    return model, AutoTokenizer.from_pretrained(base_dir)


def _greedy(model, tok, prompt: str, max_new: int) -> str:
    ids = tok(prompt)["input_ids"]  # plain prompt: no template, no newline (a hand-saved adapter records no task)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()  # the CLI strips surrounding whitespace (documented)


def _cli(base_dir: str, adapter: str | None, capsys, *extra: str) -> list[str]:
    args = ["generate", "--model", base_dir, "--no-chat-template", "--max-new-tokens", "8", "--json", *extra]
    args += ["--adapter", adapter] if adapter else []
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    return [row["generation"] for row in json.loads(capsys.readouterr().out)]


def test_greedy_generations_equal_a_decode_loop_written_here(adapted, capsys):
    base_dir, adapter = adapted
    model, tok = _reference_model(base_dir, adapter)
    want = [_greedy(model, tok, p, 8) for p in PROMPTS]
    assert _cli(base_dir, adapter, capsys) == want
    base_model, _ = _reference_model(base_dir, None)
    plain = [_greedy(base_model, tok, p, 8) for p in PROMPTS]
    assert _cli(base_dir, None, capsys) == plain
    assert want != plain  # the adapter is visible in the text, so the comparison above says something


def test_beam_search_equals_transformers_generate(adapted, capsys):
    base_dir, adapter = adapted
    model, tok = _reference_model(base_dir, adapter)
    want = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, do_sample=False, max_new_tokens=8,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             early_stopping=True, length_penalty=1.0)
        want.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert _cli(base_dir, adapter, capsys, "--num-beams", "2") == want

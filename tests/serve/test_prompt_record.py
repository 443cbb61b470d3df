"""A folder written by `verakit merge` from a causal adapter is served as the adapter was trained to be
prompted: its config records the adapter's prompt format (prompting.PROMPT_CONFIG_KEY)."""

from __future__ import annotations

from dataclasses import replace

import torch

from serve.cases import trained_adapter, write_model
from serve.test_base_head import _client
from verakit import VeraConfig
from verakit.fileformat import write_adapter
from verakit.prompting import PromptFormat


def test_the_merged_base_keeps_its_adapters_prompt_format(tmp_path):
    from transformers import AutoModelForCausalLM

    from verakit.merge import merge_pretrained
    from verakit.serve.options import ServeOptions

    torch.set_num_threads(1)
    model_dir, adapter_dir = write_model(tmp_path, "llama", "llama", {})
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = replace(trained_adapter(base, VeraConfig(r=4), seed=0, std=1.0),
                      extra={"task": "e2e", "chat_template": False})
    write_adapter(adapter, tmp_path / "e2e.safetensors")
    merged = merge_pretrained(str(model_dir), tmp_path / "e2e.safetensors", tmp_path / "merged")

    formats, answers = {}, {}
    for name, folder, served in (("base", model_dir, None), ("merged", merged, None), ("adapter", model_dir, "e2e")):
        if served:
            write_adapter(adapter, adapter_dir / "e2e.safetensors")
        engine, client = _client(ServeOptions(model=str(folder), adapters=str(adapter_dir), threads=1, max_wait_ms=0,
                                              task="generate"))
        try:
            formats[name] = engine.prompt_format(served)
            with client:
                body = {"model": served or folder.name, "prompt": "name[Aromi]", "max_tokens": 6, "temperature": 0}
                answers[name] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        finally:
            engine.close()
    assert formats["base"] == PromptFormat(chat_template=True, newline=False)  # a bare model with a template
    assert formats["merged"] == formats["adapter"] == PromptFormat(chat_template=False, newline=True)
    assert answers["merged"] == answers["adapter"]  # the merged model alone answers as base + adapter

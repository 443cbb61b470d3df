"""PEFT VeRA and LoRA export hold plain (d_out, d_in) deltas: adapters of torch convolutions and embedding
tables are refused with an error naming the module and its kind, and nothing is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import verakit
from verakit.fileformat import AdapterError
from verakit.interop import to_lora, to_peft


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)


@pytest.mark.parametrize("target,kind", [("conv", "conv"), ("emb", "embedding")])
def test_conv_and_embedding_adapters_are_refused_by_peft_and_lora_export(tmp_path, target, kind):
    torch.manual_seed(0)
    model = verakit.attach(_Net(), verakit.VeraConfig(r=4, target_modules=("proj", target)))
    path = tmp_path / "a.safetensors"
    verakit.save_adapter(model, path)
    adapter = verakit.read_adapter(path)
    for export, name in ((to_peft, "PEFT VeRA"), (to_lora, "LoRA")):
        out = tmp_path / f"out-{name}"
        with pytest.raises(AdapterError, match=rf"module '{target}' is a {kind} layer .*; {name} export handles "
                                               "linear layers only"):
            export(adapter, out)
        assert not out.exists()


def test_linear_only_adapters_still_export(tmp_path):
    model = verakit.attach(_Net(), verakit.VeraConfig(r=4, target_modules=("proj",)))
    verakit.save_adapter(model, tmp_path / "a.safetensors")
    adapter = verakit.read_adapter(tmp_path / "a.safetensors")
    assert (to_peft(adapter, tmp_path / "peft") / "adapter_config.json").is_file()
    to_lora(adapter, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()


def test_dvora_adapters_are_refused_by_peft_and_lora_export(tmp_path):
    """PEFT VeRA has no magnitude vector; DVoRA's change to W0 rescales every row, so it is not low rank."""
    import dataclasses

    from verakit.interop import vera_factors

    model = verakit.attach(_Net(), verakit.VeraConfig(r=4, target_modules=("proj",)))
    verakit.save_adapter(model, tmp_path / "a.safetensors")
    plain = verakit.read_adapter(tmp_path / "a.safetensors")
    adapter = dataclasses.replace(plain, config=plain.config.replace(magnitude=True))
    for export, name, why in ((to_peft, "PEFT VeRA", "no magnitude vector"), (to_lora, "LoRA", "not low rank")):
        out = tmp_path / f"out-{name}"
        with pytest.raises(AdapterError, match=rf"DVoRA adapter .* cannot be exported to {name}: .*{why}"):
            export(adapter, out)
        assert not out.exists()
    with pytest.raises(AdapterError, match="not low rank"):
        vera_factors(adapter)

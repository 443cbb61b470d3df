"""PEFT VeRA and LoRA export hold plain (d_out, d_in) deltas: adapters of torch convolutions and embedding
tables are refused with an error naming the module and its kind, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import verakit
from helpers import randomize_vectors
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
    """A linear-only adapter of the same model exports to both: PEFT VeRA carries this adapter's own
    vectors, and the written LoRA factors multiply to exactly the VeRA delta of the live layer."""
    torch.manual_seed(0)
    model = verakit.attach(_Net(), verakit.VeraConfig(r=4, target_modules=("proj",)))
    randomize_vectors(model)  # b starts at zero: a zero delta would match any export
    layer = verakit.vera_layers(model)["proj"]
    A, B = layer.slices(torch.device("cpu"), torch.float64)
    d, b = layer.vera_d.detach().double(), layer.vera_b.detach().double()
    delta = b[:, None] * (B @ (layer.scale * d[:, None] * A))  # the naive VeRA formula, float64
    assert delta.abs().max() > 1e-2
    verakit.save_adapter(model, tmp_path / "a.safetensors")
    adapter = verakit.read_adapter(tmp_path / "a.safetensors")

    peft_dir = to_peft(adapter, tmp_path / "peft")
    peft_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "VERA" and peft_cfg["target_modules"] == ["proj"]
    peft_tensors = load_file(peft_dir / "adapter_model.safetensors")
    torch.testing.assert_close(peft_tensors["base_model.model.proj.vera_lambda_b"].double(), b, atol=0, rtol=0)
    torch.testing.assert_close(peft_tensors["base_model.model.proj.vera_lambda_d"].double(), layer.scale * d,
                               atol=1e-7, rtol=1e-6)

    export = to_lora(adapter, tmp_path / "lora")
    assert export.exact and export.max_rel_error == 0.0 and export.rank == 4
    lora_cfg = json.loads((export.path / "adapter_config.json").read_text())
    assert lora_cfg["peft_type"] == "LORA" and lora_cfg["target_modules"] == ["proj"]
    assert lora_cfg["r"] == lora_cfg["lora_alpha"] == 4  # PEFT scaling alpha / r = 1: the delta is B @ A
    lora = load_file(export.path / "adapter_model.safetensors")
    lora_a, lora_b = lora["base_model.model.proj.lora_A.weight"], lora["base_model.model.proj.lora_B.weight"]
    assert lora_a.shape == (4, 8) and lora_b.shape == (8, 4)
    torch.testing.assert_close(lora_b.double() @ lora_a.double(), delta, atol=1e-6, rtol=0)


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

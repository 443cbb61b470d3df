"""VeRA -> LoRA export: exact closed form (logits equal PEFT LoRA's) and SVD truncation above max_rank."""

import json

import pytest
import torch
from safetensors.torch import load_file

from interop.cases import ATOL, randomize_trainable
from verakit import AdapterError, VeraConfig, attach
from verakit.fileformat import adapter_from_model
from verakit.interop import lora_factors, to_lora, vera_factors
from verakit.interop.lora import EXACT_TOL
from verakit.merge import adapter_deltas


def _lora_model(case, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(case.fresh(), path).eval()


def test_lora_export_logits_equal(case, tmp_path):
    model = attach(case.fresh(), case.config)
    randomize_trainable(model)
    want = case.logits(model)
    adapter = adapter_from_model(model)
    export = to_lora(adapter, tmp_path / "lora")
    assert export.exact and export.rank == case.config.r and export.max_rel_error == 0.0
    assert (case.logits(_lora_model(case, export.path)) - want).abs().max() <= ATOL
    cfg = json.loads((export.path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == case.config.r
    tensors = load_file(export.path / "adapter_model.safetensors")
    lora_keys = [k for k in tensors if ".lora_" in k]
    assert len(lora_keys) == 2 * len(adapter.modules)
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora_keys)


def test_factors_multiply_to_the_merge_delta(tiny_llama):
    model = attach(tiny_llama, VeraConfig(r=8, target_modules="all-linear"))
    randomize_trainable(model)
    adapter = adapter_from_model(model)
    deltas = adapter_deltas(adapter)
    factors = vera_factors(adapter)
    for name, (fa, fb) in factors.items():
        d_out, d_in, _ = adapter.modules[name]
        assert fa.shape == (8, d_in) and fb.shape == (d_out, 8)
        assert torch.allclose(fb @ fa, deltas[name], atol=1e-7)
    exact = lora_factors(adapter)
    assert all(torch.equal(exact.factors[n][0], factors[n][0]) for n in factors)


def test_truncation_reports_the_true_relative_error(tiny_llama, tmp_path):
    # r = 48 on 64/96-wide layers: rank 48 deltas, cut to 16
    model = attach(tiny_llama, VeraConfig(r=48, target_modules="all-linear"))
    randomize_trainable(model)
    adapter = adapter_from_model(model)
    export = to_lora(adapter, tmp_path / "lora16", max_rank=16)
    assert not export.exact and export.rank == 16
    deltas = adapter_deltas(adapter)
    for name, (lora_a, lora_b) in export.factors.items():
        delta = deltas[name].double()
        approx = lora_b.double() @ lora_a.double()
        true_err = float((delta - approx).norm() / delta.norm())
        assert abs(export.rel_errors[name] - true_err) < 1e-5
        # Eckart-Young: the SVD of the dense delta gives the same optimum
        s = torch.linalg.svdvals(delta)
        assert abs(true_err - float(s[16:].norm() / s.norm())) < 1e-6
    assert 0.1 < export.max_rel_error < 1.0
    cfg = json.loads((export.path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 16


def test_truncation_is_exact_when_layers_fit(tiny_gpt2, tmp_path):
    from peft import PeftModel

    # r = 48 > max_rank = 32 = n_embd: every layer's delta has rank <= 32, so nothing is lost, and the
    # export says so (it used to report exact=False with an error of 0)
    model = attach(tiny_gpt2, VeraConfig(r=48, target_modules=("c_attn", "c_proj")))
    randomize_trainable(model)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = model(x).logits
    base = type(tiny_gpt2)(tiny_gpt2.config).eval()
    base.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "vera_" not in k})
    export = to_lora(adapter_from_model(model), tmp_path / "lora", max_rank=32)
    assert export.exact and export.max_rel_error <= EXACT_TOL and set(export.ranks.values()) == {32}
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, export.path).eval()(x).logits
    assert (got - want).abs().max() <= ATOL


def test_default_rank_is_capped_at_the_layer_width_and_stays_exact(minilm_clf, tmp_path):
    # r = 1024 on 384 x 384 layers: the delta has rank <= 384, so rank 1024 factors (the old default) are waste
    model = attach(minilm_clf, VeraConfig(r=1024))
    randomize_trainable(model)
    adapter = adapter_from_model(model)
    export = to_lora(adapter, tmp_path / "lora")
    assert export.rank == 384 and set(export.ranks.values()) == {384}
    assert export.exact and export.max_rel_error <= EXACT_TOL
    deltas = adapter_deltas(adapter)
    for name, (lora_a, lora_b) in export.factors.items():
        assert lora_a.shape == (384, 384) and lora_b.shape == (384, 384)
        delta = deltas[name].double()
        assert float((lora_b.double() @ lora_a.double() - delta).norm() / delta.norm()) < 1e-5, name
    cfg = json.loads((export.path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 384 and cfg["rank_pattern"] == {}
    tensors = load_file(export.path / "adapter_model.safetensors")
    assert max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")) == 384
    # below the true rank the export is lossy, and says so
    cut = to_lora(adapter, tmp_path / "cut", max_rank=100)
    assert not cut.exact and cut.max_rel_error > 0.1 and set(cut.ranks.values()) == {100}


def test_per_layer_ranks_load_in_peft_with_scaling_one(tiny_llama, tmp_path):
    from peft import PeftModel

    # grouped KV heads: q_proj is 64 x 64 (rank min(48, 64) = 48), v_proj 32 x 64 (rank 32)
    base = type(tiny_llama)(tiny_llama.config).eval()
    base.load_state_dict(tiny_llama.state_dict())
    model = attach(tiny_llama, VeraConfig(r=48, target_modules=("q_proj", "v_proj")))
    randomize_trainable(model)
    x = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        want = model(x).logits
    export = to_lora(adapter_from_model(model), tmp_path / "lora")
    assert export.exact and export.rank == 48
    assert {n: k for n, k in export.ranks.items() if k != 48} == {f"model.layers.{i}.self_attn.v_proj": 32 for i in (0, 1)}
    cfg = json.loads((export.path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 48 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert len(cfg["rank_pattern"]) == 2 and set(cfg["rank_pattern"].values()) == {32}
    with torch.no_grad():
        lora = PeftModel.from_pretrained(base, export.path).eval()
        assert lora.base_model.model.model.layers[1].self_attn.v_proj.scaling["default"] == 1.0
        assert (lora(x).logits - want).abs().max() <= ATOL


def test_bad_max_rank(tiny_llama, tmp_path):
    adapter = adapter_from_model(attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj",))))
    with pytest.raises(AdapterError, match="max_rank must be >= 1, got 0"):
        to_lora(adapter, tmp_path / "x", max_rank=0)


def test_unique_projections_export_to_lora(tiny_llama, tmp_path):
    from peft import PeftModel

    base = type(tiny_llama)(tiny_llama.config).eval()
    base.load_state_dict(tiny_llama.state_dict())
    model = attach(tiny_llama, VeraConfig(r=8, target_modules=("q_proj", "v_proj"), projection_sharing="unique"))
    randomize_trainable(model)
    x = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        want = model(x).logits
        export = to_lora(adapter_from_model(model), tmp_path / "lora")
        got = PeftModel.from_pretrained(base, export.path).eval()(x).logits
    assert export.exact and (got - want).abs().max() <= ATOL

"""verakit.plan and `verakit plan`: hand-computed bytes on a tiny Llama, parameter counts equal to the real
models', the traced activations equal to a real run's saved tensors, CLI output and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from verakit.cli import main
from verakit.plan import PlanError, plan, quantized_linear_bytes

# 2 layers, hidden 64, 4 heads of 16 with 2 KV heads (k, v are 32 x 64), MLP 96, vocab 101, untied lm_head.
TINY = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 101, "max_position_embeddings": 512,
        "tie_word_embeddings": False}
# Per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 96x64, down 64x96, two norms of 64.
LINEARS = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)] * 2
TINY_PARAMS = 101 * 64 + 2 * (sum(o * i for o, i in LINEARS[:7]) + 2 * 64) + 64 + 101 * 64  # 74,688


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _real_tiny():
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


def test_param_counts_equal_the_real_models(tiny_cfg):
    assert TINY_PARAMS == 74_688
    assert plan(tiny_cfg, methods=("full",), precision="4bit").params == TINY_PARAMS
    assert sum(p.numel() for p in _real_tiny().parameters()) == TINY_PARAMS
    # the public shapes: numbers their model cards give (Llama-2-7B 6.74B, Llama-3-8B 8.03B, Mistral-7B 7.24B)
    expect = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
              "smollm2-135m": 134_515_008, "roberta-base": 124_647_170}
    for name, n in expect.items():
        assert plan(name, methods=("full",), precision="4bit").params == n, name


def test_golden_bytes_tiny_llama(tiny_cfg):
    p = plan(tiny_cfg, r=16, lora_r=8, batch_size=2, seq_len=8)
    vera, lora, full = p.methods
    assert p.target_modules == ("q_proj", "v_proj")
    assert vera.base_weights == lora.base_weights == full.base_weights == 4 * TINY_PARAMS
    # VeRA: d (r) and b (d_out) on q and v of both layers; one shared A (16 x 64) and B (64 x 16) in fp32
    assert vera.trainable_params == 2 * ((16 + 64) + (16 + 32))
    assert vera.projections == 4 * 16 * (64 + 64)
    assert vera.trainable_state == 16 * vera.trainable_params  # fp32 parameter, gradient, two moments
    # LoRA: r (d_in + d_out) per adapted layer
    assert lora.trainable_params == 2 * (8 * (64 + 64) + 8 * (64 + 32)) and lora.projections == 0
    assert full.trainable_params == TINY_PARAMS and full.trainable_state == 3 * 4 * TINY_PARAMS
    # the loss's transient: fp32 logits (2 x 8 x 101) gradient and log-softmax gradient
    logits = 2 * 8 * 101
    for m in (vera, lora):
        assert m.transient == 8 * logits
        assert m.total == m.base_weights + m.projections + 12 * m.trainable_params + m.activations + 8 * logits
    assert full.total == max(4 * TINY_PARAMS * 3 + full.activations + 8 * logits, 4 * TINY_PARAMS * 5)
    # activations grow with the tokens, checkpointing keeps fewer
    big = plan(tiny_cfg, methods=("vera",), r=16, batch_size=4, seq_len=8).methods[0]
    ckpt = plan(tiny_cfg, methods=("vera",), r=16, batch_size=2, seq_len=8, checkpointing=True).methods[0]
    assert big.activations > vera.activations > ckpt.activations > 0


def test_quantized_bytes_match_bitsandbytes_storage(tiny_cfg):
    """4-bit: ceil(n/2) packed + n/64 uint8 absmax + nested fp32 absmax per 256 blocks + 273 fp32 constants."""
    assert quantized_linear_bytes(64, 64, "4bit") == 2048 + 64 + 4 * 1 + 4 * 273
    assert quantized_linear_bytes(96, 64, "8bit") == 96 * 64 + 4 * 96
    quantized = sum(quantized_linear_bytes(o, i, "4bit") for o, i in LINEARS)
    other = TINY_PARAMS - sum(o * i for o, i in LINEARS)  # embeddings, norms, lm_head stay fp32
    q4 = plan(tiny_cfg, methods=("vera", "full"), precision="4bit", r=16, batch_size=2, seq_len=8)
    assert q4.methods[0].base_weights == quantized + 4 * other
    assert not q4.methods[1].supported and "cannot train 4bit" in q4.methods[1].note
    pytest.importorskip("bitsandbytes")
    from verakit.quant import quantize_linears

    model = quantize_linears(_real_tiny(), "4bit")
    stored = 0
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            qs = m.weight.quant_state
            parts = [m.weight, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            stored += sum(t.numel() * t.element_size() for t in parts)
    assert stored == quantized


def _real_saved_bytes(model, ids) -> int:
    """Bytes autograd saves in a real forward + loss (each storage once; weights and VeRA's shared tables,
    which the plan counts as projections, excluded)."""
    import torch.nn.functional as F

    from verakit import vera_layers

    tables = [t for ly in vera_layers(model).values() for t in (ly.projection.A, ly.projection.B)] if hasattr(
        model, "verakit_state") else []
    known = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers(), *tables]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in known:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return sum(seen.values())


@pytest.mark.parametrize("method", ["vera", "full"])
def test_traced_activations_equal_a_real_runs(tiny_cfg, method):
    from verakit import VeraConfig, attach

    torch.manual_seed(0)
    model = _real_tiny().train()
    if method == "vera":
        attach(model, VeraConfig(r=16))
    else:
        model.requires_grad_(True)
    ids = torch.randint(0, 101, (2, 8))
    planned = plan(tiny_cfg, methods=(method,), r=16, batch_size=2, seq_len=8).methods[0]
    assert planned.activations == _real_saved_bytes(model, ids)


def test_cli_text_and_json(tiny_cfg, capsys):
    args = ["plan", "--model", tiny_cfg, "--r", "16", "--batch-size", "2", "--seq-len", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "batch 2 x 8 tokens" in out and "VeRA r=16 and LoRA r=8 on q_proj,v_proj" in out
    row = next(line for line in out.splitlines() if line.startswith("trainable parameters"))
    assert row.split()[2:] == ["256", "3,584", "74,688"]
    assert main([*args, "--json", "--methods", "vera,lora", "--checkpointing"]) == 0
    got = json.loads(capsys.readouterr().out)
    expect = plan(tiny_cfg, methods=("vera", "lora"), r=16, batch_size=2, seq_len=8, checkpointing=True)
    assert got == json.loads(json.dumps(expect.to_dict()))
    assert [m["method"] for m in got["methods"]] == ["vera", "lora"] and got["checkpointing"] is True


@pytest.mark.parametrize(("extra", "message"), [
    (["--precision", "3bit"], "--precision '3bit': choose one of fp32, bf16, 8bit, 4bit"),
    (["--methods", "vera,dora"], "--methods 'vera,dora': choose from vera, lora, full"),
    (["--seq-len", "0"], "--seq-len must be an integer >= 1, got 0"),
    (["--seq-len", "513"], "--seq-len 513 exceeds the model's max_position_embeddings (512)"),
    (["--target-modules", "nope"], "--target-modules: target_modules ('nope',) matched no linear layer"),
    (["--precision", "bf16", "--compute-dtype", "fp32"], "--compute-dtype fp32 contradicts it"),
])
def test_cli_errors_name_the_option(tiny_cfg, capsys, extra, message):
    assert main(["plan", "--model", tiny_cfg, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("verakit plan: error: ") and message in err


def test_missing_or_bad_model(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "nope")]) == 2
    assert "neither a model folder, a config JSON file nor a preset (llama-2-7b" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "the folder has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{\"hidden_size\": 8}")
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "config.json has no model_type field" in capsys.readouterr().err
    with pytest.raises(PlanError, match="is not a JSON config"):
        (tmp_path / "config.json").write_text("{")
        plan(str(tmp_path))
    # Without its width the plan was of the config class's default model (LlamaConfig's: 6.7e9 parameters)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    with pytest.raises(PlanError, match="gives no hidden_size, so the plan would be of LlamaConfig's default sizes"):
        plan(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')  # its own name for the width
    with pytest.raises(PlanError, match="gives no hidden_size or n_embd"):
        plan(str(tmp_path))
    # An image model: no sequence-classification class; transformers' message lists every config class it
    # knows (hundreds of lines), only its first line is kept
    (tmp_path / "config.json").write_text('{"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, '
                                          '"num_attention_heads": 2, "intermediate_size": 64}')
    assert main(["plan", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model_type 'vit' has no causal-lm model in transformers (Unrecognized configuration class" in err
    assert len(err.strip().splitlines()) == 1, err


def test_presets_plan_a_7b_model_without_weights():
    p = plan("llama-2-7b", methods=("vera",), precision="4bit", batch_size=1, seq_len=16)
    m = p.methods[0]
    # 4-bit linears: about 0.516 bytes per weight; embeddings and lm_head (2 x 32000 x 4096) stay fp32
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert math.isclose(m.base_weights, linear * 0.5159 + 4 * (p.params - linear), rel_tol=1e-3)
    assert m.trainable_params == 32 * (2 * 1024 + 2 * 4096)


def test_presets_equal_the_installed_models_configs(minilm_path):
    """The minilm and smollm2-135m presets hold the shipped models' shape fields (smollm2: only when its
    converted folder is already cached; converting it takes half a minute)."""
    from verakit.models import default_cache_dir
    from verakit.plan import PRESETS

    folders = {"minilm": minilm_path, "smollm2-135m": default_cache_dir() / "smollm2-135m-instruct"}
    for name, folder in folders.items():
        config = Path(folder) / "config.json"
        if not config.is_file():
            continue
        real = json.loads(config.read_text())
        for key, value in PRESETS[name].items():
            assert real[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), (name, key)
        assert plan(str(folder), methods=("full",), precision="4bit").params == plan(
            name, methods=("full",), precision="4bit").params


def test_quantized_base_traces_the_factored_path(tiny_cfg):
    """Over a 4-bit base VeraLinear always takes the factored path, which keeps more per token than the
    materialized path it picks over a plain fp32 weight at 512 tokens: the plan follows the real run."""
    pytest.importorskip("bitsandbytes")
    from verakit import VeraConfig, attach, vera_layers
    from verakit.quant import quantize_linears

    torch.manual_seed(0)
    model = quantize_linears(_real_tiny().train(), "4bit")
    attach(model, VeraConfig(r=16))
    assert {ly.quantized for ly in vera_layers(model).values()} == {"4bit"}
    ids = torch.randint(0, 101, (2, 256))
    q4 = plan(tiny_cfg, methods=("vera",), precision="4bit", r=16, batch_size=2, seq_len=256).methods[0]
    fp32 = plan(tiny_cfg, methods=("vera",), r=16, batch_size=2, seq_len=256).methods[0]
    assert q4.activations == _real_saved_bytes(model, ids)
    assert q4.activations > fp32.activations


def test_dvora_plan_counts_magnitudes_and_the_row_norm_temporary(tiny_cfg, capsys):
    from verakit import VeraConfig, attach
    from verakit.cli import main

    plain = plan(tiny_cfg, methods=("vera", "lora"), r=16, batch_size=2, seq_len=8)
    dv = plan(tiny_cfg, methods=("vera", "lora"), r=16, batch_size=2, seq_len=8, magnitude=True)
    assert dv.magnitude and not plain.magnitude
    # m (d_out) on q (64) and v (32) of both layers, on top of d and b
    assert dv.methods[0].trainable_params == plain.methods[0].trainable_params + 2 * (64 + 32)
    # the delta and W0 + delta of the largest adapted layer (q: 64 x 64), fp32
    assert dv.methods[0].transient == plain.methods[0].transient + 8 * 64 * 64
    assert dv.methods[1] == plain.methods[1]  # LoRA has no magnitude
    # activations as a real DVoRA run saves them
    torch.manual_seed(0)
    model = _real_tiny().train()
    attach(model, VeraConfig(r=16, magnitude=True))
    assert dv.methods[0].activations == _real_saved_bytes(model, torch.randint(0, 101, (2, 8)))
    assert main(["plan", "--model", tiny_cfg, "--r", "16", "--magnitude", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["magnitude"] is True
    assert main(["plan", "--model", tiny_cfg, "--r", "16", "--magnitude"]) == 0
    assert "DVoRA (VeRA with magnitudes) r=16" in capsys.readouterr().out

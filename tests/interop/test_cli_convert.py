"""`verakit convert {from-peft,to-peft,to-lora}` and `verakit inspect` on PEFT VeRA and LoRA directories."""

import json

import pytest
import torch

from helpers import randomize_vectors
from verakit import VeraConfig, attach, load_adapter, read_adapter, save_adapter
from verakit.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_round_trip_through_the_cli(tiny_llama, tmp_path, capsys):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_llama.save_pretrained(base_dir)
    model = attach(type(tiny_llama)(tiny_llama.config).eval(), VeraConfig(r=8, target_modules="all-linear"))
    model.load_state_dict({k.replace(".weight", ".base.weight") if "proj" in k else k: v
                           for k, v in tiny_llama.state_dict().items()}, strict=False)
    randomize_vectors(model, std=0.1)
    x = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        want = model(x).logits
    src = tmp_path / "a.safetensors"
    save_adapter(model, src)

    code, out, _ = _run(capsys, "convert", "to-peft", src, tmp_path / "vera", "--model", base_dir)
    assert code == 0 and json.loads(out)["layers"] == 14
    code, out, _ = _run(capsys, "convert", "to-lora", src, tmp_path / "lora16", "--max-rank", "4")
    summary = json.loads(out)
    assert code == 0 and summary["rank"] == 4 and not summary["exact"] and 0 < summary["max_rel_error"] < 1
    code, out, _ = _run(capsys, "convert", "to-lora", src, tmp_path / "lora")
    assert code == 0 and json.loads(out)["exact"] is True

    # PEFT VeRA dir -> verakit file; base_model_name_or_path was recorded, so --model is optional
    code, out, _ = _run(capsys, "convert", "from-peft", tmp_path / "vera", tmp_path / "back.safetensors")
    assert code == 0 and json.loads(out)["projection_kind"] == "explicit"
    from verakit.interop.convert import convert  # the library call never replaces a stored adapter either

    stored = (tmp_path / "back.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="back.safetensors exists; convert from-peft writes a new file"):
        convert("from-peft", tmp_path / "vera", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == stored
    fresh = type(tiny_llama)(tiny_llama.config).eval()
    fresh.load_state_dict(tiny_llama.state_dict())
    with torch.no_grad():
        assert (load_adapter(fresh, tmp_path / "back.safetensors")(x).logits - want).abs().max() <= 1e-5
        lora = PeftModel.from_pretrained(type(tiny_llama).from_pretrained(base_dir).eval(), tmp_path / "lora")
        assert (lora(x).logits - want).abs().max() <= 1e-5

    code, out, _ = _run(capsys, "inspect", tmp_path / "back.safetensors")
    assert code == 0 and "kind=explicit" in out
    code, out, _ = _run(capsys, "inspect", tmp_path / "vera")
    assert code == 0 and "PEFT VeRA adapter directory" in out and "vera_A [8, 96], vera_B [96, 8]" in out
    code, out, _ = _run(capsys, "inspect", tmp_path / "lora16", "--json")
    info = json.loads(out)
    assert info["peft_type"] == "LORA" and info["r"] == 4 and info["scaling"] == 1.0 and info["layers"] == 14
    assert info["modules"]["model.layers.0.self_attn.v_proj"] == [32, 64]
    assert info["adapter_params"] == sum(4 * (o + i) for o, i in info["modules"].values())
    # to-peft writes full module names, which come back as the imported targets
    back = read_adapter(tmp_path / "back.safetensors")
    assert back.config.target_modules == tuple(sorted(back.modules)) and len(back.modules) == 14


def test_cli_errors_are_clean(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "convert", "from-peft", tmp_path / "empty", tmp_path / "x.safetensors")
    assert code == 2 and "missing adapter_config.json" in err and "Traceback" not in err
    code, _, err = _run(capsys, "inspect", tmp_path / "empty")
    assert code == 2 and "verakit inspect: error" in err
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "empty" / "adapter_model.bin").write_bytes(b"junk")
    code, _, err = _run(capsys, "inspect", tmp_path / "empty")
    assert code == 2 and "adapter_model.bin: unreadable" in err


def test_to_lora_reports_per_layer_ranks_and_exactness_truthfully(tiny_llama, tmp_path, capsys):
    # q_proj 64 x 64, v_proj 32 x 64 (grouped KV heads); r = 48, so the deltas have rank 48 and 32
    model = attach(tiny_llama, VeraConfig(r=48, target_modules=("q_proj", "v_proj")))
    randomize_vectors(model, std=0.1)
    src = tmp_path / "a.safetensors"
    save_adapter(model, src)
    for extra, ranks, exact in (((), [32, 48], True), (("--max-rank", 48), [32, 48], True),
                                (("--max-rank", 40), [32, 40], False), (("--max-rank", 8), [8], False)):
        code, out, _ = _run(capsys, "convert", "to-lora", src, tmp_path / f"lora{extra}", *extra)
        summary = json.loads(out)
        assert code == 0 and summary["ranks"] == ranks and summary["rank"] == max(ranks), extra
        assert summary["exact"] is exact and (summary["max_rel_error"] < 1e-6) is exact, extra

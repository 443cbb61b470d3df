"""`verakit train --quantize {4bit,8bit}` (QVeRA) for causal LMs: the base's linear layers are quantized
before VeRA is attached, the run trains and saves the usual adapter file, which loads into the fp32 base;
LoRA and full fine-tuning are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'verakit[quant]')")

from lm_helpers import e2e_like, write_jsonl  # noqa: E402
from verakit import load_adapter, read_adapter, vera_layers  # noqa: E402
from verakit.cli import main  # noqa: E402
from verakit.train.causal import (  # noqa: E402
    CausalArgs,
    build_causal_lm,
    recipe,  # noqa: E402
    train_causal,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("jsonl")
    write_jsonl(folder / "train.jsonl", e2e_like(16, seed=0))
    write_jsonl(folder / "dev.jsonl", e2e_like(8, seed=1))
    return folder


def _args(out: Path, model: str, data: Path, **kw) -> CausalArgs:
    # 16 rows, batch 8, 1 epoch: 2 optimizer steps
    base = dict(task="jsonl", data_dir=str(data), out=str(out), model=model, r=64, epochs=1, batch_size=8,
                max_length=48, lr=1e-2, gen_eval_samples=0, report_samples=0, quiet=True)
    return CausalArgs(**{**base, **kw})


def test_train_4bit_saves_an_adapter_that_loads_into_the_fp32_base(llama_dir, jsonl_dir, tmp_path, monkeypatch):
    seen = {}
    real = recipe.prepare_model

    def spy(model, spec):  # what VeRA is attached to: the quantized model
        out = real(model, spec)
        seen["kinds"] = {ly.quantized for ly in vera_layers(model).values()}
        return out

    monkeypatch.setattr(recipe, "prepare_model", spy)
    m4 = train_causal(_args(tmp_path / "q4", llama_dir, jsonl_dir, quantize="4bit"))
    assert seen["kinds"] == {"4bit"}
    m32 = train_causal(_args(tmp_path / "fp32", llama_dir, jsonl_dir))
    assert seen["kinds"] == {None}
    assert len(m4["step_losses"]) == 2 and all(torch.isfinite(torch.tensor(m4["step_losses"])))
    # b starts at zero, so the first loss is the base's: the 4-bit base's differs from the fp32 base's, a little
    # (measured 6.964 vs 7.126 on this tiny random Llama, whose weights are far from nf4-friendly)
    first4, first32 = m4["step_losses"][0], m32["step_losses"][0]
    assert first4 != first32 and abs(first4 - first32) < 0.05 * first32
    assert m4["trainable_params"] == m32["trainable_params"]
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["args"]["quantize"] == "4bit"
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["args"]["quantize"] is None

    # the artifact is the usual adapter file: it loads into the fp32 base, and `verakit eval` (which loads
    # the fp32 base) scores it close to the held-out loss training measured over the 4-bit base
    path = tmp_path / "q4" / "adapter.safetensors"
    adapter = read_adapter(path)
    assert adapter.fingerprint == read_adapter(tmp_path / "fp32" / "adapter.safetensors").fingerprint
    model = load_adapter(build_causal_lm(llama_dir)[0], path)
    layers = vera_layers(model)
    assert layers and all(ly.quantized is None for ly in layers.values())
    assert any(ly.vera_b.abs().max() > 0 for ly in layers.values())  # trained vectors, not the init
    # Measured held-out loss: 7.365 over the 4-bit base in training, 7.545 with the same adapter in the fp32
    # base (`verakit eval`), 7.544 for the run trained on the fp32 base: the gap is the base's rounding.
    scored = recipe.evaluate_causal(path)["metric"]["loss"]
    trained = m4["metric"]["loss"]
    assert abs(scored - trained) < 0.05 * trained
    assert abs(scored - m32["metric"]["loss"]) < 0.01 * scored


@pytest.mark.parametrize("method", ["lora", "full"])
def test_quantize_is_refused_for_lora_and_full(llama_dir, jsonl_dir, tmp_path, method, capsys):
    with pytest.raises(ValueError, match="--quantize 4bit is for --method vera only"):
        _args(tmp_path / "x", llama_dir, jsonl_dir, method=method, quantize="4bit").budgeted()
    code = main(["train", "--task", "jsonl", "--data-dir", str(jsonl_dir), "--model", llama_dir,
                 "--out", str(tmp_path / "run"), "--method", method, "--quantize", "8bit"])
    assert code == 2 and "--quantize 8bit is for --method vera only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--quantize '3bit': choose one of 4bit, 8bit"):
        _args(tmp_path / "x", llama_dir, jsonl_dir, quantize="3bit").budgeted()


def test_cli_train_8bit(llama_dir, jsonl_dir, tmp_path):
    code = main(["train", "--task", "jsonl", "--data-dir", str(jsonl_dir), "--model", llama_dir, "--out",
                 str(tmp_path / "run"), "--quantize", "8bit", "--r", "64", "--epochs", "1", "--batch-size", "8",
                 "--max-length", "48", "--gen-eval-samples", "0", "--report-samples", "0", "--quiet"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["step_losses"]) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["quantize"] == "8bit"
    load_adapter(build_causal_lm(llama_dir)[0], tmp_path / "run" / "adapter.safetensors")


@pytest.mark.parametrize("extra", [[], ["--group-column", "group"]])
def test_quantize_is_refused_for_classification(tmp_path, capsys, extra):
    """Only the causal-LM recipe quantizes its base; elsewhere the flag would be silently ignored."""
    code = main(["train", "--task", "csv", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--quantize", "4bit", *extra])
    assert code == 2 and "--quantize is wired for causal-LM tasks" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ real SmolLM2, 4-bit


@pytest.fixture(scope="module")
def smollm2() -> str:
    from verakit.models import ModelNotInstalledError, smollm2_dir

    try:
        return str(smollm2_dir())
    except ModelNotInstalledError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_4bit_instruct_lowers_held_out_loss(smollm2, shared_data, tmp_path):
    """Issue 20, item 2: SmolLM2-135M-Instruct quantized to nf4, VeRA on q/v, 48 Alpaca rows (6 steps of 8):
    the held-out loss (12 rows) after training is below the 4-bit base's (step 0, b = 0). Measured on the
    2-core machine: 2.2016 before, 2.1278 after (12.7 min of wall time under heavy load)."""
    rows = json.loads((shared_data / "alpaca" / "alpaca_5000.json").read_text(encoding="utf-8"))[:60]
    data = tmp_path / "alpaca60.json"
    data.write_text(json.dumps(rows))
    m = train_causal(CausalArgs(task="instruct", data_dir=str(data), out=str(tmp_path / "run"), model=smollm2,
                                quantize="4bit", r=256, epochs=1, batch_size=8, max_length=64, held_out=0.2, lr=5e-2,
                                gen_eval_samples=0, report_samples=0, quiet=True))
    assert m["n_train"] == 48 and m["n_eval"] == 12 and m["total_steps"] == 6
    before, after = m["epochs"][0]["metrics"]["loss"], m["metric"]["loss"]
    print(f"held-out loss over the 4-bit base: {before:.4f} before, {after:.4f} after 6 steps")
    assert after < before - 0.04, (before, after)

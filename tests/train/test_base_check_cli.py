"""`verakit eval` and `verakit generate` refuse an adapter over another checkpoint of the same architecture
(its recorded base-weight samples differ: BaseMismatchError, exit 2, the file named) unless --no-base-check."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import perturb_weights
from verakit.cli import main


def _moved_copy(folder: str, out: Path, kind: str) -> str:
    """`folder`'s model with every weight moved by 2% of its tensor's std (another checkpoint), its other
    files (tokenizer, config) copied."""
    import transformers

    cls = getattr(transformers, "AutoModelForCausalLM" if kind == "causal" else "AutoModelForSequenceClassification")
    model = perturb_weights(cls.from_pretrained(folder), 0.02, seed=7)
    shutil.copytree(folder, out)
    model.save_pretrained(out)
    return str(out)


def test_eval_refuses_another_checkpoint_unless_told(tmp_path, tiny_bert_dir, tiny_task, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--out", str(run),
                 "--r", "16", "--epochs", "1", "--batch-size", "16", "--quiet"]) == 0
    other = _moved_copy(tiny_bert_dir, tmp_path / "other", "classify")
    capsys.readouterr()
    args = ["eval", "--adapter", str(run / "adapter.safetensors"), "--model", other]
    assert main(args) == 2
    assert "adapter.safetensors: base model mismatch" in capsys.readouterr().err
    assert main([*args, "--no-base-check"]) == 0


def test_generate_refuses_another_checkpoint_unless_told(tmp_path, llama_dir, capsys):
    from transformers import AutoModelForCausalLM

    from verakit import VeraConfig, attach, save_adapter

    model = attach(AutoModelForCausalLM.from_pretrained(llama_dir), VeraConfig(r=8, target_modules=("q_proj",)))
    save_adapter(model, tmp_path / "a.safetensors")
    other = _moved_copy(llama_dir, tmp_path / "other", "causal")
    args = ["generate", "--adapter", str(tmp_path / "a.safetensors"), "--model", other, "--prompt", "hello",
            "--max-new-tokens", "2", "--no-chat-template"]
    assert main(args) == 2
    assert "a.safetensors: base model mismatch" in capsys.readouterr().err
    assert main([*args, "--no-base-check"]) == 0


def test_artifacts_without_base_samples_warn_on_another_base(tmp_path, tiny_bert_dir, tiny_task, caplog):
    """A LoRA folder or head tensors have nothing to check their base by: `eval --model OTHER` scored them on
    another checkpoint (exit 0, a chance score) without a word. Now a warning names both bases; the training
    base under another spelling (./relative, absolute) and `full` (the whole model saved) stay quiet."""
    other = _moved_copy(tiny_bert_dir, tmp_path / "other", "classify")
    for method, artifact in (("head", "trained.safetensors"), ("lora", "adapter"), ("full", "trained.safetensors")):
        run = tmp_path / method
        assert main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", tiny_bert_dir, "--out",
                     str(run), "--method", method, "--r", "4", "--epochs", "1", "--batch-size", "16", "--quiet"]) == 0
        caplog.clear()
        assert main(["eval", "--adapter", str(run / artifact), "--model", other]) == 0
        warned = f"{run / artifact}: --model {other} is not the base model this {method} artifact was trained on " \
                 f"({tiny_bert_dir})"
        assert (warned in caplog.text) == (method != "full")
        roundabout = Path(tiny_bert_dir) / ".." / Path(tiny_bert_dir).name
        for same in (tiny_bert_dir, str(Path(tiny_bert_dir).resolve()), str(roundabout)):
            caplog.clear()
            assert main(["eval", "--adapter", str(run / artifact), "--model", same]) == 0
            assert "is not the base model" not in caplog.text


def test_default_model_aliases_are_the_same_base(caplog):
    """None (recorded: training's default) and the alias name the same model; a hub id is compared by name."""
    from verakit.train.artifacts import warn_other_base

    for recorded, given, alias, warns in ((None, "minilm", "minilm", False), (None, "MiniLM", "minilm", False),
                                          ("smollm2", None, "smollm2", False), (None, "org/other", "minilm", True),
                                          ("org/a", "org/a", None, False), ("org/a", "org/b", None, True)):
        caplog.clear()
        warn_other_base("a", {"method": "lora", "model": recorded}, given, alias)
        assert bool(caplog.records) == warns, (recorded, given)


def test_a_relative_model_folder_is_recorded_absolute(tmp_path, tiny_bert_dir, tiny_task, monkeypatch):
    """`--model models/x` was recorded as given: `verakit eval` from another folder found no model there (or
    another one by that name, which a LoRA or head artifact cannot tell). Recorded absolute, as --data-dir is."""
    import json

    from verakit.train.artifacts import read_artifact_info

    monkeypatch.chdir(Path(tiny_bert_dir).parent)
    run = tmp_path / "run"
    assert main(["train", "--task", "csv", "--data-dir", str(tiny_task), "--model", Path(tiny_bert_dir).name,
                 "--out", str(run), "--method", "head", "--epochs", "1", "--batch-size", "16", "--quiet"]) == 0
    assert read_artifact_info(run / "trained.safetensors")["model"] == str(Path(tiny_bert_dir).resolve())
    assert json.loads((run / "config.json").read_text())["args"]["model"] == Path(tiny_bert_dir).name  # as given
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--adapter", str(run / "trained.safetensors")]) == 0

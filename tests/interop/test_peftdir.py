"""PEFT adapter directories on disk (interop/peftdir.py): reading names the file and fault, writing is atomic,
and the summary `verakit inspect` prints agrees with what PEFT itself built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from verakit.fileformat import AdapterError
from verakit.interop.peftdir import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    describe_peft_dir,
    is_peft_dir,
    load_peft_base,
    peft_task_type,
    read_peft_dir,
    write_peft_dir,
)

TENSORS = {
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.arange(8.0).reshape(2, 4),
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.ones(3, 2),
    "base_model.model.classifier.weight": torch.full((2, 3), 0.5),
}
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "task_type": "SEQ_CLS", "target_modules": ["query"]}


def test_round_trip_and_module_tensors(tmp_path):
    out = write_peft_dir(tmp_path / "a", CONFIG, TENSORS)
    assert is_peft_dir(out) and sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    peft = read_peft_dir(out, "LORA")
    assert peft.config == CONFIG and peft.peft_type == "LORA"
    assert set(peft.tensors) == set(TENSORS) and all(torch.equal(peft.tensors[k], TENSORS[k]) for k in TENSORS)
    parts = peft.module_tensors(("lora_A.weight", "lora_B.weight"))
    assert list(parts) == ["bert.encoder.layer.0.attention.self.query"]
    assert torch.equal(parts["bert.encoder.layer.0.attention.self.query"]["lora_A.weight"], TENSORS[
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"])


def test_describe_counts_adapter_and_saved_parameters(tmp_path):
    info = describe_peft_dir(write_peft_dir(tmp_path / "a", CONFIG, TENSORS))
    assert info["peft_type"] == "LORA" and info["layers"] == 1
    assert info["adapter_params"] == 8 + 6 and info["saved_params"] == 6
    assert info["saved_tensors"] == ["classifier.weight"]
    assert info["scaling"] == 2.0 and info["modules"] == {"bert.encoder.layer.0.attention.self.query": [3, 4]}


def test_describe_agrees_with_peft(tiny_bert_clf, tmp_path):
    peft = pytest.importorskip("peft")
    tiny_bert_clf.save_pretrained(tmp_path / "base")  # safetensors, before PEFT wraps the model in place
    model = peft.get_peft_model(tiny_bert_clf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                               task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "lora")
    trainable, _ = model.get_nb_trainable_parameters()
    info = describe_peft_dir(tmp_path / "lora")
    assert info["layers"] == 4  # 2 layers x query, value
    assert info["adapter_params"] == 4 * 4 * (32 + 32)
    assert info["adapter_params"] + info["saved_params"] == trainable  # the classifier head is saved in full
    base = load_peft_base(tmp_path / "base", read_peft_dir(tmp_path / "lora"))
    assert type(base).__name__ == "BertForSequenceClassification" and base.config.num_labels == 3


@pytest.mark.parametrize("arch,task", [
    ("BertForSequenceClassification", "SEQ_CLS"),
    ("LlamaForCausalLM", "CAUSAL_LM"),
    ("GPT2LMHeadModel", "CAUSAL_LM"),
    ("T5ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("BertForTokenClassification", "TOKEN_CLS"),
    ("BertModel", None),
])
def test_task_types(arch, task):
    assert peft_task_type(arch) == task


def _dir(tmp_path: Path, config: object = CONFIG, weights: bytes | None = None) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (folder / WEIGHTS_NAME).write_bytes(weights)
    return folder


def test_read_errors_name_the_file_and_fault(tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        read_peft_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=f"missing {CONFIG_NAME}"):
        read_peft_dir(tmp_path / "empty")
    bad = _dir(tmp_path, "{not json")
    with pytest.raises(AdapterError, match=rf"bad/{CONFIG_NAME}: not valid JSON"):
        read_peft_dir(bad)


@pytest.mark.parametrize("config,weights,match", [
    ({"r": 2}, None, "no peft_type field"),
    ({**CONFIG, "peft_type": "VERA"}, None, "peft_type is 'VERA', expected 'LORA'"),
    (CONFIG, None, f"missing {WEIGHTS_NAME}"),
    (CONFIG, b"\x00" * 7, "unreadable safetensors file"),
])
def test_bad_directories(tmp_path, config, weights, match):
    with pytest.raises(AdapterError, match=match):
        read_peft_dir(_dir(tmp_path, config, weights), "LORA")


def test_nan_tensor_refused(tmp_path):
    folder = _dir(tmp_path)
    save_file({"base_model.model.x.lora_A.weight": torch.tensor([[1.0, float("nan")]])}, folder / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match=r"tensor 'base_model.model.x.lora_A.weight' contains NaN or Inf"):
        read_peft_dir(folder)


def test_legacy_bin_loads_tensors_but_never_unpickles_objects(tmp_path):
    folder = _dir(tmp_path)
    torch.save({"base_model.model.x.lora_A.weight": torch.ones(1, 2)}, folder / "adapter_model.bin")
    assert torch.equal(read_peft_dir(folder).tensors["base_model.model.x.lora_A.weight"], torch.ones(1, 2))

    class Payload:  # an arbitrary object: weights_only loading must refuse it, not run its code
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Payload()}, folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model.bin: unreadable \(UnpicklingError"):
        read_peft_dir(folder)


def test_write_refuses_a_non_empty_directory_and_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not an empty directory"):
        write_peft_dir(tmp_path / "full", CONFIG, TENSORS)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    with pytest.raises(AttributeError):  # a str has no .contiguous(): the write fails half way
        write_peft_dir(tmp_path / "partial", CONFIG, {"x": "not a tensor"})  # type: ignore[dict-item]
    assert not (tmp_path / "partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary folder left beside it

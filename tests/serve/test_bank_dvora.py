"""DVoRA (weight-decomposed VeRA) adapters in the AdapterBank: each slot keeps m / ||W0 + delta|| computed
once when the adapter enters, and a batch mixing DVoRA, plain VeRA and base rows equals every row run alone
on a model with its adapter loaded through the layer path (load_adapter), on tiny BERT/GPT-2 models, over a
4-bit base, and on the real all-MiniLM-L6-v2."""

import copy
import dataclasses

import pytest
import torch

from serve.cases import dvora_adapter
from verakit import AdapterError, VeraConfig, attach, load_adapter
from verakit.fileformat import write_adapter
from verakit.serve import AdapterBank


def alone(base, adapter, inputs):
    model = copy.deepcopy(base)
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.no_grad():
        return model(**inputs).logits


def rows_alone(base, adapters, names, inputs):
    return torch.cat([alone(base, adapters.get(n), {k: v[i : i + 1] for k, v in inputs.items()})
                      for i, n in enumerate(names)])


def test_mixed_dvora_vera_and_base_rows_equal_each_alone_bert(tiny_bert_clf):
    torch.set_num_threads(1)
    base = tiny_bert_clf
    adapters = {"dv8": dvora_adapter(base, VeraConfig(r=8, magnitude=True), 1),
                "dv4": dvora_adapter(base, VeraConfig(r=4, magnitude=True), 2),
                "plain": dvora_adapter(base, VeraConfig(r=8), 3)}
    assert adapters["dv8"].m and not adapters["plain"].m
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=8)), capacity=4)
    for name, ad in adapters.items():
        bank.add(name, ad)
    names = ["dv8", None, "plain", "dv4", "dv8", "plain", "dv4"]
    inputs = {"input_ids": torch.randint(0, 99, (7, 11), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        got = bank.forward(names, **inputs).logits
    expected = rows_alone(base, adapters, names, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the magnitude matters: the same vectors without m answer differently
    dv8 = adapters["dv8"]
    no_m = dataclasses.replace(dv8, config=dataclasses.replace(dv8.config, magnitude=False), m={})
    assert (alone(base, no_m, {k: v[:1] for k, v in inputs.items()}) - expected[:1]).abs().max() > 1e-3
    # plain VeRA and base rows are bit for bit what a bank that never saw a DVoRA adapter answers (the same
    # batch of such rows in both banks, so the per-slot heads group the same rows)
    plain_bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=8)), capacity=4)
    plain_bank.add("plain", adapters["plain"])
    names = ["plain", None, "plain", "plain"]
    inputs = {k: v[:4] for k, v in inputs.items()}
    with torch.no_grad():
        assert torch.equal(bank.forward(names, **inputs).logits, plain_bank.forward(names, **inputs).logits)


def test_slot_reuse_resets_the_scale_and_export_refuses_dvora(tiny_bert_clf):
    base = tiny_bert_clf
    dv, plain = dvora_adapter(base, VeraConfig(r=4, magnitude=True), 1), dvora_adapter(base, VeraConfig(r=4), 2)
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=4)), capacity=1)
    assert bank.add("dv", dv) == 1
    with pytest.raises(AdapterError, match="slot 1 holds a DVoRA adapter"):
        bank.export("dv")
    assert bank.add("plain", plain) == 1  # evicts dv: its slot's scale goes back to 1
    inputs = {"input_ids": torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        got = bank.forward(["plain", None], **inputs).logits
    torch.testing.assert_close(got, rows_alone(base, {"plain": plain}, ["plain", None], inputs), atol=1e-5, rtol=0)
    assert bank.export("plain").m == {}


def test_dvora_conv1d_layers_gpt2(tiny_gpt2):
    """transformers' Conv1D stores W0 transposed: the row norms are over the output rows all the same."""
    torch.set_num_threads(1)
    base = tiny_gpt2
    cfg = VeraConfig(r=4, target_modules=("c_attn", "c_proj"), magnitude=True)
    adapters = {"a": dvora_adapter(base, cfg, 1), "b": dvora_adapter(base, VeraConfig(r=4, target_modules=("c_attn",)), 2)}
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=4, target_modules=("c_attn", "c_proj"))), capacity=2)
    for name, ad in adapters.items():
        bank.add(name, ad)
    names = ["a", "b", None, "a"]
    inputs = {"input_ids": torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        got = bank.forward(names, **inputs).logits
    torch.testing.assert_close(got, rows_alone(base, adapters, names, inputs), atol=1e-5, rtol=0)


def test_mixed_dvora_batch_real_minilm(minilm_clf, minilm_path, tmp_path):
    """The real all-MiniLM-L6-v2: DVoRA adapters at r=32 and r=16 and a plain one, through adapter files."""
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    base = minilm_clf
    adapters = {"dv": dvora_adapter(base, VeraConfig(r=32, magnitude=True), 1, std=0.3),
                "dv16": dvora_adapter(base, VeraConfig(r=16, magnitude=True), 2, std=0.3),
                "plain": dvora_adapter(base, VeraConfig(r=32), 3, std=0.3)}
    for name, ad in adapters.items():
        write_adapter(ad, tmp_path / f"{name}.safetensors")
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=32)), capacity=3)
    for name in adapters:
        bank.add(name, tmp_path / f"{name}.safetensors")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    texts = ["a gripping, beautifully shot film", "the plot is a mess", "two sentences, one meaning",
             "nothing here works", "quietly moving"]
    names = ["dv", "plain", None, "dv16", "dv"]
    with torch.no_grad():
        got = bank.forward(names, **tok(texts, padding=True, return_tensors="pt")).logits
    for i, name in enumerate(names):
        model = copy.deepcopy(base)
        if name is not None:
            load_adapter(model, tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            want = model(**tok(texts[i], return_tensors="pt")).logits[0]  # no padding at all
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_dvora_over_a_4bit_base_equals_rows_alone(tiny_llama):
    """The scale's norm is over the dequantized weight, as VeraLinear's over a quantized base."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'verakit[quant]')")
    from verakit.quant import quantize_linears

    torch.set_num_threads(1)
    base = tiny_llama
    targets = ("q_proj", "v_proj", "down_proj")
    adapters = {"dv": dvora_adapter(base, VeraConfig(r=8, target_modules=targets, magnitude=True), 1),
                "plain": dvora_adapter(base, VeraConfig(r=4, target_modules=targets), 2)}
    bank = AdapterBank(attach(quantize_linears(copy.deepcopy(base), "4bit"), VeraConfig(r=8, target_modules=targets)), 2)
    for name, ad in adapters.items():
        bank.add(name, ad)
    names = ["dv", None, "plain", "dv"]
    inputs = {"input_ids": torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        got = bank.forward(names, **inputs).logits
    for i, name in enumerate(names):
        model = quantize_linears(copy.deepcopy(base), "4bit")
        if name is not None:
            load_adapter(model, adapters[name], check_base=False)  # samples of the fp32 base: 4-bit differs
        with torch.no_grad():
            want = model(input_ids=inputs["input_ids"][i : i + 1]).logits[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_dvora_low_precision_base(tiny_llama, dtype, atol):
    """A bf16/fp16 base: the scale is computed in float32 from the cast W0 and applied in the model's dtype."""
    torch.set_num_threads(1)
    base = tiny_llama
    adapters = {"dv": dvora_adapter(base, VeraConfig(r=8, magnitude=True), 1),
                "plain": dvora_adapter(base, VeraConfig(r=3), 2)}
    bank = AdapterBank(attach(copy.deepcopy(base), VeraConfig(r=8)), capacity=2)
    bank.model.to(dtype)
    for name, ad in adapters.items():
        bank.add(name, ad)
    names = ["dv", "plain", None, "dv"]
    inputs = {"input_ids": torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        got = bank.forward(names, **inputs).logits.float()
    for i, name in enumerate(names):
        model = copy.deepcopy(base)
        if name is not None:
            load_adapter(model, adapters[name])
        model.to(dtype)
        with torch.no_grad():
            want = model(input_ids=inputs["input_ids"][i : i + 1]).logits[0].float()
        torch.testing.assert_close(got[i], want, atol=atol, rtol=0)

"""AdapterBank against the slow reference: every row of a mixed batch equals that row run alone on a fresh
model with its adapter loaded normally (load_adapter), across ranks, dtypes, heads and slot-0 rows."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from serve.cases import trained_adapter
from verakit import AdapterError, VeraConfig, attach, detach, load_adapter
from verakit.fileformat import write_adapter
from verakit.merge import adapter_deltas
from verakit.serve import AdapterBank


def _bank(base, config, capacity=4):
    return AdapterBank(attach(copy.deepcopy(base), config), capacity)


def _reference_rows(base, adapters, names, inputs, dtype=torch.float32):
    """Each row alone: a fresh copy of the base, the row's adapter loaded normally (None: the base)."""
    out = []
    for i, name in enumerate(names):
        model = copy.deepcopy(base)
        if name is not None:
            load_adapter(model, adapters[name])
        model.to(dtype)
        with torch.no_grad():
            out.append(model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("bank_rank", [8, 16])
def test_mixed_batch_equals_rows_alone_bert_with_heads(tiny_bert_clf, bank_rank):
    torch.set_num_threads(1)
    base = tiny_bert_clf  # 3 labels: classifier and pooler are per-slot heads
    adapters = {
        "full": trained_adapter(base, VeraConfig(r=bank_rank), seed=1),
        "low": trained_adapter(base, VeraConfig(r=4), seed=2),
        "odd": trained_adapter(base, VeraConfig(r=5), seed=3),
    }
    bank = _bank(base, VeraConfig(r=bank_rank))
    assert sorted(bank.heads) == ["bert.pooler.dense", "classifier"]
    for name, ad in adapters.items():
        bank.add(name, ad)
    names = ["low", None, "full", "odd", "low", None, "full"]
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 99, (7, 11), generator=g)}
    with torch.no_grad():
        got = bank.forward(names, **inputs).logits
    expected = _reference_rows(base, adapters, names, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # base rows are the untouched model (up to matmul blocking in the grouped heads); adapted rows differ
    with torch.no_grad():
        plain = base(**inputs).logits
    torch.testing.assert_close(got[[1, 5]], plain[[1, 5]], atol=1e-6, rtol=0)
    assert (got[0] - plain[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_mixed_batch_llama_dtypes(tiny_llama, dtype, atol):
    """Causal LM (no heads), targets of two shapes (q 64x64, v 32x64), low-precision base weights."""
    torch.set_num_threads(1)
    base = tiny_llama
    adapters = {"a": trained_adapter(base, VeraConfig(r=8), 1), "b": trained_adapter(base, VeraConfig(r=3), 2)}
    bank = _bank(base, VeraConfig(r=8))
    bank.model.to(dtype)
    for name, ad in adapters.items():
        bank.add(name, ad)
    names = ["b", "a", None, "a"]
    inputs = {"input_ids": torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        got = bank.forward(names, **inputs).logits.float()
    expected = _reference_rows(base, adapters, names, inputs, dtype).float()
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    if dtype == torch.float32:
        ref32 = expected
    else:
        ref32 = _reference_rows(base, adapters, names, inputs).float()
    with torch.no_grad():
        plain = base(**inputs).logits.float()
    # Low precision stays near the fp32 answer, measured against what each row's adapter changes: bf16 errs
    # by 0.0055 at most where the adapters move the logits by 0.30-0.67, fp16 by 0.0008. A row whose adapter
    # were lost would err by its whole effect.
    err, effect = ((got - ref32).flatten(1).abs().amax(1), (ref32 - plain).flatten(1).abs().amax(1))
    for i, name in enumerate(names):
        assert err[i] < (0.05 * effect[i] if name is not None else 20 * atol), (i, float(err[i]), float(effect[i]))


def test_mixed_batch_real_minilm(minilm_clf, minilm_path, tmp_path):
    """The real all-MiniLM-L6-v2 (BERT, 6 layers), query+value at r=64 and r=32, pooler and classifier heads."""
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    base = minilm_clf
    adapters = {"sst": trained_adapter(base, VeraConfig(r=64), 1, std=0.3),
                "mrpc": trained_adapter(base, VeraConfig(r=32), 2, std=0.3)}
    for name, ad in adapters.items():  # through files, as a server would load them
        write_adapter(ad, tmp_path / f"{name}.safetensors")
    bank = _bank(base, VeraConfig(r=64), capacity=2)
    for name in adapters:
        bank.add(name, tmp_path / f"{name}.safetensors")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    texts = ["a gripping, beautifully shot film", "the plot is a mess", "two sentences, one meaning",
             "nothing here works", "quietly moving"]
    names = ["sst", "mrpc", None, "sst", "mrpc"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = bank.forward(names, **batch).logits
    for i, name in enumerate(names):
        model = copy.deepcopy(base)
        if name is not None:
            load_adapter(model, tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            alone = model(**tok(texts[i], return_tensors="pt")).logits[0]  # no padding at all
        torch.testing.assert_close(got[i], alone, atol=1e-5, rtol=1e-5)  # padded vs unpadded attention: fp32 rounding


def test_lru_eviction_replacement_and_removal(tiny_bert_clf):
    base = tiny_bert_clf
    ads = [trained_adapter(base, VeraConfig(r=4), seed=i) for i in range(4)]
    bank = _bank(base, VeraConfig(r=4), capacity=2)
    assert bank.add("a", ads[0]) == 1 and bank.add("b", ads[1]) == 2
    bank.slots(["a"])  # a is now the most recently used
    assert bank.add("c", ads[2]) == 2 and bank.names() == ["a", "c"] and bank.evictions == 1
    with pytest.raises(KeyError, match="'b' is not resident"):
        bank.slots(["b"])
    x = {"input_ids": torch.randint(0, 99, (1, 6))}
    bank.add("a", ads[3])  # same name: replaced in place, in its slot
    assert bank.slot("a") == 1 and len(bank) == 2 and bank.loads == 4
    torch.testing.assert_close(bank.forward(["a"], **x).logits, _reference_rows(base, {"a": ads[3]}, ["a"], x))
    bank.remove("a")
    assert "a" not in bank and bank.add("d", ads[0]) == 1 and bank.evictions == 1
    with pytest.raises(ValueError, match="slot 2 is outside|holds no adapter"):
        bank.slots([3])


def test_rank_folding_round_trips_through_export(tiny_llama):
    """A rank-3 adapter in a rank-8 bank keeps its exact delta weights (checked with the pure adapter_deltas)."""
    base = tiny_llama
    ad = trained_adapter(base, VeraConfig(r=3), seed=5)
    bank = _bank(base, VeraConfig(r=8))
    bank.add("x", ad)
    out = bank.export("x")
    assert out.config.r == 8 and all(t.shape == (8,) and not t[3:].any() for t in out.d.values())
    want, got = adapter_deltas(ad), adapter_deltas(out)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"seed": 1}, "seed=0 but the adapter 1"),
        ({"distribution": "kaiming_normal"}, "distribution="),
        ({"r": 16}, "adapter rank 16 exceeds the bank's rank 8"),
    ],
)
def test_incompatible_adapters_are_refused(tiny_llama, change, message):
    base = tiny_llama
    bank = _bank(base, VeraConfig(r=8))
    bank.add("keep", trained_adapter(base, VeraConfig(r=8), seed=0))
    bad = trained_adapter(base, VeraConfig(r=8).replace(**change), seed=1)
    with pytest.raises(AdapterError, match=message):
        bank.add("bad", bad)
    assert bank.names() == ["keep"] and bank.loads == 1


def test_base_mismatches_are_refused(tiny_llama, tiny_bert_clf):
    bank = _bank(tiny_llama, VeraConfig(r=8))
    with pytest.raises(AdapterError, match="model_type 'bert', bank 'llama'"):
        bank.add("x", trained_adapter(tiny_bert_clf, VeraConfig(r=8), 0))
    other = trained_adapter(tiny_llama, VeraConfig(r=8, target_modules=("k_proj",)), 0)
    with pytest.raises(AdapterError, match="k_proj' .* is not a bank layer"):
        bank.add("x", other)
    ad = trained_adapter(tiny_llama, VeraConfig(r=8), 0)
    wrong = dataclasses.replace(ad, modules={**ad.modules, "model.layers.0.self_attn.q_proj": (64, 32, "linear")})
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.self_attn.q_proj' is \(64, 32, 'linear'\)"):
        bank.add("x", wrong)
    heads = _bank(tiny_bert_clf, VeraConfig(r=8))
    no_heads = dataclasses.replace(trained_adapter(tiny_bert_clf, VeraConfig(r=8), 0), saved={})
    with pytest.raises(AdapterError, match="saved modules differ"):
        heads.add("x", no_heads)
    assert len(bank) == 0 and len(heads) == 0


def test_non_linear_heads_and_merged_models_are_refused(tiny_llama):
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.head = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))

    with pytest.raises(AdapterError, match="'head' holds \\['1.weight', '1.bias'\\] outside plain nn.Linear"):
        AdapterBank(attach(Tagger(), VeraConfig(r=4, target_modules=("body",), modules_to_save=("head",))))
    from verakit import merge

    model = attach(copy.deepcopy(tiny_llama), VeraConfig(r=4))
    merge(model)
    with pytest.raises(AdapterError, match="merged"):
        AdapterBank(model)


def test_close_restores_the_base_model(tiny_bert_clf):
    base = tiny_bert_clf
    bank = _bank(base, VeraConfig(r=4))
    bank.add("a", trained_adapter(base, VeraConfig(r=4), 0))
    model = bank.close()
    x = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    assert type(model.classifier) is nn.Linear and not any("Slot" in type(m).__name__ for m in model.modules())
    attach(model, VeraConfig(r=4))  # usable again
    detach(model)

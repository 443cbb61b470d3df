"""AdapterBank over a bitsandbytes-quantized base (QVeRA serving): a mixed batch equals each row run alone
with its adapter loaded normally on the same quantized base, and the bank keeps no dequantized weight."""

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'verakit[quant]')")

from serve.cases import trained_adapter  # noqa: E402
from verakit import VeraConfig, attach, load_adapter, quant  # noqa: E402
from verakit.quant import quant_kind, quantize_linears  # noqa: E402
from verakit.serve import AdapterBank  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized(base, kind, training):
    # quantization is deterministic, so every call gives bit-identical quantized weights
    return quantize_linears(copy.deepcopy(base), kind).train(training)


@pytest.mark.parametrize("kind,training", [("4bit", False), ("8bit", True), ("8bit", False)])
def test_mixed_batch_over_quantized_base_equals_rows_alone(tiny_llama, kind, training, monkeypatch):
    torch.set_num_threads(1)
    base = tiny_llama
    # adapter files are trained on the fp32 base: the format does not depend on the base precision
    adapters = {"a": trained_adapter(base, VeraConfig(r=8, target_modules=ALL_LINEAR), 1),
                "b": trained_adapter(base, VeraConfig(r=3, target_modules=ALL_LINEAR), 2)}
    model = attach(_quantized(base, kind, training), VeraConfig(r=8, target_modules=ALL_LINEAR))
    bank = AdapterBank(model, capacity=3)
    for name, ad in adapters.items():
        bank.add(name, ad)
    assert len(bank.layers) == 2 * len(ALL_LINEAR)
    assert all(quant_kind(ly.base) == kind for ly in bank.layers.values())

    def refuse(*args, **kwargs):
        raise AssertionError("the bank dequantized a base weight")

    names = ["b", "a", None, "a", "b"]
    inputs = {"input_ids": torch.randint(0, 101, (5, 9), generator=torch.Generator().manual_seed(1))}
    with monkeypatch.context() as mp, torch.no_grad():
        mp.setattr(quant, "dequantized_weight", refuse)
        got = bank.forward(names, **inputs).logits
    expected = []
    for i, name in enumerate(names):
        alone = _quantized(base, kind, training)
        if name is not None:
            load_adapter(alone, adapters[name])
            alone.train(training)
        with torch.no_grad():
            expected.append(alone(input_ids=inputs["input_ids"][i : i + 1]).logits[0])
    expected = torch.stack(expected)
    # Measured max |bank - alone| (seeds fixed): 4bit 4.0e-7, 8bit training 5.0e-7, 8bit eval 3.1e-7 (eval
    # mode rounds the activations to int8 per token, so a row's result does not depend on its batch).
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the adapters do change the logits, and the base rows are the quantized base itself
    with torch.no_grad():
        plain = _quantized(base, kind, training)(**inputs).logits
    assert (got[1] - plain[1]).abs().max() > 1e-2 and (got[0] - plain[0]).abs().max() > 1e-2
    torch.testing.assert_close(got[2], plain[2], atol=1e-6, rtol=0)

    # no full-precision copy of any quantized weight is kept: every bank layer's base weight stays packed,
    # and the only fp32 tensors are the slot tables, norms, embeddings and the (unquantized) lm_head
    for ly in bank.layers.values():
        assert ly.base.weight.dtype == (torch.uint8 if kind == "4bit" else torch.int8)
    big = {n for n, t in bank.model.state_dict().items()
           if t.is_floating_point() and t.dim() == 2 and t.shape[0] >= 32 and t.shape[1] >= 32}
    assert big == {"model.embed_tokens.weight", "lm_head.weight"}, big

import pytest
import torch

from helpers import randomize_vectors
from verakit import (
    VeraConfig,
    attach,
    export_merged,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    unmerge,
    vera_layers,
)
from verakit.cli import main as cli_main
from verakit.merge import adapter_deltas, is_merged, merged_state_dict


def _weights(model):
    return {n: layer.base.weight.detach().clone() for n, layer in vera_layers(model).items()}


def test_merge_minilm_logits_and_restore(minilm_clf):
    model = minilm_clf
    attach(model, VeraConfig(r=256))
    randomize_vectors(model, std=0.2)
    x = torch.randint(0, 30000, (4, 32))
    w0 = _weights(model)
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        merge(model)
        merge(model)  # idempotent
        assert is_merged(model)
        merged = model(input_ids=x).logits
        unmerge(model)
        unmerge(model)  # idempotent
        again = model(input_ids=x).logits
    assert (merged - unmerged).abs().max().item() <= 1e-4
    assert (again - unmerged).abs().max().item() <= 1e-5
    for n, w in _weights(model).items():
        assert (w - w0[n]).abs().max().item() <= 1e-6, n
    # the adapter really changes the model, so the parity above is not vacuous
    detached_delta = max(layer.delta_weight().abs().max().item() for layer in vera_layers(model).values())
    assert detached_delta > 1e-3


def test_pure_state_dict_merge_equals_live_merge(tiny_gpt2, tmp_path):
    base_sd = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    attach(tiny_gpt2, VeraConfig(r=8, target_modules=("c_attn", "c_proj", "c_fc")))
    randomize_vectors(tiny_gpt2)
    path = tmp_path / "g.safetensors"
    save_adapter(tiny_gpt2, path)
    ad = read_adapter(path)
    pure = merged_state_dict(base_sd, ad)
    merge(tiny_gpt2)
    for name, layer in vera_layers(tiny_gpt2).items():
        torch.testing.assert_close(pure[f"{name}.weight"], layer.base.weight, atol=1e-6, rtol=0)
    assert set(adapter_deltas(ad)) == set(vera_layers(tiny_gpt2))
    with pytest.raises(Exception, match="no weight"):
        merged_state_dict({}, ad)


def test_export_merged_loads_without_verakit(minilm_clf, minilm_path, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = minilm_clf
    attach(model, VeraConfig(r=64))
    randomize_vectors(model, std=0.2)
    with torch.no_grad():
        model.classifier.weight.normal_()
    x = torch.randint(0, 30000, (2, 20))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    out = export_merged(model, tmp_path / "merged")
    assert not is_merged(model)  # live model left as it was
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("vera" in k or ".base." in k for k in plain.state_dict())
    with torch.no_grad():
        got = plain(input_ids=x).logits
    assert (got - expected).abs().max().item() <= 1e-4
    with pytest.raises(FileExistsError):
        export_merged(model, out)


def test_cli_merge_and_inspect(minilm_clf, minilm_path, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    model = minilm_clf
    attach(model, VeraConfig(r=32))
    randomize_vectors(model, std=0.2)
    adapter = tmp_path / "a.safetensors"
    save_adapter(model, adapter)
    x = torch.randint(0, 30000, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    assert cli_main(["merge", "--model", minilm_path, "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (plain(input_ids=x).logits - expected).abs().max().item() <= 1e-4
    capsys.readouterr()
    assert cli_main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out and "seed=0" in out and "12 layers" in out
    assert cli_main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such adapter file" in capsys.readouterr().err


def test_load_refuses_when_merged(tiny_bert_clf, tmp_path):
    attach(tiny_bert_clf, VeraConfig(r=4))
    path = tmp_path / "a.safetensors"
    save_adapter(tiny_bert_clf, path)
    merge(tiny_bert_clf)
    with pytest.raises(Exception, match="merged"):
        load_adapter(tiny_bert_clf, path)

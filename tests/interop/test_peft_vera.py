"""PEFT VeRA <-> verakit round trips: logits equal PEFT's on BERT (MiniLM), GPT-2 (Conv1D), Llama (mixed shapes)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from interop.cases import ATOL, Case, randomize_trainable
from verakit import AdapterError, VeraConfig, attach, load_adapter, read_adapter
from verakit.fileformat import adapter_from_model, write_adapter
from verakit.interop import from_peft, to_peft
from verakit.projection import peft_torch_tables


def _peft_vera(case, tmp_path, save_projection, key=5):
    from peft import VeraConfig as PeftVeraConfig
    from peft import get_peft_model

    cfg = PeftVeraConfig(r=case.config.r, target_modules=case.peft_targets, save_projection=save_projection,
                         projection_prng_key=key, task_type=case.task_type,
                         fan_in_fan_out=case.name == "gpt2")
    model = get_peft_model(case.fresh(), cfg).eval()
    randomize_trainable(model)
    out = tmp_path / f"peft_{case.name}_{save_projection}"
    model.save_pretrained(out)
    return out, case.logits(model)


@pytest.mark.parametrize("save_projection", [True, False])
def test_import_peft_vera_logits_equal(case, tmp_path, save_projection):
    peft_dir, want = _peft_vera(case, tmp_path, save_projection)
    base = case.fresh()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = from_peft(peft_dir, base)
    # the model given to from_peft is left exactly as it was
    assert not hasattr(base, "verakit_state")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert adapter.config.projection_kind == ("explicit" if save_projection else "peft-torch")
    assert adapter.config.seed == 5 and adapter.extra["imported_from"] == "peft-vera"
    # through a verakit file and back
    path = tmp_path / "imported.safetensors"
    write_adapter(adapter, path)
    got = case.logits(load_adapter(case.fresh(), read_adapter(path)))
    assert (got - want).abs().max() <= ATOL
    assert (want - case.logits(case.base)).abs().max() > 1e-2  # the adapter really changes the output
    if not save_projection:
        # PEFT's own regenerated pair is the one our generator rebuilds
        A, _ = peft_torch_tables(5, case.config.r, adapter.projection.max_in, adapter.projection.max_out)
        assert torch.equal(A, read_adapter(path).projection.A)


def test_import_resolves_targets_and_heads(case, tmp_path):
    adapter = from_peft(_peft_vera(case, tmp_path, True)[0], case.fresh())
    if case.name == "llama":
        # PEFT itself expands "all-linear" into full module names in its saved config
        assert adapter.config.target_modules == tuple(sorted(adapter.modules)) and len(adapter.modules) == 14
    else:
        assert adapter.config.target_modules == {"bert": ("query", "value"), "gpt2": ("c_attn", "c_proj")}[case.name]
    if case.name == "bert":
        # PEFT saved the classifier; BERT's pooler is a head for verakit and carries the base weights
        assert adapter.config.modules_to_save == ("classifier", "pooler")
        assert torch.equal(adapter.saved["bert.pooler.dense.weight"], case.base.bert.pooler.dense.weight)
        assert not torch.equal(adapter.saved["classifier.weight"], case.base.classifier.weight)


def test_export_to_peft_logits_equal(case, tmp_path):
    from peft import PeftModel

    model = attach(case.fresh(), case.config)
    randomize_trainable(model)
    want = case.logits(model)
    adapter = adapter_from_model(model)
    out = to_peft(adapter, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(case.fresh(), out).eval()
    assert (case.logits(loaded) - want).abs().max() <= ATOL
    # lambda_d carries our fan-in scale: s = sqrt(6 / d_in) * sqrt(6 / r) for Kaiming-uniform unit tables
    name = next(iter(adapter.modules))
    d_in, r = adapter.modules[name][1], adapter.config.r
    lam = load_file(out / "adapter_model.safetensors")[f"base_model.model.{name}.vera_lambda_d"]
    assert torch.allclose(lam, adapter.d[name] * (6 / d_in) ** 0.5 * (6 / r) ** 0.5, rtol=1e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is True


def test_peft_to_verakit_to_peft_keeps_tables_bit_for_bit(tiny_gpt2, tmp_path):

    case = Case("gpt2", tiny_gpt2, torch.randint(0, 97, (2, 9)), ["c_attn"], VeraConfig(r=4), None)
    src, want = _peft_vera(case, tmp_path, True)
    out = to_peft(from_peft(src, case.fresh()), tmp_path / "again")
    a, b = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unique_projections_cannot_go_to_peft_vera(tiny_llama, tmp_path):
    model = attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj",), projection_sharing="unique"))
    with pytest.raises(AdapterError, match="projection_sharing=.unique.*export it with to_lora"):
        to_peft(adapter_from_model(model), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_non_empty_dir(tiny_llama, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="busy exists"):
        to_peft(adapter_from_model(attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj",)))), tmp_path / "busy")


# --- malformed PEFT directories -------------------------------------------------------------------


@pytest.fixture
def good_dir(tiny_gpt2, tmp_path):

    case = Case("gpt2", tiny_gpt2, torch.randint(0, 97, (2, 9)), ["c_attn"], VeraConfig(r=4), None)
    return _peft_vera(case, tmp_path, True)[0]


def _edit(path, config_fn=None, tensors_fn=None):
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if config_fn:
        cfg = json.loads(cfg_path.read_text())
        config_fn(cfg)
        cfg_path.write_text(json.dumps(cfg))
    if tensors_fn:
        t = load_file(w_path)
        tensors_fn(t)
        save_file(t, w_path)


LAMBDA_B = "base_model.model.transformer.h.1.attn.c_attn.vera_lambda_b"
BAD_DIRS = {
    "no config": (lambda p: (p / "adapter_config.json").unlink(), "missing adapter_config.json"),
    "not json": (lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON"),
    "no peft_type": (lambda p: _edit(p, lambda c: c.pop("peft_type")), "no peft_type field"),
    "wrong peft_type": (lambda p: _edit(p, lambda c: c.update(peft_type="LORA")), "peft_type is 'LORA', expected 'VERA'"),
    "no weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
    "missing lambda_b": (lambda p: _edit(p, None, lambda t: t.pop(LAMBDA_B)), f"missing tensor '{LAMBDA_B}'"),
    "no vectors": (lambda p: _edit(p, None, lambda t: [t.pop(k) for k in list(t) if "lambda" in k]), "no '\\*.vera_lambda_d'"),
    "missing vera_A": (lambda p: _edit(p, None, lambda t: t.pop("base_model.vera_A")), "save_projection is true but tensor 'base_model.vera_A' is missing"),
    "small vera_A": (lambda p: _edit(p, None, lambda t: t.update({"base_model.vera_A": torch.zeros(4, 8)})), r"do not fit r=4 and the largest adapted layer \(d_out 96, d_in 32\)"),
    "bias": (lambda p: _edit(p, lambda c: c.update(bias="all")), "bias='all' trains biases"),
    "wrong shape": (lambda p: _edit(p, None, lambda t: t.update({LAMBDA_B: torch.zeros(5)})), r"c_attn.vera_lambda_b' has shape \(5,\), the model's .* has d_out=96"),
    "wrong r": (lambda p: _edit(p, lambda c: c.update(r=6)), r"vera_lambda_d' has shape \(4,\), expected \(6,\)"),
    "unknown module": (lambda p: _edit(p, None, lambda t: t.update({"base_model.model.nope.vera_lambda_b": torch.zeros(2), "base_model.model.nope.vera_lambda_d": torch.zeros(4)})), "module 'nope' of the adapter is not a linear layer of GPT2LMHeadModel"),
    "stray tensor": (lambda p: _edit(p, None, lambda t: t.update({"base_model.model.transformer.wte.weight": torch.zeros(97, 32)})), "unexpected tensor 'base_model.model.transformer.wte.weight'"),
    "nan": (lambda p: _edit(p, None, lambda t: t[LAMBDA_B].fill_(float("nan"))), "contains NaN or Inf"),
}


@pytest.mark.parametrize("case_name", list(BAD_DIRS))
def test_malformed_peft_dirs_give_clear_errors(good_dir, tiny_gpt2, case_name):
    breaker, pattern = BAD_DIRS[case_name]
    breaker(good_dir)
    with pytest.raises(AdapterError, match=pattern) as err:
        from_peft(good_dir, tiny_gpt2)
    assert good_dir.name in str(err.value)
    assert not hasattr(tiny_gpt2, "verakit_state")


def test_base_model_needed(good_dir):
    with pytest.raises(AdapterError, match="base_model_name_or_path=None is not a local directory; pass the model"):
        from_peft(good_dir)
    with pytest.raises(AdapterError, match="not a directory"):
        from_peft(good_dir / "nope", None)


def test_from_peft_loads_base_from_directory(tiny_gpt2, good_dir, tmp_path):
    tiny_gpt2.save_pretrained(tmp_path / "base")
    _edit(good_dir, lambda c: c.update(base_model_name_or_path=str(tmp_path / "base")))
    a, b = from_peft(good_dir), from_peft(good_dir, tiny_gpt2)
    assert a.modules == b.modules and all(torch.equal(a.b[n], b.b[n]) for n in a.modules)

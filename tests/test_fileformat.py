import base64
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import randomize_vectors
from verakit import AdapterError, VeraConfig, attach, load_adapter, read_adapter, save_adapter, vera_layers
from verakit.fileformat import FORMAT_NAME, atomic_write_bytes


def _trained(model, cfg=None):
    attach(model, cfg or VeraConfig(r=16))
    randomize_vectors(model)
    return model


def _fresh_minilm(minilm_path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()


def test_round_trip_bit_identical_logits(minilm_clf, minilm_path, tmp_path):
    model = _trained(minilm_clf)
    with torch.no_grad():
        model.classifier.weight.normal_()
    x = torch.randint(0, 1000, (3, 14))
    path = tmp_path / "a.safetensors"
    nbytes = save_adapter(model, path)
    with torch.no_grad():
        expected = model(input_ids=x).logits
    fresh = load_adapter(_fresh_minilm(minilm_path), path)
    with torch.no_grad():
        got = fresh(input_ids=x).logits
    assert torch.equal(got, expected)
    # file size bound: trained numbers x 4 bytes + 8 KiB of header and metadata
    ad = read_adapter(path)
    assert nbytes == path.stat().st_size <= ad.trained_numel * 4 + 8192
    assert ad.trained_numel == 12 * (16 + 384) + 384 * 384 + 384 + 2 * 384 + 2
    assert ad.extra["labels"] == ["LABEL_0", "LABEL_1"]


def test_no_projection_in_file_and_size_without_head(tiny_llama, tmp_path):
    model = _trained(tiny_llama, VeraConfig(r=64, target_modules="all-linear"))
    path = tmp_path / "l.safetensors"
    n = save_adapter(model, path, dtype=torch.bfloat16)
    tensors = load_file(path)
    assert all(k.endswith((".vera_d", ".vera_b")) for k in tensors)
    numel = sum(t.numel() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert n <= numel * 2 + 8192
    ad = read_adapter(path)
    assert ad.dtype == "BF16" and ad.d["model.layers.0.mlp.down_proj"].dtype == torch.float32


def test_gpt2_and_llama_round_trip(tiny_gpt2, tiny_llama, tmp_path):
    for model, vocab in ((tiny_gpt2, 97), (tiny_llama, 101)):
        fresh_base = type(model)(model.config).eval()
        fresh_base.load_state_dict(model.state_dict())
        _trained(model, VeraConfig(r=8, target_modules="all-linear" if vocab == 101 else None))
        path = tmp_path / f"{vocab}.safetensors"
        save_adapter(model, path)
        x = torch.randint(0, vocab, (2, 9))
        load_adapter(fresh_base, path)
        with torch.no_grad():
            assert torch.equal(fresh_base(x).logits, model(x).logits)


@pytest.fixture
def good_file(tiny_bert_clf, tmp_path):
    model = _trained(tiny_bert_clf, VeraConfig(r=4))
    path = tmp_path / "good.safetensors"
    save_adapter(model, path)
    return path


def _rewrite(src, dst, mutate_meta=None, mutate_tensors=None):
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["verakit"])
    if mutate_meta:
        mutate_meta(inner)
    if mutate_tensors:
        mutate_tensors(tensors)
    meta["verakit"] = json.dumps(inner)
    save_file(tensors, dst, metadata=meta)
    return dst


def _set(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    d[last] = value


BAD_CASES = {
    "future version": (lambda m: _set(m, ["format_version"], 99), None, "unknown format version 99"),
    "bad config": (lambda m: _set(m, ["config", "r"], 0), None, "corrupt metadata.*r must be"),
    "fingerprint": (lambda m: _set(m, ["base", "fingerprint"], "0" * 16), None, "fingerprint does not match"),
    "generator": (lambda m: _set(m, ["projection", "generator"], "mt19937"), None, "unknown projection generator"),
    "missing tensor": (None, lambda t: t.pop("bert.encoder.layer.0.attention.self.query.vera_d"), "missing tensor.*layer.0.attention.self.query.vera_d"),
    "extra tensor": (None, lambda t: t.update({"rogue": torch.zeros(2)}), "unexpected tensor.*rogue"),
    "wrong shape": (None, lambda t: t.update({"bert.encoder.layer.1.attention.self.value.vera_b": torch.zeros(5)}),
                    r"value.vera_b' has shape \(5,\), expected \(32,\)"),
    "nan": (None, lambda t: t["bert.encoder.layer.1.attention.self.value.vera_b"].fill_(float("nan")), "NaN or Inf"),
    "inf": (None, lambda t: t["classifier.weight"].fill_(float("inf")), "classifier.weight.*NaN or Inf"),
    "dtype": (None, lambda t: t.update({"bert.encoder.layer.0.attention.self.query.vera_d": torch.zeros(4, dtype=torch.float64)}),
              "unsupported dtype F64"),
    "samples cut": (lambda m: _set(m, ["base", "samples", "data"], m["base"]["samples"]["data"][:-4]), None,
                    "corrupt metadata.*base.samples holds 2301 bytes, expected 2304 for budget 768 over 4 modules"),
    "samples nan": (lambda m: _set(m, ["base", "samples", "data"], base64.b64encode(b"\x00\xc0\x7f" * 768).decode()), None,
                    "corrupt metadata.*base.samples contains NaN or Inf"),
    "samples budget": (lambda m: _set(m, ["base", "samples", "budget"], 1 << 20), None, "budget 1048576 .* is invalid"),
    "samples missing": (lambda m: _set(m, ["base", "samples", "missing"], ["rogue"]), None, "'missing' must list adapted modules"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_every_validation_error_names_file_and_fault(good_file, tmp_path, case):
    mutate_meta, mutate_tensors, pattern = BAD_CASES[case]
    bad = _rewrite(good_file, tmp_path / f"bad_{case.replace(' ', '_')}.safetensors", mutate_meta, mutate_tensors)
    with pytest.raises(AdapterError, match=pattern) as err:
        read_adapter(bad)
    assert bad.name in str(err.value)


def test_unknown_sample_rule_reads_without_samples(good_file, tmp_path):
    """A later verakit's sampling rule is not refused: this one just cannot compare the base weights."""
    newer = _rewrite(good_file, tmp_path / "newer.safetensors", lambda m: _set(m, ["base", "samples", "rule"], "v9"))
    assert read_adapter(newer).samples is None and read_adapter(good_file).samples is not None


def test_not_safetensors_truncated_and_foreign(good_file, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        read_adapter(junk)
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="truncated or corrupt header"):
        read_adapter(junk)
    data = good_file.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 10])
    with pytest.raises(AdapterError, match="truncated: tensor"):
        read_adapter(trunc)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(AdapterError, match="not a verakit adapter"):
        read_adapter(foreign)
    with pytest.raises(AdapterError, match="no such adapter file"):
        read_adapter(tmp_path / "missing.safetensors")
    assert FORMAT_NAME == "verakit.adapter"


def test_fingerprint_mismatch_names_module_and_shapes(good_file, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=64,
                                                     num_attention_heads=2, vocab_size=99, num_labels=3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterError, match=r"module 'bert.encoder.layer.0.attention.self.query' has shape \(32, 32\) in the adapter but \(48, 48\)"):
        load_adapter(other, good_file)
    # the model is left exactly as it was
    assert getattr(other, "verakit_state", None) is None
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def _another(model):
    """Another instance of the fixture's checkpoint (seed 0, as conftest builds it): the base weights match."""
    torch.manual_seed(0)
    return type(model)(model.config).eval()


def test_load_into_attached_model_checks_config(good_file, tiny_bert_clf):
    other = attach(_another(tiny_bert_clf), VeraConfig(r=8))
    with pytest.raises(AdapterError, match="r=8 but the adapter 4"):
        load_adapter(other, good_file)


def test_load_into_attached_model_copies_vectors(good_file, tiny_bert_clf):
    other = attach(_another(tiny_bert_clf), VeraConfig(r=4))
    load_adapter(other, good_file)
    ad = read_adapter(good_file)
    for n, layer in vera_layers(other).items():
        assert torch.equal(layer.vera_d, ad.d[n]) and torch.equal(layer.vera_b, ad.b[n])


def test_atomic_write_keeps_old_file_on_failure(good_file, monkeypatch):
    old = good_file.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(good_file, b"new content that must not land")
    assert good_file.read_bytes() == old
    assert sorted(p.name for p in good_file.parent.iterdir() if p.name.endswith(".tmp")) == []


def test_save_refuses_nan(tiny_bert_clf, tmp_path):
    model = _trained(tiny_bert_clf, VeraConfig(r=4))
    with torch.no_grad():
        next(iter(vera_layers(model).values())).vera_b[0] = float("nan")
    with pytest.raises(AdapterError, match="non-finite"):
        save_adapter(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# sha256 of the file below as verakit wrote it before format version 2 (commit c4839a7, verakit_version pinned):
# its verakit metadata string, tensor index (key order aside) and data section. The raw bytes also hold
# safetensors' metadata map, whose key order varies from process to process, so they are not compared whole.
_LINEAR_V1_SHA256 = (
    "60b95d801e19197507270a131885be68a71ad425d82ff943cc3ca27de943b7f4",
    "aa45752d4787f6de7025e14b7127a7f11f0d26228daf8deae66930b9e320afde",
    "d54cf991ba0f22aa9222b63675c19f8ea9e4bcc7d30db28ec6b863943bcb74be",
)


def test_linear_only_adapters_keep_version_1_bytes(tmp_path, monkeypatch):
    """Adding convolution/embedding kinds (format version 2) leaves linear-only files as they were, so
    verakit versions that read 1..1 keep reading them (base-weight samples aside, which they ignore)."""
    import hashlib

    from torch import nn

    monkeypatch.setattr("verakit.fileformat.__version__", "0.0.0")
    torch.manual_seed(0)
    model = attach(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), VeraConfig(r=4, target_modules=("0", "2")))
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.copy_(torch.arange(layer.vera_b.numel()) / 8.0)
    path = tmp_path / "linear.safetensors"
    save_adapter(model, path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert meta["format"] == FORMAT_NAME
    # The base-weight samples came later, as one more key of "base" that version-1 readers ignore: without
    # it, the metadata string is the one pinned above.
    inner = json.loads(meta["verakit"])
    assert inner["format_version"] == 1 and set(inner["base"].pop("samples")) == {"rule", "budget", "quant", "missing", "data"}
    old_meta = json.dumps(inner, separators=(",", ":"))
    got = (old_meta.encode(), json.dumps(header, sort_keys=True).encode(), data[8 + n :])
    assert tuple(hashlib.sha256(part).hexdigest() for part in got) == _LINEAR_V1_SHA256


def test_unknown_module_kind_is_refused(good_file, tmp_path):
    from test_conv import rewrite_meta

    bad = rewrite_meta(good_file, tmp_path / "bad.safetensors",
                       lambda m: m["base"]["modules"]["bert.encoder.layer.0.attention.self.query"].__setitem__(2, "lstm"))
    with pytest.raises(AdapterError, match="bad.safetensors: module 'bert.encoder.layer.0.attention.self.query': unknown module kind 'lstm'"):
        read_adapter(bad)


# ---------------------------------------------------------------- DVoRA (config.magnitude): `<module>.vera_m`


def _dvora_file(tiny_llama, tmp_path, dtype=None):
    import copy

    base = copy.deepcopy(tiny_llama)
    model = _trained(tiny_llama, VeraConfig(r=8, target_modules="all-linear", magnitude=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_m.mul_(1 + 0.3 * torch.randn(layer.vera_m.shape, generator=g))
    path = tmp_path / "dvora.safetensors"
    save_adapter(model, path, dtype=dtype)
    return model, base, path


def test_dvora_round_trip_gives_identical_outputs(tiny_llama, tmp_path):
    from verakit import trainable_parameters

    model, base, path = _dvora_file(tiny_llama, tmp_path)
    assert sum(n.endswith(".vera_m") for n, p in trainable_parameters(model) if p.requires_grad) == 14
    ad = read_adapter(path)
    assert ad.config.magnitude and set(ad.m) == set(ad.modules)
    assert all(torch.equal(ad.m[n], ly.vera_m.detach()) for n, ly in vera_layers(model).items())
    x = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        plain = base(x).logits
    fresh = load_adapter(base, path)
    with torch.no_grad():
        want, got = model(x).logits, fresh(x).logits
    assert torch.equal(got, want) and (want - plain).abs().max() > 0.1  # m moved the outputs visibly
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["verakit"])["format_version"] == 3


def test_dvora_magnitudes_stay_float32_in_a_bf16_file(tiny_llama, tmp_path):
    _, _, path = _dvora_file(tiny_llama, tmp_path, dtype=torch.bfloat16)
    tensors = load_file(path)
    assert {t.dtype for k, t in tensors.items() if k.endswith(".vera_m")} == {torch.float32}
    assert {t.dtype for k, t in tensors.items() if k.endswith((".vera_d", ".vera_b"))} == {torch.bfloat16}


M = "model.layers.1.self_attn.v_proj.vera_m"  # (32,): v_proj has 2 KV heads of 16
DVORA_CASES = {
    "missing m": (None, lambda t: t.pop(M), f"missing tensor.*{M}"),
    "wrong shape": (None, lambda t: t.update({M: torch.ones(5)}), rf"'{M}' has shape \(5,\), expected \(32,\)"),
    "nan": (None, lambda t: t[M].fill_(float("nan")), f"{M}.*NaN or Inf"),
    "version 2": (lambda m: _set(m, ["format_version"], 2), None, "config.magnitude \\(DVoRA\\) needs format version 3, the file says 2"),
    "m without magnitude": (lambda m: m["config"].pop("magnitude"), None,
                            "tensor '.*vera_m' is a DVoRA magnitude, but the file's config.magnitude is false"),
}


@pytest.mark.parametrize("case", list(DVORA_CASES))
def test_bad_dvora_files_are_refused_naming_the_fault(tiny_llama, tmp_path, case):
    mutate_meta, mutate_tensors, pattern = DVORA_CASES[case]
    _, _, path = _dvora_file(tiny_llama, tmp_path)
    bad = _rewrite(path, tmp_path / "bad.safetensors", mutate_meta, mutate_tensors)
    with pytest.raises(AdapterError, match=pattern) as err:
        read_adapter(bad)
    assert "bad.safetensors" in str(err.value)


def test_truncated_dvora_file_and_older_readers(tiny_llama, tmp_path, monkeypatch):
    _, base, path = _dvora_file(tiny_llama, tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-6])  # the last tensor in the data section is cut short
    with pytest.raises(AdapterError, match="cut.safetensors: truncated: tensor"):
        read_adapter(cut)
    plain = attach(base, VeraConfig(r=8, target_modules="all-linear"))
    with pytest.raises(AdapterError, match="the model's VeRA has magnitude=False but the adapter True"):
        load_adapter(plain, path)
    monkeypatch.setattr("verakit.fileformat.FORMAT_VERSION", 2)  # a reader from before DVoRA
    with pytest.raises(AdapterError, match=r"unknown format version 3 \(this verakit reads 1..2\)"):
        read_adapter(path)


def test_load_into_evaluated_model_drops_the_cached_weight(tiny_llama, tmp_path):
    """docs/performance.md: load_adapter invalidates the cached W0 + delta of an already-attached model, so
    its next gradient-free call is the new adapter's, not the old one's."""
    fresh = _another(tiny_llama)
    attach(tiny_llama, VeraConfig(r=16))
    paths = []
    for seed in (0, 1):
        randomize_vectors(tiny_llama, seed=seed)
        paths.append(tmp_path / f"{seed}.safetensors")
        save_adapter(tiny_llama, paths[-1])
    ids = torch.randint(0, tiny_llama.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        load_adapter(tiny_llama, paths[0])
        with_a = tiny_llama(input_ids=ids).logits  # 256 tokens: every layer builds W0 + delta
        assert all(ly._cache is not None and ly._cache.weight is not None for ly in vera_layers(tiny_llama).values())
        load_adapter(tiny_llama, paths[1])
        with_b = tiny_llama(input_ids=ids).logits
        want = load_adapter(fresh, paths[1])(input_ids=ids).logits
    torch.testing.assert_close(with_b, want, rtol=0, atol=1e-6)
    assert (with_b - with_a).abs().max() > 1e-2

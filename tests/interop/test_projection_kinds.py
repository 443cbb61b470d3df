"""Core support for non-default projection kinds ("peft-torch", "explicit"): config, attach, files, merge."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import randomize_vectors
from verakit import (
    AdapterError,
    AttachError,
    ConfigError,
    VeraConfig,
    attach,
    load_adapter,
    read_adapter,
    save_adapter,
)
from verakit.inject import vera_layers, vera_state
from verakit.merge import adapter_deltas, merged_state_dict
from verakit.projection import Projection, peft_torch_tables


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tables(r=8, max_in=96, max_out=96, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, max_in, generator=g) * 0.2, torch.randn(max_out, r, generator=g) * 0.2


def _clone(model):
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"projection_kind": "mt19937"}, "projection_kind must be one of"),
        ({"projection_kind": "explicit", "projection_sharing": "unique"}, "needs projection_sharing='shared'"),
        ({"projection_kind": "peft-torch", "distribution": "kaiming_normal"}, "Kaiming-uniform only"),
    ],
)
def test_config_validates_projection_kind(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        VeraConfig(**kwargs)


def test_config_dict_omits_default_kind_and_round_trips_others():
    assert "projection_kind" not in VeraConfig(r=4).to_dict()
    assert VeraConfig.from_dict(VeraConfig(r=4).to_dict()).projection_kind == "philox4x32-10"
    cfg = VeraConfig(r=4, projection_kind="explicit")
    assert cfg.to_dict()["projection_kind"] == "explicit" and VeraConfig.from_dict(cfg.to_dict()) == cfg


def test_peft_torch_tables_match_peft_generator():
    from peft.tuners.vera.model import _kaiming_init

    g = torch.Generator(device="cpu").manual_seed(1234)
    want_a = _kaiming_init((16, 40), generator=g)
    want_b = _kaiming_init((72, 16), generator=g)
    A, B = peft_torch_tables(1234, 16, 40, 72)
    assert torch.equal(A, want_a) and torch.equal(B, want_b)
    # bound sqrt(6 / fan_in): Kaiming-uniform with gain sqrt(2), as the installed PEFT source computes it
    assert A.abs().max() <= (6 / 40) ** 0.5 and A.abs().max() > 0.9 * (6 / 40) ** 0.5
    p = Projection.peft_torch(1234, 16, 40, 72)
    assert p.kind == "peft-torch" and p.scale(40, 16) == 1.0 and torch.equal(p.B, B)


def test_from_tables_layer_matches_slow_reference(tiny_llama):
    A, B = _tables()
    proj = Projection.from_tables(A, B)
    attach(tiny_llama, VeraConfig(r=8, target_modules=("q_proj", "v_proj"), projection_kind="explicit"), projection=proj)
    randomize_vectors(tiny_llama)
    layer = vera_layers(tiny_llama)["model.layers.0.self_attn.v_proj"]  # (32, 64)
    assert layer.scale == 1.0 and vera_state(tiny_llama).projection is proj
    x = torch.randn(3, 64)
    ref = layer.base(x) + layer.vera_b * ((layer.vera_d * (x @ A[:, :64].T)) @ B[:32].T)
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_attach_checks_the_given_projection_and_leaves_model_untouched(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    cfg = VeraConfig(r=8, target_modules="all-linear", projection_kind="explicit")
    with pytest.raises(AttachError, match="needs the stored tables"):
        attach(tiny_llama, cfg)
    with pytest.raises(AttachError, match=r"too small for r=8 and the largest target shape \(96, 96\)"):
        attach(tiny_llama, cfg, projection=Projection.from_tables(*_tables(max_in=64)))
    with pytest.raises(AttachError, match="kind 'peft-torch' differs"):
        attach(tiny_llama, cfg, projection=Projection.peft_torch(0, 8, 96, 96))
    assert not hasattr(tiny_llama, "verakit_state")
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


def test_peft_torch_attach_uses_max_target_shapes(tiny_llama):
    attach(tiny_llama, VeraConfig(r=8, target_modules=("q_proj", "v_proj"), seed=7, projection_kind="peft-torch"))
    proj = vera_state(tiny_llama).projection
    want_a, want_b = peft_torch_tables(7, 8, 64, 64)  # q_proj (64, 64), v_proj (32, 64)
    assert (proj.max_in, proj.max_out) == (64, 64) and torch.equal(proj.A, want_a) and torch.equal(proj.B, want_b)


@pytest.mark.parametrize("kind", ["explicit", "peft-torch"])
def test_file_round_trip_and_merge(tiny_llama, tmp_path, kind):
    base = _clone(tiny_llama)
    cfg = VeraConfig(r=8, target_modules="all-linear", projection_kind=kind, seed=5)
    proj = Projection.from_tables(*_tables()) if kind == "explicit" else None
    attach(tiny_llama, cfg, projection=proj)
    randomize_vectors(tiny_llama)
    path = tmp_path / "a.safetensors"
    save_adapter(tiny_llama, path, dtype=torch.bfloat16)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["verakit"])
        tables = {k: f.get_tensor(k) for k in keys if k.startswith("vera_projection.")}
    assert meta["config"]["projection_kind"] == kind
    assert (meta["projection"]["rank"], meta["projection"]["max_in"], meta["projection"]["max_out"]) == (8, 96, 96)
    if kind == "explicit":
        assert meta["projection"]["generator"] == "explicit"
        # tables stay float32 in a bf16 file, bit for bit
        assert torch.equal(tables["vera_projection.A"], proj.A) and tables["vera_projection.B"].dtype == torch.float32
    else:
        assert meta["projection"]["generator"] == "peft-torch/v1" and not tables

    ad = read_adapter(path)
    assert ad.projection is not None and ad.projection.kind == kind
    x = torch.randint(0, 101, (2, 7))
    fresh = load_adapter(_clone(base), ad)
    with torch.no_grad():
        # the bf16 vectors are the stored truth: compare against the source model loaded with them
        load_adapter(tiny_llama, ad)
        want = tiny_llama(x).logits
        assert torch.equal(fresh(x).logits, want)
        merged = _clone(base)
        merged.load_state_dict(merged_state_dict(base.state_dict(), ad))
        assert torch.allclose(merged(x).logits, want, atol=1e-5)
    deltas = adapter_deltas(ad)
    layer = vera_layers(fresh)["model.layers.1.mlp.down_proj"]
    assert torch.allclose(deltas["model.layers.1.mlp.down_proj"], layer.delta_weight(), atol=1e-7)


def test_load_refuses_different_tables(tiny_llama, tmp_path):
    cfg = VeraConfig(r=8, target_modules=("q_proj",), projection_kind="explicit")
    src = _clone(tiny_llama)
    attach(src, cfg, projection=Projection.from_tables(*_tables(max_in=64, max_out=64)))
    path = tmp_path / "a.safetensors"
    save_adapter(src, path)
    attach(tiny_llama, cfg, projection=Projection.from_tables(*_tables(max_in=64, max_out=64, seed=9)))
    with pytest.raises(AdapterError, match="projection tables differ"):
        load_adapter(tiny_llama, path)


def _rewrite(src, dst, meta_fn=None, tensor_fn=None):
    with safe_open(src, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["verakit"])
    if meta_fn:
        meta_fn(inner)
    if tensor_fn:
        tensor_fn(tensors)
    meta["verakit"] = json.dumps(inner)
    save_file(tensors, dst, metadata=meta)
    return dst


@pytest.mark.parametrize(
    "meta_fn,tensor_fn,pattern",
    [
        (None, lambda t: t.pop("vera_projection.B"), "missing tensor.*vera_projection.B"),
        (None, lambda t: t.update({"vera_projection.A": torch.zeros(8, 50)}),
         r"'vera_projection.A' is torch.float32 \(8, 50\), expected float32 \(8, 64\)"),
        (lambda m: m["projection"].update(max_in=10), None, r"too small for r=8 and the largest module \(64, 64\)"),
        (lambda m: m["projection"].pop("rank"), None, "projection needs rank, max_in, max_out"),
        (lambda m: m["projection"].update(generator="peft-torch/v1"), None, "contradicts projection_kind 'explicit'"),
    ],
)
def test_corrupt_explicit_files_name_the_fault(tiny_llama, tmp_path, meta_fn, tensor_fn, pattern):
    cfg = VeraConfig(r=8, target_modules=("q_proj",), projection_kind="explicit")
    attach(tiny_llama, cfg, projection=Projection.from_tables(*_tables(max_in=64, max_out=64)))
    good = tmp_path / "good.safetensors"
    save_adapter(tiny_llama, good)
    bad = _rewrite(good, tmp_path / "bad.safetensors", meta_fn, tensor_fn)
    with pytest.raises(AdapterError, match=pattern) as err:
        read_adapter(bad)
    assert "bad.safetensors" in str(err.value)


def _huge(m):
    from verakit.fileformat import base_fingerprint

    base = m["base"]
    for name in base["modules"]:  # in-features are metadata only: no tensor backs them
        base["modules"][name][1] = 1 << 30
    # A crafted file can carry a matching fingerprint: it is a hash of what the file itself lists.
    base["fingerprint"] = base_fingerprint(base["model_type"], {n: tuple(v) for n, v in base["modules"].items()})
    m["projection"].update(max_in=1 << 30)


@pytest.mark.parametrize(
    "meta_fn,pattern",
    [
        (lambda m: m["projection"].update(max_in=4096), r"is not PEFT's pair for r=8 and the largest module \(64, 64\)"),
        (lambda m: m["projection"].update(rank=512), "is not PEFT's pair"),
        (_huge, r"has d_in 1,073,741,824: rank 8 needs an A table of 8,589,934,592 elements, above the limit of 268,435,456"),
    ],
)
def test_peft_torch_files_cannot_ask_for_any_table_size(tiny_llama, tmp_path, meta_fn, pattern):
    attach(tiny_llama, VeraConfig(r=8, target_modules=("q_proj",), projection_kind="peft-torch"))
    good = tmp_path / "good.safetensors"
    save_adapter(tiny_llama, good)
    assert read_adapter(good).projection.kind == "peft-torch"
    bad = _rewrite(good, tmp_path / "bad.safetensors", meta_fn)
    with pytest.raises(AdapterError, match=pattern) as err:
        read_adapter(bad)
    assert "bad.safetensors" in str(err.value)


def test_philox_files_cannot_ask_for_any_table_size(tiny_llama, tmp_path):
    """The default kind too: a crafted d_in (metadata, with a matching fingerprint) is refused when the file is
    read, not when `verakit merge` or `convert` would generate an A table of that width from it."""
    from verakit.merge import adapter_deltas

    attach(tiny_llama, VeraConfig(r=8, target_modules=("q_proj",)))
    good = tmp_path / "good.safetensors"
    save_adapter(tiny_llama, good)
    assert len(adapter_deltas(read_adapter(good))) == len(read_adapter(good).modules)

    def wide(m):  # _huge's module widths, without its peft-torch max_in: a philox spec records no widths
        from verakit.fileformat import base_fingerprint

        base = m["base"]
        for name in base["modules"]:
            base["modules"][name][1] = 1 << 30
        base["fingerprint"] = base_fingerprint(base["model_type"], {n: tuple(v) for n, v in base["modules"].items()})

    bad = _rewrite(good, tmp_path / "bad.safetensors", wide)
    with pytest.raises(AdapterError, match=r"bad.safetensors.*has d_in 1,073,741,824: rank 8 needs an A table of "
                                           r"8,589,934,592 elements, above the limit"):
        read_adapter(bad)

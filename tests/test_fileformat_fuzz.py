"""Property tests of the adapter file reader: whatever the bytes, `read_adapter` returns a valid Adapter or
raises AdapterError naming the file, never another exception, never a hang, never memory beyond the file.

Three sources of bytes: arbitrary bytes; a real adapter file with bytes flipped, cut or inserted; and a
well-formed safetensors container whose verakit metadata is arbitrary JSON (where the parser's field
checks live). Every example is bounded in size and each read must finish within a deadline.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verakit import AdapterError, VeraConfig, attach, read_adapter, save_adapter
from verakit.fileformat import FORMAT_NAME, MAX_HEADER_BYTES, read_metadata

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                     vocab_size=50, max_position_embeddings=16, num_labels=2)
    model = attach(BertForSequenceClassification(cfg).eval(), VeraConfig(r=4))
    path = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    save_adapter(model, path)
    return path.read_bytes()


def _read(tmp_path, data: bytes):
    """read_adapter on `data`: the Adapter, or None after an AdapterError naming the file; anything else fails."""
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(data)
    start = time.monotonic()
    try:
        return read_adapter(path)
    except AdapterError as e:
        assert str(path) in str(e), str(e)
        return None
    finally:
        assert time.monotonic() - start < 2.0


def _assert_whole(adapter) -> None:
    """What read_adapter promises of an Adapter it returns: one d and one b per recorded module, shaped by
    the config's rank and the module's d_out, all finite."""
    assert set(adapter.d) == set(adapter.b) == set(adapter.modules) and adapter.modules
    for name, (d_out, _, _) in adapter.modules.items():
        assert adapter.d[name].shape == (adapter.config.r,) and adapter.b[name].shape == (d_out,)
        assert bool(adapter.d[name].isfinite().all()) and bool(adapter.b[name].isfinite().all())


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_are_refused_with_adapter_error(tmp_path, data):
    assert _read(tmp_path, data) is None  # random bytes are never a valid adapter


def _damage(good: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """`good` with each edit applied in turn: flip a byte, cut the rest off, or insert bytes."""
    data = bytearray(good)
    for kind, where, payload in edits:
        i = where % (len(data) + 1)
        if kind == "flip" and data:
            data[min(i, len(data) - 1)] ^= payload[0] or 1
        elif kind == "cut":
            del data[i:]
        else:
            data[i:i] = payload
    return bytes(data)


def _edits(min_size: int) -> st.SearchStrategy:
    return st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 1 << 20),
                              st.binary(min_size=1, max_size=8)), min_size=min_size, max_size=4)


@FUZZ
@given(edits=_edits(1))
def test_damaged_adapter_files_load_or_raise_adapter_error(tmp_path, good_bytes, edits):
    adapter = _read(tmp_path, _damage(good_bytes, edits))
    if adapter is not None:  # a flip inside a float, say: still a complete adapter of the same shape
        _assert_whole(adapter)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
META_KEYS = ["format_version", "config", "base", "saved", "projection", "extra", "dtype"]


@st.composite
def verakit_metadata(draw, good: dict) -> str:
    """The real file's metadata with some fields replaced by arbitrary JSON, or arbitrary JSON outright."""
    if draw(st.integers(0, 9)) == 0:
        return json.dumps(draw(JSON))
    meta = json.loads(json.dumps(good))
    for key in draw(st.lists(st.sampled_from(META_KEYS), min_size=1, max_size=3)):
        target = meta
        if key in ("config", "base") and draw(st.booleans()) and isinstance(meta.get(key), dict) and meta[key]:
            target, key = meta[key], draw(st.sampled_from(sorted(meta[key])))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(JSON)
    return json.dumps(meta)


def _container(good_bytes: bytes, metadata: str) -> bytes:
    """The good file's tensors with `metadata` as the verakit key (header re-encoded)."""
    n = struct.unpack("<Q", good_bytes[:8])[0]
    header = json.loads(good_bytes[8 : 8 + n])
    header["__metadata__"] = {"format": FORMAT_NAME, "verakit": metadata}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + good_bytes[8 + n :]


@FUZZ
@given(data=st.data())
def test_arbitrary_metadata_loads_or_raises_adapter_error(tmp_path, good_bytes, data):
    n = struct.unpack("<Q", good_bytes[:8])[0]
    good = json.loads(json.loads(good_bytes[8 : 8 + n])["__metadata__"]["verakit"])
    adapter = _read(tmp_path, _container(good_bytes, data.draw(verakit_metadata(good))))
    if adapter is not None:  # e.g. only "extra" replaced: the tensors still match what the metadata says
        _assert_whole(adapter)


@FUZZ
@given(edits=_edits(0))
def test_read_metadata_agrees_with_safetensors_safe_open(tmp_path, good_bytes, edits):
    """read_metadata (plain reads, no mmap) against safetensors' own reader on damaged copies of a real file:
    every file safe_open reads gives the same metadata; any other outcome is an AdapterError naming the file."""
    from safetensors import safe_open

    path = tmp_path / "damaged.safetensors"
    path.write_bytes(_damage(good_bytes, edits))
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = f.metadata() or {}
    except Exception:  # safetensors refuses it: read_metadata may still read the header (it checks less)
        expected = None
    try:
        got = read_metadata(path)
    except AdapterError as e:
        assert str(path) in str(e) and expected is None, (str(e), expected)
        return
    assert expected is None or got == expected
    if not edits:
        assert got == expected and got["format"] == FORMAT_NAME


def test_header_length_over_the_cap_is_refused_before_reading_it(tmp_path):
    """The 8-byte prefix may claim any size; a claim over MAX_HEADER_BYTES is refused, naming file and limit,
    even when the file really is that long (the JSON is never parsed)."""
    path = tmp_path / "huge.safetensors"
    n = MAX_HEADER_BYTES + 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n)  # sparse: the header bytes exist without taking disk space
    for read in (read_adapter, read_metadata):
        with pytest.raises(AdapterError, match=rf"{path}: .*header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES}"):
            read(path)
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")  # a claim beyond the file: refused as truncated
    for read in (read_adapter, read_metadata):
        with pytest.raises(AdapterError, match=rf"{path}: truncated or corrupt header: header claims {2**64 - 1} bytes"):
            read(path)


@pytest.mark.parametrize("where", ["header", "metadata"])
def test_json_nested_deeper_than_the_parser_stack_is_a_corrupt_file(tmp_path, where):
    deep = "[" * 200_000 + "]" * 200_000
    header = deep if where == "header" else json.dumps({"__metadata__": {"format": FORMAT_NAME, "verakit": deep}})
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(AdapterError, match=rf"{path}: .*RecursionError"):
        read_adapter(path)

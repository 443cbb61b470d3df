"""Adapter files: one .safetensors file of vectors and JSON metadata, validated on read, written atomically.

Tensors: `<module>.vera_d` (r), `<module>.vera_b` (d_out) for every adapted module (and `<module>.vera_m`
(d_out), float32, for DVoRA adapters: VeraConfig.magnitude), and the state-dict
tensors of each module to save under their model names (e.g. `classifier.weight`). The projections are
not stored by default: they are regenerated from the seed. Only adapters imported with a projection that
cannot be regenerated (VeraConfig.projection_kind "explicit", e.g. from PEFT) store the shared tables, as
`vera_projection.A` / `vera_projection.B` in float32. Metadata key `verakit` holds JSON, with samples of the
base weights (`fingerprint`) that loading compares with the model's; see docs/format.md.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .atomic import atomic_write_bytes  # public here too: callers have always imported it from this module
from .config import PROJECTION_KINDS, ConfigError, VeraConfig
from .fileprojection import TABLE_KEYS, projection_from_file, projection_meta
from .fingerprint import BaseSamples, base_fingerprint, compare, model_mismatch, sample_layers
from .inject import VeraState, attach, detach, layer_class, vera_state
from .projection import GENERATOR, GENERATORS, MAX_PROJECTION_ELEMENTS, Projection

__all__ = [
    "AdapterError",
    "BaseMismatchError",
    "Adapter",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "read_metadata",
    "adapter_from_model",
    "write_adapter",
    "base_fingerprint",
    "atomic_write_bytes",
]

FORMAT_NAME = "verakit.adapter"
# Version 2 added the module kinds of convolutions and embeddings ("conv:3x3", "embedding"), which a version-1
# reader would take for linear layers. Files whose modules are all linear are still written as version 1,
# byte for byte as before, so older readers keep reading them. Version 3 added DVoRA's magnitude tensors
# (VeraConfig.magnitude), which a version-2 reader would drop; only DVoRA files are written as version 3.
# DVoRA on convolutions and embeddings needs no new version: m is d_out long for every kind, and a reader
# from before it refuses such a file by name ("DVoRA adapts linear layers only"), never misreads it.
FORMAT_VERSION = 3
_V1_KINDS = ("linear", "conv1d")
# MAX_PROJECTION_ELEMENTS (from `projection`): a module's d_in, a "peft-torch" pair's widths and an embedding's
# vocabulary are metadata no tensor backs, so a crafted file could ask for any table size: refused above it.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# Largest safetensors header (the JSON after the 8-byte length prefix) a reader accepts. An adapter's header
# lists its tensors and metadata: tens of KiB even for every linear layer of a 100-layer model, so 16 MiB
# refuses nothing real, while the JSON parser's memory stays bounded whatever a file's prefix claims.
MAX_HEADER_BYTES = 16 << 20


class AdapterError(ValueError):
    """An adapter file or object is unusable; the message names the file and the fault."""


class BaseMismatchError(AdapterError):
    """The model's base weights are not the ones the adapter was trained on (`load_adapter(check_base=...)`)."""


@dataclass(frozen=True)
class Adapter:
    """The content of an adapter file, usable without a model.

    modules: adapted module name -> (d_out, d_in, kind): kind "linear", "conv1d" (weight transposed),
        "conv:KxK" (torch's convolutions, d_in = C_in/groups * prod(kernel)) or "embedding[:pad=i]"
        ((d_out, d_in) = (embedding_dim, num_embeddings)); docs/format.md, "Layer kinds".
    d, b: module name -> vector. saved: model state-dict key -> tensor of the modules to save.
    projection: the shared pair when config.projection_kind is not the default (PEFT-generated or
        stored tables, already scaled); None when it is regenerated from the seed.
    samples: samples of the base weights it was trained on (`fingerprint.BaseSamples`); None for files
        written before they existed, and adapters built without a model.
    m: module name -> DVoRA magnitude (d_out,) float32 when config.magnitude, else empty.
    """

    config: VeraConfig
    model_type: str | None
    architecture: str
    modules: dict[str, tuple[int, int, str]]
    d: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    saved: dict[str, torch.Tensor]
    extra: dict[str, Any]
    dtype: str = "F32"
    path: str | None = None
    projection: Projection | None = None
    samples: BaseSamples | None = None
    m: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return base_fingerprint(self.model_type, self.modules)

    @property
    def trained_numel(self) -> int:
        return sum(t.numel() for t in (*self.d.values(), *self.b.values(), *self.m.values(), *self.saved.values()))


def _fail(path: str | os.PathLike[str] | None, msg: str) -> AdapterError:
    return AdapterError(f"{path if path is not None else '<adapter>'}: {msg}")


def adapter_from_model(model: nn.Module, extra: dict[str, Any] | None = None) -> Adapter:
    """Snapshot a model's VeRA vectors and saved modules as an `Adapter` (fp32 copies)."""
    state: VeraState = vera_state(model)
    modules = {n: (ly.out_features, ly.in_features, ly.kind) for n, ly in state.layers.items()}
    d = {n: ly.vera_d.detach().float().cpu().clone() for n, ly in state.layers.items()}
    b = {n: ly.vera_b.detach().float().cpu().clone() for n, ly in state.layers.items()}
    m = {n: ly.vera_m.detach().float().cpu().clone() for n, ly in state.layers.items() if getattr(ly, "vera_m", None) is not None}
    saved = {}
    for s in state.saved_modules:
        for k, t in model.get_submodule(s).state_dict().items():
            saved[f"{s}.{k}"] = t.detach().cpu().clone()
    info = dict(extra or {})
    cfg = getattr(model, "config", None)
    if state.saved_modules and getattr(cfg, "id2label", None) and "labels" not in info:
        info["labels"] = [cfg.id2label[i] for i in sorted(cfg.id2label)]
    proj = state.projection if state.config.projection_kind != PROJECTION_KINDS[0] else None
    return Adapter(state.config, state.model_type, state.architecture, modules, d, b, saved, info, projection=proj,
                   samples=sample_layers(state.layers, state.base_samples), m=m)


def write_adapter(adapter: Adapter, path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> int:
    """Write `adapter` to `path` atomically; returns the file size in bytes."""
    from safetensors.torch import save

    dtype = dtype or torch.float32
    if dtype not in _DTYPE_NAMES:
        raise AdapterError(f"unsupported adapter dtype {dtype}; use one of float32, float16, bfloat16")
    tensors: dict[str, torch.Tensor] = {}
    for n in adapter.modules:
        tensors[f"{n}.vera_d"] = adapter.d[n].to(dtype).contiguous()
        tensors[f"{n}.vera_b"] = adapter.b[n].to(dtype).contiguous()
        if n in adapter.m:  # float32 whatever `dtype`: m scales the whole row, W0 included
            tensors[f"{n}.vera_m"] = adapter.m[n].float().contiguous()
    if set(adapter.m) != (set(adapter.modules) if adapter.config.magnitude else set()):
        raise _fail(path, f"config.magnitude is {adapter.config.magnitude} but the adapter has magnitudes for "
                          f"{len(adapter.m)} of its {len(adapter.modules)} modules")
    for k, t in adapter.saved.items():
        tensors[k] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    try:
        proj_meta, tables = projection_meta(adapter.config, adapter.projection)
    except ValueError as e:
        raise _fail(path, str(e)) from None
    tensors.update(tables)
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(path, f"refusing to save non-finite values in tensor {k!r}")
    meta = {
        "format": FORMAT_NAME,
        "format_version": _version_needed(adapter.config, adapter.modules),
        "verakit_version": __version__,
        "config": adapter.config.to_dict(),
        "projection": proj_meta,
        "base": {
            "model_type": adapter.model_type,
            "architecture": adapter.architecture,
            "modules": {n: list(v) for n, v in adapter.modules.items()},
            "fingerprint": adapter.fingerprint,
            **({"samples": adapter.samples.to_meta(adapter.modules)} if adapter.samples is not None else {}),
        },
        "saved": sorted(adapter.saved),
        "dtype": _DTYPE_NAMES[dtype],
        "extra": adapter.extra,
    }
    data = save(tensors, metadata={"format": FORMAT_NAME, "verakit": json.dumps(meta, separators=(",", ":"))})
    atomic_write_bytes(path, data)
    return len(data)


def _version_needed(config: VeraConfig, modules: dict[str, tuple[int, int, str]]) -> int:
    """The lowest format version that holds the file: older readers keep reading what they can."""
    return 3 if config.magnitude else 1 if all(v[2] in _V1_KINDS for v in modules.values()) else 2


def save_adapter(
    model: nn.Module, path: str | os.PathLike[str], dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None
) -> int:
    """Save the model's VeRA vectors (and modules to save) to one file; returns its size in bytes."""
    return write_adapter(adapter_from_model(model, extra), path, dtype)


def _read_header(path: Path, data: bytes, size: int | None = None) -> dict[str, Any]:
    """The header of a file of `size` bytes (default len(data)) whose first bytes, header included, are `data`."""
    size = len(data) if size is None else size
    if size < 8:
        raise _fail(path, f"not a safetensors file: only {size} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8:
        raise _fail(path, f"truncated or corrupt header: header claims {n} bytes, file has {size - 8} after it")
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"safetensors header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes "
                          "(verakit.fileformat.MAX_HEADER_BYTES)")
    if len(data) < 8 + n:  # the file shrank between its size and its read: rewritten in place meanwhile
        raise _fail(path, f"truncated while being read: header claims {n} bytes, {len(data) - 8} could be read")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"not a safetensors file: header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file: header is not a JSON object")
    body = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict) or not isinstance(v.get("data_offsets"), list) or len(v["data_offsets"]) != 2:
            raise _fail(path, f"corrupt header: entry {k!r} is not a tensor description")
        end = v["data_offsets"][1]
        if not isinstance(end, int) or end > body:
            raise _fail(path, f"truncated: tensor {k!r} ends at byte {end} but the data section has {body} bytes")
    return header


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A safetensors file's `__metadata__`, its header checked as read_adapter checks it, read with plain reads
    of the header alone. Not safetensors' safe_open, which memory-maps the file: a concurrent in-place rewrite
    (truncate, then write, as `cp` does) turns its header read into SIGBUS, killing the whole process, a
    server included (a reader looping safe_open().metadata() against such rewrites died within seconds)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(8)
            if len(data) == 8:
                data += f.read(min(int.from_bytes(data, "little"), MAX_HEADER_BYTES))
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    meta = _read_header(path, data, size).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "corrupt header: __metadata__ is not a JSON object of strings")
    return meta


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read and validate an adapter file without a model. Raises AdapterError naming file and fault."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such adapter file")
    data = path.read_bytes()
    header = _read_header(path, data)
    raw_meta = header.get("__metadata__") or {}
    if not isinstance(raw_meta, dict):
        raise _fail(path, "corrupt header: __metadata__ is not a JSON object")
    if raw_meta.get("format") != FORMAT_NAME or "verakit" not in raw_meta:
        raise _fail(path, f"not a verakit adapter (metadata format is {raw_meta.get('format')!r})")
    try:
        meta = json.loads(raw_meta["verakit"])
        version = meta["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise _fail(path, f"unknown format version {version!r} (this verakit reads 1..{FORMAT_VERSION})")
        config = VeraConfig.from_dict(meta["config"])
        base = meta["base"]
        modules = {str(n): (int(v[0]), int(v[1]), str(v[2])) for n, v in base["modules"].items()}
        saved_keys = list(meta["saved"])
        if not all(isinstance(k, str) for k in saved_keys):
            raise _fail(path, "corrupt metadata: 'saved' must list tensor names")
        proj = dict(meta["projection"])
        info = dict(meta.get("extra") or {})
        model_type, architecture = base.get("model_type"), str(base.get("architecture", ""))
        fingerprint, dtype = base.get("fingerprint"), str(meta.get("dtype", "F32"))
        samples = BaseSamples.from_meta(base["samples"], modules) if "samples" in base else None
    except AdapterError:
        raise
    # Any JSON can sit in the metadata: a wrong type anywhere (a list for an object, a float for an int, a
    # nesting deeper than the parser's stack) is a corrupt file, never another exception.
    except (ConfigError, KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        raise _fail(path, f"corrupt metadata: {type(e).__name__}: {e}") from None
    if proj.get("generator") not in GENERATORS.values():
        raise _fail(path, f"unknown projection generator {proj.get('generator')!r} (this verakit has {GENERATOR})")
    if proj.get("generator") != GENERATORS[config.projection_kind]:
        raise _fail(
            path, f"projection generator {proj.get('generator')!r} contradicts projection_kind {config.projection_kind!r}"
        )
    if base_fingerprint(model_type, modules) != fingerprint:
        raise _fail(path, "corrupt metadata: base fingerprint does not match the listed modules")
    _check_kinds(path, version, config, modules)
    for k, v in header.items():
        if k != "__metadata__" and v.get("dtype") not in _DTYPES and k not in saved_keys:
            raise _fail(path, f"tensor {k!r} has unsupported dtype {v.get('dtype')} (want F32, F16 or BF16)")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type for corrupt payloads
        raise _fail(path, f"corrupt tensor data: {e}") from None
    vectors = ("vera_d", "vera_b", "vera_m") if config.magnitude else ("vera_d", "vera_b")
    stray = sorted(k for k in tensors if k.endswith(".vera_m") and k not in saved_keys and not config.magnitude)
    if stray:
        raise _fail(path, f"tensor {stray[0]!r} is a DVoRA magnitude, but the file's config.magnitude is false")
    expected = {f"{n}.{v}" for n in modules for v in vectors} | set(saved_keys)
    if config.projection_kind == "explicit":
        expected |= set(TABLE_KEYS)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise _fail(path, f"missing tensor(s): {', '.join(missing[:5])}")
    if extra:
        raise _fail(path, f"unexpected tensor(s): {', '.join(extra[:5])}")
    d, b, m = {}, {}, {}
    for n, (d_out, _, _) in modules.items():
        for name, want, store in (("vera_d", config.r, d), ("vera_b", d_out, b), ("vera_m", d_out, m)):
            if name == "vera_m" and not config.magnitude:
                continue
            t = tensors[f"{n}.{name}"]
            if tuple(t.shape) != (want,):
                raise _fail(path, f"tensor '{n}.{name}' has shape {tuple(t.shape)}, expected ({want},)")
            store[n] = t.float()
    saved = {k: tensors[k] for k in saved_keys}
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(path, f"tensor {k!r} contains NaN or Inf")
    try:
        projection = projection_from_file(config, proj, tensors, modules)
    except ValueError as e:
        raise _fail(path, str(e)) from None
    return Adapter(
        config, model_type, architecture, modules, d, b, saved, info, dtype, str(path), projection, samples, m,
    )


def _check_kinds(path: Path, version: int, config: VeraConfig, modules: dict[str, tuple[int, int, str]]) -> None:
    """Every module's kind is known and consistent with its shape and its file's version; tables stay bounded.
    (A DVoRA magnitude's length is each module's d_out, whatever its kind: checked with the tensors.)"""
    for n, (d_out, d_in, kind) in modules.items():
        if d_out < 1 or d_in < 1:
            raise _fail(path, f"corrupt metadata: module {n!r} has shape ({d_out}, {d_in})")
        try:
            layer_class(kind, d_out, d_in)
        except ValueError as e:
            raise _fail(path, f"module {n!r}: {e}") from None
        if version < 2 and kind not in _V1_KINDS:
            raise _fail(path, f"module {n!r} has kind {kind!r}, which format version {version} does not have")
    if config.magnitude and version < 3:
        raise _fail(path, f"config.magnitude (DVoRA) needs format version 3, the file says {version}")
    emb = [n for n, v in modules.items() if v[2].startswith("embedding")]
    need = config.r * (max(v[1] for v in modules.values()) + max(v[0] for v in modules.values())) if modules else 0
    if emb and need > MAX_PROJECTION_ELEMENTS:
        raise _fail(path, f"embedding {emb[0]!r} needs projection tables of {need:,} elements, above the limit of "
                          f"{MAX_PROJECTION_ELEMENTS:,} (verakit.projection.MAX_PROJECTION_ELEMENTS)")
    # d_in of any kind is metadata no tensor backs (b backs d_out, d backs r); merge / convert build A from it
    for n, (_, d_in, _) in modules.items():
        if config.r * d_in > MAX_PROJECTION_ELEMENTS:
            raise _fail(path, f"module {n!r} has d_in {d_in:,}: rank {config.r} needs an A table of {config.r * d_in:,} "
                              f"elements, above the limit of {MAX_PROJECTION_ELEMENTS:,} (projection.MAX_PROJECTION_ELEMENTS)")


def _check_base(model: nn.Module, adapter: Adapter, where: str | None) -> None:
    """Compare the model's base weights with the adapter's samples (docs/format.md, "Base-weight samples")."""
    result = None if adapter.samples is None else compare(adapter.samples, vera_state(model).layers)
    if result is None or result.samples == 0:  # warnings' registry shows it once per file and call site
        why = ("records no samples of its base weights (written by verakit before they existed, or built without a "
               "model)" if result is None else "has base-weight samples, but this model's weights cannot be read here")
        warnings.warn(f"{where or '<adapter>'}: {why}: only module names and shapes were checked", stacklevel=3)
        return
    if result.failed:
        base = adapter.extra.get("model") or adapter.architecture or "its base model"
        raise BaseMismatchError(
            f"{where or '<adapter>'}: base model mismatch: the adapter was trained on {base}, but this "
            f"{type(model).__name__}'s weights differ from the ones it was trained on: {result.describe()}. "
            "Load it into that base, or pass check_base=False (verakit eval/generate/merge/serve: --no-base-check) "
            "to load it anyway"
        )


def load_adapter(
    model: nn.Module, path_or_adapter: str | os.PathLike[str] | Adapter, *, check_base: bool = True
) -> nn.Module:
    """Load an adapter into `model` (attaching VeRA from the file's config if needed); returns the model.

    On any mismatch the model is left as it was and AdapterError names the first difference. check_base:
    compare the model's base weights with the samples the file records (BaseMismatchError when they are
    another checkpoint's; casts to fp32/bf16/fp16 of the same one pass); False checks names and shapes only.
    """
    adapter = path_or_adapter if isinstance(path_or_adapter, Adapter) else read_adapter(path_or_adapter)
    where = adapter.path
    attached_here = getattr(model, "verakit_state", None) is None
    if attached_here:
        try:
            attach(model, adapter.config, projection=adapter.projection)
        except ValueError as e:
            raise _fail(where, f"cannot attach to {type(model).__name__}: {e}") from None
    try:
        fault = model_mismatch(model, vera_state(model), adapter.modules, adapter.config, adapter.projection,
                               adapter.saved)
        if fault:
            raise _fail(where, fault)
        state = vera_state(model)
        if any(layer.merged for layer in state.layers.values()):
            raise _fail(where, "the model's VeRA is merged; unmerge(model) before loading another adapter")
        if check_base:
            _check_base(model, adapter, where)
        for s in state.saved_modules:
            mine = model.get_submodule(s).state_dict()
            for k, t in mine.items():
                theirs = adapter.saved[f"{s}.{k}"]
                if theirs.shape != t.shape:
                    raise _fail(where, f"tensor '{s}.{k}' has shape {tuple(theirs.shape)}, the model's is {tuple(t.shape)}")
        with torch.no_grad():
            for n, layer in state.layers.items():
                layer.vera_d.copy_(adapter.d[n])
                layer.vera_b.copy_(adapter.b[n])
                if n in adapter.m:
                    layer.vera_m.copy_(adapter.m[n])
            for s in state.saved_modules:
                sub = {k[len(s) + 1 :]: v for k, v in adapter.saved.items() if k.startswith(s + ".")}
                model.get_submodule(s).load_state_dict(sub, strict=True)
    except BaseException:
        if attached_here:
            detach(model)
        raise
    return model


"""What each method's run leaves behind, and how to read it back: the trained artifact of RUN_DIR.

* ``vera``: adapter.safetensors, a verakit adapter file (`verakit.save_adapter`, run info in its metadata).
* ``lora`` / ``peft-vera``: adapter/, PEFT's own folder plus verakit.json (the run info).
* ``full`` / ``head``: trained.safetensors, every trained tensor with the run info in its metadata.

Writes are atomic (a file through `atomic_write_bytes`, a folder built beside its target and swapped in);
every reading error is an `ArtifactError` naming the path and what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import replacing_dir
from .methods import _UNSAVED_PROJECTION, PEFT_METHODS

__all__ = [
    "ArtifactError",
    "artifact_path",
    "artifact_bytes",
    "save_artifact",
    "read_artifact_info",
    "artifact_in",
    "recorded",
    "load_artifact",
    "warn_other_base",
]

_TRAINED_FORMAT = "verakit.trained"  # safetensors metadata "format" of full/head artifacts
_PEFT_INFO = "verakit.json"  # run info beside PEFT's files in a LoRA / PEFT VeRA artifact folder
# Artifacts that hold part of a model and nothing to recognise its base by (a verakit adapter file records
# base-weight samples that load_adapter checks; `full` saves every trained tensor, the whole model).
_UNCHECKED_BASE = ("lora", "peft-vera", "head")
log = logging.getLogger("verakit.train")


class ArtifactError(ValueError):
    """A trained artifact (adapter file, PEFT folder, trained tensors) is unusable; names the path."""


def artifact_path(method: str, run_dir: str | Path) -> Path:
    """Where `save_artifact` writes: adapter.safetensors (vera), adapter/ (lora, peft-vera), trained.safetensors."""
    run_dir = Path(run_dir)
    if method == "vera":
        return run_dir / "adapter.safetensors"
    if method in PEFT_METHODS:
        return run_dir / "adapter"
    return run_dir / "trained.safetensors"


def artifact_bytes(path: str | Path) -> int:
    """Bytes of the tensors file: the file itself, or a PEFT folder's adapter_model.safetensors."""
    path = Path(path)
    return (path / "adapter_model.safetensors").stat().st_size if path.is_dir() else path.stat().st_size


def save_artifact(method: str, model: nn.Module, run_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write the trained weights of `model` and the run `info` (task, labels, max_length...) atomically."""
    path = artifact_path(method, run_dir)
    info = {**info, "method": method}
    if method == "vera":
        from ..fileformat import save_adapter

        save_adapter(model, path, extra=info)
    elif method in PEFT_METHODS:
        _save_peft(model, path, info)
    else:
        from safetensors.torch import save

        from ..fileformat import atomic_write_bytes

        tensors = {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
        meta = {"format": _TRAINED_FORMAT, "verakit": json.dumps(info)}
        atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def _save_peft(model: nn.Module, path: Path, info: dict[str, Any]) -> None:
    # save_pretrained writes several files: build the folder beside the target, then swap it in, so a
    # crash never leaves a half-written adapter/ behind.
    with replacing_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / _PEFT_INFO).write_text(json.dumps(info, indent=2))


def read_artifact_info(path: str | Path) -> dict[str, Any]:
    """The run info stored with an artifact (includes "method"); raises ArtifactError naming the path."""
    path = Path(path)
    if path.is_dir():
        info_path = path / _PEFT_INFO
        if info_path.is_file() and (path / "adapter_config.json").is_file():
            try:
                info = json.loads(info_path.read_text())
            except ValueError as e:
                raise ArtifactError(f"{info_path}: not valid JSON ({e})") from None
            if not isinstance(info, dict):
                raise ArtifactError(f"{info_path}: not a JSON object of run info")
            return info
        peft_type = _peft_type(path)
        if peft_type == "LORA":  # saved by PEFT itself: no run info, so eval needs --task, --data-dir, --model
            return {"method": "lora"}
        if peft_type == "VERA":  # PEFT's own VeRA format: verakit reads it after one conversion
            raise ArtifactError(f"{path}: a PEFT VeRA folder, not a verakit artifact; convert it first with "
                                f"`verakit convert from-peft {path} ADAPTER.safetensors`")
        held = artifact_in(path)
        if held is not None:  # RUN_DIR (or a grouped run's adapters/) given where its artifact was meant
            raise ArtifactError(f"{path}: a run folder; pass its artifact, {held}")
        raise ArtifactError(f"{path}: not a verakit LoRA run folder (needs adapter_config.json and {_PEFT_INFO})")
    if not path.is_file():
        raise ArtifactError(f"{path}: no such adapter file or folder")
    fmt = _metadata(path).get("format")
    if fmt == "verakit.adapter":
        from ..fileformat import read_adapter

        # A file from `verakit.save_adapter` holds VeRA vectors whatever run info (if any) it was given.
        return {**read_adapter(path).extra, "method": "vera"}
    if fmt == _TRAINED_FORMAT:
        return json.loads(_metadata(path)["verakit"])
    raise ArtifactError(f"{path}: not a verakit artifact (safetensors metadata format is {fmt!r})")


def artifact_in(folder: Path) -> Path | None:
    """The artifact of a run folder given in its place (RUN_DIR/adapter.safetensors or trained.safetensors, else
    a grouped run's first adapter); None for a PEFT folder (adapter_config.json) or any other."""
    if (folder / "adapter_config.json").is_file():
        return None
    for name in ("adapter.safetensors", "trained.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return next(iter(sorted([*(folder / "adapters").glob("*.safetensors"), *folder.glob("*.safetensors")])), None)


def recorded(info: dict[str, Any], path: str | Path, key: str, given: Any, flags: str) -> Any:
    """`given` when set, else the run info's `key` (`info` read from the artifact at `path`); neither:
    an ArtifactError naming the artifact, what it lacks and the `flags` that supply it."""
    if given is not None:
        return given
    if info.get(key) is not None:
        return info[key]
    raise ArtifactError(f"{path}: no {key} recorded with this artifact (it was not saved by `verakit train`); "
                        f"pass {flags}")


def _peft_type(folder: Path) -> str | None:
    """The `peft_type` of a folder's adapter_config.json (None without a readable one)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def _metadata(path: Path) -> dict[str, str]:
    from ..fileformat import AdapterError, read_metadata

    try:
        return read_metadata(path)
    except AdapterError as e:  # it names the path already
        raise ArtifactError(f"not a safetensors file: {e}") from None


def load_artifact(path: str | Path, base: nn.Module, check_base: bool = True) -> nn.Module:
    """`base` (the freshly built pretrained classifier) with the artifact's trained weights applied;
    `check_base=False`: a verakit file loads even when its base-weight samples differ from `base`."""
    path = Path(path)
    method = read_artifact_info(path).get("method")
    if method == "vera":
        from ..fileformat import load_adapter

        return load_adapter(base, path, check_base=check_base)
    if method in PEFT_METHODS:
        import warnings

        from peft import PeftModel
        from safetensors import SafetensorError

        if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            # PEFT would look for it on the hub next, and end in a network error's traceback
            raise ArtifactError(f"{path}: no adapter_model.safetensors in the LoRA folder (its trained weights)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UNSAVED_PROJECTION)
            try:
                return PeftModel.from_pretrained(base, str(path))
            except (SafetensorError, ValueError) as e:  # a truncated weights file, a malformed adapter_config.json
                raise ArtifactError(f"{path}: cannot load the LoRA folder ({type(e).__name__}: {e})") from None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    own = dict(base.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ArtifactError(f"{path}: tensors {unknown[:3]} do not exist in {type(base).__name__}")
    for k, t in tensors.items():
        if own[k].shape != t.shape:
            raise ArtifactError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model's is {tuple(own[k].shape)}")
    base.load_state_dict(tensors, strict=False)
    return base


def warn_other_base(path: str | Path, info: dict[str, Any], model: str | None, alias: str | None) -> None:
    """Log a warning when `model` (--model) names another base than the one recorded in `info` for an
    artifact that cannot check its base: a LoRA folder or head tensors loaded on another checkpoint of the
    same architecture load without an error, and score as the wrong model. `alias` is the name of the
    recipe's default model (recorded as None), or None where there is no default."""
    method = info.get("method")
    if model is None or method not in _UNCHECKED_BASE or "model" not in info:
        return
    recorded_model = info["model"]

    def norm(name: str | None) -> str | None:
        return alias if name is None or (alias is not None and name.lower() == alias) else name

    given, trained = norm(model), norm(recorded_model)
    if given == trained or (given is not None and trained is not None and _same_folder(given, trained)):
        return
    log.warning("%s: --model %s is not the base model this %s artifact was trained on (%s), and it records no "
                "base-weight samples to tell them apart: its results on another base are not its own",
                path, model, method, trained)


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:  # either is no local folder (a hub id)
        return False

"""The server's adapter directory: safe names, listing, reading, validated atomic uploads, deletion.

An adapter named NAME is the file `<root>/NAME.safetensors`. Names match `[A-Za-z0-9._-]{1,128}` and may
not start with a dot, which rules out "." and ".." (path traversal) and the hidden temporary files that
uploads are staged in, so a half-written upload is never visible under an adapter name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..atomic import staged_file
from ..config import VeraConfig
from ..fileformat import FORMAT_NAME, Adapter, AdapterError, read_adapter
from ..names import NAME_PATTERN, InvalidName, check_name

__all__ = ["NAME_PATTERN", "InvalidName", "AdapterInfo", "AdapterStore", "check_name"]

_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file's header says, read without loading its tensors."""

    name: str
    config: VeraConfig
    model_type: str | None
    architecture: str
    modules: dict[str, tuple[int, int, str]]
    saved: tuple[str, ...]
    extra: dict[str, Any]


class AdapterStore:
    """Adapter files in one directory. Reads and writes are safe against concurrent readers."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapter directory {self.root} does not exist")

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{_SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def names(self) -> list[str]:
        """Adapter names on disk, sorted; files whose stem is not a valid name are ignored."""
        out = []
        for p in self.root.glob(f"*{_SUFFIX}"):
            stem = p.name[: -len(_SUFFIX)]
            if NAME_PATTERN.fullmatch(stem) and p.is_file():
                out.append(stem)
        return sorted(out)

    def read(self, name: str) -> Adapter:
        """Read and validate adapter `name`. FileNotFoundError if absent, AdapterError if unusable."""
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"adapter {name!r} not found")
        return read_adapter(path)

    def info(self, name: str) -> AdapterInfo:
        """The header of adapter `name` (config, base modules, saved keys, extra); AdapterError if corrupt."""
        from safetensors import safe_open

        path = self.path(name)
        try:
            with safe_open(path, framework="pt") as f:
                raw = f.metadata() or {}
            if raw.get("format") != FORMAT_NAME:
                raise AdapterError(f"{path}: not a verakit adapter (metadata format is {raw.get('format')!r})")
            meta = json.loads(raw["verakit"])
            base = meta["base"]
            return AdapterInfo(
                name, VeraConfig.from_dict(meta["config"]), base.get("model_type"), str(base.get("architecture", "")),
                {n: (int(v[0]), int(v[1]), str(v[2])) for n, v in base["modules"].items()},
                tuple(meta["saved"]), dict(meta.get("extra") or {}),
            )
        except AdapterError:
            raise
        except Exception as e:  # safetensors, JSON and config errors all mean "unreadable header"
            raise AdapterError(f"{path}: unreadable adapter header: {type(e).__name__}: {e}") from None

    def save(self, name: str, data: bytes, validate: Callable[[Adapter], None], overwrite: bool = False) -> Adapter:
        """Stage `data` in a hidden temp file, validate it (read_adapter + `validate`), then rename it to
        `name` atomically. Nothing is visible under `name` unless every check passed.

        Raises FileExistsError when `name` exists and not `overwrite`; AdapterError (naming the upload,
        not the temp file) when the data is not a usable adapter.
        """
        final = self.path(name)
        if final.exists() and not overwrite:
            raise FileExistsError(f"adapter {name!r} already exists; delete it first or pass overwrite=true")
        with staged_file(final, data, prefix=f".upload-{name}.") as tmp:
            try:
                adapter = read_adapter(tmp)
                validate(adapter)
            except AdapterError as e:
                raise type(e)(str(e).replace(tmp, f"upload {name!r}")) from None
        return replace(adapter, path=str(final))

    def delete(self, name: str) -> None:
        """Remove adapter `name` from disk; FileNotFoundError if absent."""
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise FileNotFoundError(f"adapter {name!r} not found") from None

"""The server's adapter directory: safe names, listing, reading, validated atomic uploads, deletion.

An adapter named NAME is the file `<root>/NAME.safetensors`. Names match `[A-Za-z0-9._-]{1,128}` and may
not start with a dot, which rules out "." and ".." (path traversal) and the hidden temporary files that
uploads are staged in, so a half-written upload is never visible under an adapter name.

Several servers (Ray Serve replicas, processes on hosts sharing a mount) may read and write one directory.
Every save and delete, after its rename or unlink, replaces the hidden file `.generation` (atomically) with
a fresh random token: a reader that holds adapters in memory compares one small file against the token it
last saw, and only when it changed compares the files of the adapters it holds (`signature`), never the
whole listing. A random token, not a counter, because two writers on different hosts cannot increment one
safely; any new value means "something changed".
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, staged_file
from ..config import VeraConfig
from ..fileformat import FORMAT_NAME, Adapter, AdapterError, read_adapter, read_metadata
from ..names import NAME_PATTERN, InvalidName, check_name

__all__ = ["NAME_PATTERN", "InvalidName", "AdapterInfo", "AdapterStore", "check_name"]

_SUFFIX = ".safetensors"
_GENERATION = ".generation"  # hidden: never an adapter name (names may not start with a dot)


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
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"adapter directory {self.root} is a file; pass the folder that holds the "
                                     "adapter files")
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

    def generation(self) -> str:
        """The directory's change token: a new value after every save or delete by any writer ("" before
        the first). One small read; a reader polls it to learn that resident adapters may be stale."""
        try:
            return (self.root / _GENERATION).read_text(encoding="ascii")
        except FileNotFoundError:
            return ""

    def signature(self, name: str) -> tuple[int, int, int] | None:
        """(inode, size, mtime in ns) of adapter `name`'s file, None when absent. Every save renames a new
        file into place, so a replaced adapter has a new inode even when size and mtime happen to match."""
        try:
            st = self.path(name).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _bump(self) -> None:
        """A new generation token, written after the change it announces (readers that see the token
        then see the change)."""
        atomic_write_bytes(self.root / _GENERATION, secrets.token_hex(8).encode("ascii"))

    def read(self, name: str) -> Adapter:
        """Read and validate adapter `name`. FileNotFoundError if absent, AdapterError if unusable."""
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"adapter {name!r} not found")
        return read_adapter(path)

    def info(self, name: str) -> AdapterInfo:
        """The header of adapter `name` (config, base modules, saved keys, extra); AdapterError if corrupt."""
        path = self.path(name)
        try:
            raw = read_metadata(path)  # never safe_open: its mmap dies (SIGBUS) when the file is rewritten in place
        except AdapterError as e:
            raise AdapterError(f"{path}: unreadable adapter header: {str(e).removeprefix(f'{path}: ')}") from None
        try:
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
        except Exception as e:  # JSON, key and config errors all mean "unreadable header"
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
        self._bump()
        return replace(adapter, path=str(final))

    def delete(self, name: str) -> None:
        """Remove adapter `name` from disk; FileNotFoundError if absent."""
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise FileNotFoundError(f"adapter {name!r} not found") from None
        self._bump()

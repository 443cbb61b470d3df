"""Crash-safe writes: a file or folder appears whole under its name, or not at all. stdlib only.

Everything is first written under a hidden temporary name in the destination's own folder (so the final
`os.replace` is a rename within one file system), then renamed into place; on failure the temporary
copy is removed and whatever was there before is left untouched.

Permissions are those of a plain `open()` / `mkdir()`: files 0o666 and folders 0o777, less the umask
(and any default ACL of the folder). tempfile's mkstemp/mkdtemp would make them 0o600 / 0o700, and the
rename would carry that into place: a server running as another user could not read a trained adapter.
A folder staged by `new_dir` / `replacing_dir` gets the same rule for everything written into it before it
is renamed into place, whoever wrote it: safetensors >= 0.8 writes `save_file` through a 0o600 temporary
(safetensors issue #782), so transformers' `save_pretrained` and PEFT's left `model.safetensors` /
`adapter_model.safetensors` readable by their owner alone, unlike the JSON beside them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write_bytes", "new_dir", "replacing_dir", "staged_file"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory, fsync and os.replace.

    A crash or error mid-write leaves the previous file (if any) untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path, data):
        pass


_ATTEMPTS = 100  # random names tried before giving up (a clash is already a 1 in 2**48 event)


def _temp_file(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """(open fd, path) of a new file in `folder`, created exclusively with mode 0o666 less the umask."""
    for _ in range(_ATTEMPTS):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temporary name starting with {prefix!r} after {_ATTEMPTS} tries")


def _temp_dir(folder: Path, prefix: str) -> Path:
    """A new empty folder in `folder`, mode 0o777 less the umask."""
    for _ in range(_ATTEMPTS):
        path = folder / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temporary name starting with {prefix!r} after {_ATTEMPTS} tries")


@contextmanager
def staged_file(path: Path, data: bytes, prefix: str | None = None) -> Iterator[str]:
    """Write `data` to a hidden temp file beside `path` (name starting with `prefix`, default ".NAME."),
    fsynced, and yield its name, e.g. to validate it; when the block returns, rename it to `path` and fsync
    the folder; when the block (or a write) raises, delete it. `path`'s folder must exist."""
    fd, tmp = _temp_file(path.parent, prefix or f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _plain_modes(folder: Path) -> None:
    """Give every file under `folder` 0o666 and every folder 0o777, less the umask: the modes a plain
    open() / mkdir() gives. The umask is read off `folder` itself (made by mkdir(0o777)), not set and reset
    with os.umask, which would race with other threads creating files."""
    dir_mode = stat.S_IMODE(folder.stat().st_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode & 0o666)


@contextmanager
def new_dir(out: Path) -> Iterator[Path]:
    """Yield a hidden temp folder beside `out` to fill; when the block returns, it becomes `out` in one
    rename (`out` must be absent or an empty folder, which it replaces); when the block raises, it is deleted.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(out.parent, f".{out.name}.")
    try:
        yield tmp
        _plain_modes(tmp)
        if out.exists():
            out.rmdir()  # raises if something was written into `out` meanwhile: never merge two folders
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def replacing_dir(folder: Path) -> Iterator[Path]:
    """Yield a hidden temp folder beside `folder` to fill; when the block returns, it replaces `folder` and
    all it held, so `folder` never holds a mix of old and new files or a half-written one (between the two
    renames it is briefly absent). The temp folder is removed in any case."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(folder.parent, f".{folder.name}.")
    old = folder.with_name(f".{folder.name}.old")
    try:
        yield tmp
        _plain_modes(tmp)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

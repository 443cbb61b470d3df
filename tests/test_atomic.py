"""Atomic writes create what a plain open()/mkdir() would: files 0o666 and folders 0o777 less the umask
(tempfile's 0o600 / 0o700 would lock other users out of a trained adapter), and still leave nothing
behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from verakit.atomic import atomic_write_bytes, new_dir, replacing_dir, staged_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_files_and_folders_follow_the_umask(tmp_path, umask):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask
    atomic_write_bytes(tmp_path / "a.bin", b"yy")  # replacing an existing file: same rule
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask and (tmp_path / "a.bin").read_bytes() == b"yy"
    with staged_file(tmp_path / "b.bin", b"z") as tmp:
        assert _mode(Path(tmp)) == 0o666 & ~umask
    assert _mode(tmp_path / "b.bin") == 0o666 & ~umask
    with new_dir(tmp_path / "new") as d:
        (d / "f").write_bytes(b"1")
    assert _mode(tmp_path / "new") == 0o777 & ~umask
    with replacing_dir(tmp_path / "new") as d:
        (d / "g").write_bytes(b"2")
    assert _mode(tmp_path / "new") == 0o777 & ~umask and [p.name for p in (tmp_path / "new").iterdir()] == ["g"]


def test_staged_folders_give_what_was_written_into_them_plain_modes(tmp_path, umask):
    """Files another library wrote 0o600 into a staged folder (safetensors >= 0.8's save_file does) come out
    as plain open() would have made them; sub-folders as plain mkdir()."""
    import torch
    from safetensors.torch import save_file

    for stage in (new_dir, replacing_dir):
        with stage(tmp_path / "out") as d:
            save_file({"w": torch.zeros(2)}, d / "model.safetensors")
            os.close(os.open(d / "private", os.O_WRONLY | os.O_CREAT, 0o600))
            (d / "sub").mkdir(0o700)
            (d / "sub" / "x.json").write_text("{}")
        out = tmp_path / "out"
        assert {p.name: _mode(p) for p in out.rglob("*")} == {
            "model.safetensors": 0o666 & ~umask, "private": 0o666 & ~umask, "sub": 0o777 & ~umask,
            "x.json": 0o666 & ~umask}
        if stage is new_dir:
            import shutil

            shutil.rmtree(out)


def test_failed_writes_leave_no_temporary_behind(tmp_path):
    with pytest.raises(RuntimeError), staged_file(tmp_path / "c.bin", b"z"):
        raise RuntimeError("validation failed")
    with pytest.raises(RuntimeError), new_dir(tmp_path / "d"):
        raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []

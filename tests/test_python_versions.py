"""pyproject's floors are honest. requires-python: nothing in the package, its tests, benchmarks or experiments
needs a newer Python than the oldest one declared. torch: the floor in pyproject and README is the one
verakit checks at import (`_torch_check.MIN_TORCH`), and an older torch is refused by name. Only 3.11 runs here, so the check is static: vermin reads the
syntax and standard-library members each file uses (it caught `asyncio.timeout`, 3.11+, in the server's
body-timeout path, which would have failed at request time on 3.10)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _oldest_python() -> str:
    # a regex, not tomllib: tomllib is 3.11+, and this file must run on the oldest Python too
    match = re.search(r'^requires-python\s*=\s*">=\s*(3\.\d+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match, "pyproject.toml: expected requires-python = \">=3.N\""
    return match.group(1)


def _vermin() -> str:
    """The vermin script of this environment (vermin has no `python -m vermin`)."""
    here = Path(sys.executable).with_name("vermin")
    found = str(here) if here.is_file() else shutil.which("vermin")
    if found is None:
        pytest.skip("no vermin script beside this Python or on PATH")
    return found


def test_no_file_needs_a_newer_python_than_requires_python():
    pytest.importorskip("vermin", reason="vermin is a dev extra: pip install -e '.[dev]'")
    oldest = _oldest_python()
    run = subprocess.run(
        [_vermin(), "-q", "--no-tips", "--eval-annotations", "--backport", "typing_extensions",
         f"-t={oldest}-", "--violations", *(str(ROOT / d) for d in ("src", "tests", "benchmarks", "experiments"))],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"needs a Python newer than {oldest}:\n{run.stdout}{run.stderr}"


def test_torch_floor_is_the_same_in_pyproject_readme_and_the_import_check():
    from verakit._torch_check import MIN_TORCH

    need = ".".join(map(str, MIN_TORCH))
    assert re.search(r'^dependencies = \["torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1) == need
    assert f"Any torch >= {need} works" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("version, ok", [("2.3.1+cpu", False), ("1.13.1", False), ("2.4.0", True),
                                         ("2.13.0+cpu", True), ("2.10.0a0+git1234", True), ("3.0", True),
                                         ("weird", True)])
def test_an_older_torch_is_refused_at_import_naming_both_versions(version, ok):
    from verakit._torch_check import check_torch

    if ok:
        check_torch(version)
        return
    with pytest.raises(ImportError, match=rf"verakit needs torch >= 2\.4, found torch {re.escape(version)}"):
        check_torch(version)

"""Import structure: no module inside verakit imports the package root (it imports them: a cycle), and the
version is written once."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import verakit

SRC = Path(verakit.__file__).resolve().parent


def _root_imports(path: Path) -> list[str]:
    """`from . import x` / `from .. import x` lines that resolve to the package root `verakit`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(SRC).parts)  # 1: verakit/x.py, 2: verakit/sub/x.py
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            # `from . import ops` imports a submodule, not the root's own names.
            names = [a.name for a in node.names if not (SRC / f"{a.name}.py").is_file() and not (SRC / a.name).is_dir()]
            to_root = (node.level == depth and node.module is None) or (node.level == 0 and node.module == "verakit")
            if to_root and names:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {names}")
    return found


def test_no_module_imports_the_package_root():
    offenders = [hit for p in sorted(SRC.rglob("*.py")) if p.name != "__init__.py" or p.parent != SRC
                 for hit in _root_imports(p)]
    assert offenders == []


def test_fileformat_imports_first_in_a_fresh_process():
    code = "import verakit.fileformat as f, verakit; assert f.__version__ == verakit.__version__"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_version_is_the_installed_distribution_version():
    assert importlib.metadata.version("verakit") == verakit.__version__


def _imported_packages(path: Path) -> set[str]:
    """Top-level verakit sub-packages/modules a file imports (absolute or relative), e.g. {"serve", "fileformat"}."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(SRC).parts[:-1]  # ("train",) for verakit/train/x.py
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "verakit" and len(parts) > 1:
                    out.add(parts[1])
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = (*base, *(node.module.split(".") if node.module else ()))
            out.update([target[0]] if target else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("verakit."))
    return out


def test_import_direction():
    """train and serve are siblings that never import each other; nothing below the CLI imports it."""
    wrong = []
    for p in sorted(SRC.rglob("*.py")):
        top = p.relative_to(SRC).parts[0]
        imported = _imported_packages(p) - {top}
        banned = {"cli"} | ({"serve"} if top == "train" else {"train"} if top == "serve" else set())
        wrong += [f"{p.relative_to(SRC)} imports {name}" for name in sorted(imported & banned)]
    assert wrong == []

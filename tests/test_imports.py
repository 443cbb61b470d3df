"""Import structure: no module inside verakit imports the package root (it imports them: a cycle), the
version is written once, imports point one way (train and serve never import each other, nothing below
the CLI imports it, a train recipe imports only the shared layer) and no import cycle exists among
verakit's modules, counting imports inside functions and lazy package exports."""

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


def _imported_packages(path: Path, src: Path = SRC) -> set[str]:
    """Top-level verakit sub-packages/modules a file under `src` imports (absolute or relative), e.g. {"serve", "fileformat"}."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(src).parts[:-1]  # ("train",) for verakit/train/x.py
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
    """train and serve are siblings that never import each other; nothing below the CLI imports it; the
    core's single-file modules (plan.py included) import neither of them."""
    wrong = []
    for p in sorted(SRC.rglob("*.py")):
        top = p.relative_to(SRC).parts[0]
        imported = _imported_packages(p) - {top}
        banned = {"cli"} | ({"serve"} if top == "train" else {"train"} if top == "serve" else set())
        if top.endswith(".py"):  # the core's own modules: nothing from the layers built on them
            banned |= {"train", "serve", "integrations"}
        wrong += [f"{p.relative_to(SRC)} imports {name}" for name in sorted(imported & banned)]
    assert wrong == []


def _module_name(path: Path) -> str:
    parts = ("verakit", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _lazy_targets(tree: ast.Module, package: str) -> set[str]:
    """Submodules named by a package's `_EXPORTS = {name: submodule}` (verakit.train.lazy): imported on access."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            out |= {f"{package}.{sub}" for sub in ast.literal_eval(node.value).values()}
    return out


def import_graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """{module: verakit modules it imports}, from every import statement (top level or inside a function)
    and every lazy export; `from pkg import sub` counts as importing pkg.sub when that is a module."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        out = _lazy_targets(tree, name) if path.name == "__init__.py" else set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_the_old_causal_generate_circle():
    """The check below can fail: the circle issue 17 found (causal imported generate_texts, generate
    imported build_causal_lm back, inside a function) is a cycle to it, a one-way chain is not."""
    old = {"t.causal": {"t.generate", "t.loop"}, "t.generate": {"t.causal"}, "t.loop": set()}
    assert cycles(old) == [["t.causal", "t.generate"]]
    assert cycles({"t.causal": {"t.generate", "t.model"}, "t.generate": {"t.model"}, "t.model": set()}) == []


def test_no_import_cycle_among_verakit_modules():
    graph = import_graph()
    assert "verakit.train.causal.model" in graph["verakit.train.causal.generate"]  # the graph sees function-level imports
    assert cycles(graph) == []


RECIPES = ("classify", "causal", "vision", "grouped", "tune")
MAY_USE = {"grouped": {"classify"}, "tune": {"classify"}}  # the only recipes another recipe may import


def test_train_recipes_import_only_the_shared_layer():
    """verakit.train.<recipe>.* imports the shared layer (verakit.train.<module>) and no other recipe, except
    grouped and tune, which build on classification; the shared layer imports no recipe."""
    wrong = []
    for name, imported in import_graph().items():
        parts = name.split(".")
        if parts[:2] != ["verakit", "train"] or len(parts) < 3:
            continue
        own = parts[2] if parts[2] in RECIPES else None
        for m in sorted(imported):
            mp = m.split(".")
            other = mp[2] if mp[:2] == ["verakit", "train"] and len(mp) > 2 and mp[2] in RECIPES else None
            if other is not None and other != own and other not in MAY_USE.get(own or "", set()):
                wrong.append(f"{name} imports {m}")
    assert wrong == []


def test_import_direction_check_catches_train_importing_serve_and_core_importing_cli(tmp_path):
    """test_import_direction's rule, on files that break it: a train module importing serve (relative, from a
    recipe sub-package, or absolute) and a core module importing the CLI are each reported."""
    import shutil

    fake = tmp_path / "verakit"
    for rel, text in {"train/grouped/recipe.py": "from ...serve.store import check_name\n",
                      "train/loop.py": "def f():\n    import verakit.serve.bank\n",
                      "plan.py": "from .cli import main\n", "serve/bank.py": "from ..fileformat import x\n"}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    shutil.copy(SRC / "__init__.py", fake / "__init__.py")
    found = {str(p.relative_to(fake)): _imported_packages(p, fake) for p in fake.rglob("*.py")}
    assert "serve" in found["train/grouped/recipe.py"] and "serve" in found["train/loop.py"]
    assert "cli" in found["plan.py"] and "train" not in found["serve/bank.py"]


def test_train_packages_import_nothing_heavy():
    """The train packages resolve their names on first access, so importing them (and a stdlib-only data
    module such as classify.tasks) imports none of transformers, scikit-learn, scipy, accelerate, optuna, peft."""
    code = ("import sys, verakit.train, verakit.train.classify, verakit.train.causal, verakit.train.vision, "
            "verakit.train.grouped, verakit.train.tune, verakit.train.classify.tasks, verakit.train.errors; "
            "print(sorted(m for m in ('transformers', 'sklearn', 'scipy', 'accelerate', 'optuna', 'peft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
    from verakit.train.causal import CausalArgs  # and the names resolve on access

    assert CausalArgs.__module__ == "verakit.train.causal.recipe"

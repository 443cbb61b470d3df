"""PEP 562 exports for the train packages: a name is imported from its submodule on first access, so
`import verakit.train.classify` (or reading a stdlib-only submodule such as its `tasks`) stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` resolving each name of `exports` ({name: submodule}) from that
    submodule; any other name raises AttributeError naming the package."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    return __getattr__

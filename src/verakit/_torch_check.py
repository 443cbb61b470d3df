"""The oldest torch the layers run on, checked when verakit is imported: a clear message up front instead of
an AttributeError deep in a forward. (Not in _version.py: the build reads the version from there without torch.)"""

from __future__ import annotations

__all__ = ["MIN_TORCH", "check_torch"]

# torch.get_autocast_dtype(device) and torch.is_autocast_enabled(device) (the layers' autocast handling) are
# torch 2.4's (pytorch#124479); torch.compiler.is_compiling is 2.3's. pyproject.toml's floor says the same
# (tests/test_python_versions.py). FSDP2 training (torch.distributed.fsdp.fully_shard) needs 2.6: train/fsdp.py.
MIN_TORCH = (2, 4)


def check_torch(version: str) -> None:
    """Raise ImportError naming both versions if torch `version` ("2.3.1+cpu") is older than MIN_TORCH."""
    parts = version.split("+")[0].split(".")
    try:
        have = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return  # an unusual local build string: let it run rather than guess
    if have < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"verakit needs torch >= {need}, found torch {version}: pip install 'torch>={need}' "
                          "(a CPU build on machines without a GPU: README.md, 'Set up')")


def _check_installed() -> None:
    import torch

    check_torch(torch.__version__)


_check_installed()

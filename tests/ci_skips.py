"""pytest plugin: under CI=true, a test that skips for a missing model, data set or extra fails instead.

CI installs exactly what README.md's set-up says into a fresh virtual environment, so a skip there means the
set-up misses a step a new user would also miss. Only skips for hardware no CI machine has may stand.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["pytest_runtest_makereport"]

# Skips that may stand under CI: hardware this machine kind never has.
CI_ALLOWED_SKIPS = ("CUDA", "GPU")


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _on_ci() and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(word in reason for word in CI_ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (f"skipped under CI=true, which needs every model and data set the README's set-up "
                               f"provides: {reason}")

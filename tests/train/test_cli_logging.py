"""What `verakit train` prints on stderr: its own progress lines, without bitsandbytes' line about an
optional Hub kernel it cannot fetch (imported through transformers -> peft in every run, quantized or not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_train_stderr_has_progress_and_no_hub_kernel_noise(tmp_path, tiny_bert_dir, tiny_task):
    pytest.importorskip("bitsandbytes")  # the noise comes from it
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "verakit.cli", "train", "--task", "csv", "--data-dir", str(tiny_task),
                           "--model", tiny_bert_dir, "--out", str(tmp_path / "run"), "--r", "8", "--epochs", "1",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verakit.train: plan:" in done.stderr
    assert "kernels-community" not in done.stderr  # present before the filter (the test failed then)

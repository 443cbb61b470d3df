"""The recipes' --model goes through verakit.models: the alias "minilm" names the installed MiniLM (in training
and again when `verakit eval` reads it back from the run info), and a hub id that is neither a folder nor cached
fails at once, in one line with exit code 2, when the hub cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from image_helpers import write_images
from verakit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_minilm_alias_trains_and_evals(tmp_path, capsys, shared_data, minilm_path):
    run = tmp_path / "run"
    rc = main(["train", "--task", "sst2", "--data-dir", str(shared_data / "glue" / "SST-2"), "--model", "minilm",
               "--out", str(run), "--max-train-samples", "32", "--max-eval-samples", "32", "--epochs", "1",
               "--max-length", "32", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_train"] == 32 and metrics["model"] == "minilm"
    # MiniLM's 6 layers x {query, value} and the pooler's dense layer (default --head vera) x (d + b)
    assert metrics["trainable_params"] == (6 * 2 + 1) * (1024 + 384)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter.safetensors")]) == 0  # the run info says "minilm"
    assert json.loads(capsys.readouterr().out)["metric"] == metrics["metric"]


def _offline_train(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "verakit.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - start


def test_unknown_hub_id_offline_is_one_line(tmp_path, tiny_task):
    """As a user runs it: a fresh process with HF_HUB_OFFLINE=1 (transformers reads it at import)."""
    run = tmp_path / "run"
    done, seconds = _offline_train(["--task", "csv", "--data-dir", str(tiny_task), "--model", "some-org/none",
                                    "--out", str(run)], tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("verakit train: error: model 'some-org/none' is neither a local")
    assert "HF_HUB_OFFLINE is set" in lines[0]
    assert seconds < 120  # interpreter and imports; a hub lookup would retry the network for a minute more
    assert not run.exists()


def test_unknown_hub_id_offline_fails_fast_for_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_images(tmp_path / "data", n_train=2, n_test=1)
    run = tmp_path / "run"
    rc = main(["train", "--task", "images", "--data-dir", str(data), "--model", "some-org/none", "--out", str(run)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model 'some-org/none' is neither a local folder nor in the Hugging Face cache" in err[0]
    assert not run.exists()

"""Serving fixtures: tiny model folders with adapters, and real `verakit serve` processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.cases import TOKEN, Server, write_model


@pytest.fixture(scope="session")
def bert_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny BERT classifier (3 labels) and adapters a0 (r=8), a1 (r=4), a2 (r=8), a3 (r=8)."""
    return write_model(tmp_path_factory.mktemp("bert"), "bert", "bert",
                        {"a0": (8, 0.5), "a1": (4, 0.5), "a2": (8, 0.5), "a3": (8, 0.5)})


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny Llama and adapters g0 (r=8), g1 (r=4), g2 (r=8), large enough to change greedy outputs."""
    return write_model(tmp_path_factory.mktemp("llama"), "llama", "llama",
                        {"g0": (8, 1.0), "g1": (4, 1.0), "g2": (8, 1.0)})


@pytest.fixture(scope="session")
def classify_server(bert_dirs, tmp_path_factory):
    """Classifier server with an admin token, capacity 2 (so 4 adapters force evictions), batch 16."""
    model_dir, adapter_dir = bert_dirs
    server = Server(["--model", str(model_dir), "--adapters", str(adapter_dir), "--capacity", "2",
                     "--admin-token", TOKEN, "--max-batch", "16", "--max-wait-ms", "20", "--max-inputs", "8",
                     "--max-body-bytes", "20000", "--max-upload-bytes", "200000"],
                    tmp_path_factory.mktemp("logs") / "classify.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def generate_server(llama_dirs, tmp_path_factory):
    """Causal-LM server without an admin token (admin endpoints disabled)."""
    model_dir, adapter_dir = llama_dirs
    server = Server(["--model", str(model_dir), "--adapters", str(adapter_dir), "--max-batch", "16",
                     "--max-wait-ms", "20", "--max-new-tokens", "32", "--max-n", "3"],
                    tmp_path_factory.mktemp("logs") / "generate.log")
    yield server
    server.stop()

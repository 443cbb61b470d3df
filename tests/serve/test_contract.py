"""The HTTP contract: schemathesis, every check, against a real `verakit serve` process per task, must find
nothing. A failure means the OpenAPI document and the server disagree (an undocumented status or content
type, a schema-valid request refused, a schema-invalid one accepted, a 5xx).

Classify runs on the real MiniLM; generate on a tiny random Llama saved with SmolLM2's real tokenizer and
chat template (the real SmolLM2 spends seconds per generation; the contract is about the HTTP layer). Each
run is bounded in examples and time (`st run --max-examples --max-time`), with deterministic generation.

The one widened expectation, and why: an upload's body is "binary" in the document, and no JSON Schema can
say "a valid .safetensors adapter", so a generated upload is schema-valid yet refused with 422. That is the
documented answer; the config below lets POST /v1/adapters answer 422 to positive data, nothing else.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve.cases import TOKEN, Server, trained_adapter

# Names that exist on the server (an adapter, the base model) are drawn often enough to reach the model.
ST_CONFIG = """
[dictionaries.names]
values = {names}

[parameters]
"body.adapter" = {{ dictionary = "names", probability = 0.5 }}
"body.model" = {{ dictionary = "names", probability = 0.5 }}

[[operations]]
include-path = "/v1/adapters"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""


def _answered(server: Server, endpoint: str, status: str) -> float:
    """The server's own count of `endpoint` requests answered with `status` (from /metrics)."""
    pattern = rf'verakit_requests_total{{endpoint="{re.escape(endpoint)}",status="{status}"}} (\S+)'
    found = re.search(pattern, httpx.get(f"{server.url}/metrics").text)
    return float(found[1]) if found else 0.0


def _schemathesis(server: Server, tmp_path: Path, names: list[str], max_examples: int, max_time: int,
                  reaches: str) -> str:
    """Run `st run` with all checks against `server`; returns its output (asserting it found nothing and
    that some generated requests to `reaches` got past validation to the model: answered 200)."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(ST_CONFIG.format(names=json.dumps(names)))
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{server.url}/openapi.json",
        "--checks", "all", "--max-examples", str(max_examples), "--max-time", str(max_time),
        "--generation-deterministic", "--request-timeout", "20", "--workers", "1", "--no-color",
        "--header", f"Authorization: Bearer {TOKEN}", "--generation-with-security-parameters", "false",
        "--suppress-health-check", "all",
    ]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 60, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"schemathesis found problems (exit {done.returncode}):\n{out[-8000:]}"
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    # Enough cases to cover every operation several times (about 60 on an idle 2-core machine in 10 s;
    # a loaded one generates fewer in the same window, so the floor is lower than that).
    assert counts and counts[1] == counts[2] and int(counts[1]) >= 25, out[-4000:]
    assert time.monotonic() - start < max_time + 30, out[-2000:]
    assert server.alive() and _answered(server, reaches, "200") > 0, out[-2000:]
    return out


@pytest.fixture(scope="module")
def minilm_server(minilm_path, tmp_path_factory):
    """The real MiniLM (untrained head: base requests answer 409) and one adapter with a trained head."""
    from transformers import AutoModelForSequenceClassification

    from verakit import VeraConfig
    from verakit.fileformat import write_adapter

    adapters = tmp_path_factory.mktemp("minilm_adapters")
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    write_adapter(trained_adapter(base, VeraConfig(r=8), seed=0), adapters / "sentiment.safetensors")
    server = Server(["--model", minilm_path, "--adapters", str(adapters), "--admin-token", TOKEN,
                     "--max-inputs", "8", "--max-body-bytes", "20000", "--max-upload-bytes", "2000000"],
                    tmp_path_factory.mktemp("logs") / "minilm.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smol_tokenizer_llama_server(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer (49152 tokens, chat template), context 2048, one adapter."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from verakit import VeraConfig
    from verakit.fileformat import write_adapter
    from verakit.models import ModelNotInstalledError, smollm2_dir

    try:
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("smol")
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "tinysmol")
    tok.save_pretrained(root / "tinysmol")
    (root / "adapters").mkdir()
    write_adapter(trained_adapter(base, VeraConfig(r=4), seed=0), root / "adapters" / "writer.safetensors")
    server = Server(["--model", str(root / "tinysmol"), "--adapters", str(root / "adapters"), "--admin-token", TOKEN,
                     "--max-new-tokens", "8", "--max-n", "2", "--max-inputs", "4", "--max-body-bytes", "20000"],
                    tmp_path_factory.mktemp("logs") / "smol.log")
    yield server
    server.stop()


def _paths(server: Server) -> dict[str, dict]:
    return httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_classify_server_documents_only_its_endpoints_and_the_name_rule(minilm_server):
    paths = _paths(minilm_server)
    assert "/v1/classify" in paths and "/v1/completions" not in paths and "/v1/chat/completions" not in paths
    assert set(paths["/v1/classify"]["post"]["responses"]) == {"200", "400", "404", "408", "409", "413", "422", "500", "503"}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "application/octet-stream" in paths["/v1/adapters"]["post"]["requestBody"]["content"]
    # formerly schema-valid but refused: an empty adapter name, in the body and in the query
    for url, kw in (("/v1/classify", {"json": {"adapter": "", "inputs": ["0"]}}),
                    ("/v1/adapters?name=", {"content": b"x", "headers": {"Authorization": f"Bearer {TOKEN}"}})):
        r = httpx.post(f"{minilm_server.url}{url}", **kw)
        assert r.status_code == 422 and "invalid adapter name ''" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{minilm_server.url}/v1/classify", json={"inputs": ["a fine film"]})
    assert r.status_code == 409 and r.json()["error"]["type"] == "untrained_head"  # documented under 409
    r = httpx.post(f"{minilm_server.url}/v1/completions", json={"model": "x", "prompt": "y"})
    assert r.status_code == 400 and "needs a generate model" in r.json()["error"]["message"]  # undocumented route


def test_generate_server_documents_only_its_endpoints_and_bounds(smol_tokenizer_llama_server):
    paths = _paths(smol_tokenizer_llama_server)
    assert "/v1/classify" not in paths and {"/v1/completions", "/v1/chat/completions"} <= set(paths)
    doc = httpx.get(f"{smol_tokenizer_llama_server.url}/openapi.json").json()
    schema = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert schema["max_tokens"]["maximum"] == 8 and schema["n"]["maximum"] == 2
    assert "text/event-stream" in paths["/v1/completions"]["post"]["responses"]["200"]["content"]


def test_schemathesis_finds_nothing_on_classify(minilm_server, tmp_path):
    base = httpx.get(f"{minilm_server.url}/health").json()["model"]
    _schemathesis(minilm_server, tmp_path, ["sentiment", base], max_examples=8, max_time=15, reaches="/v1/classify")


def test_schemathesis_finds_nothing_on_generate(smol_tokenizer_llama_server, tmp_path):
    _schemathesis(smol_tokenizer_llama_server, tmp_path, ["writer", "tinysmol"], max_examples=8, max_time=15,
                  reaches="/v1/completions")

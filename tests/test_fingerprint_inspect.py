"""`verakit inspect` says whether a file records base-weight samples, and so what loading will check."""

import json

from safetensors import safe_open
from safetensors.torch import save_file

from verakit import VeraConfig, attach, save_adapter
from verakit.cli import main


def test_inspect_shows_recorded_samples_and_their_absence(tiny_llama, tmp_path, capsys):
    attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj", "v_proj")))
    path = tmp_path / "a.safetensors"
    save_adapter(tiny_llama, path)
    assert main(["inspect", str(path)]) == 0
    assert "base samples  768 weights of 4 modules: loading refuses another checkpoint" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base_samples"] == {"samples": 768, "modules": 4, "quant": None}

    with safe_open(path, "pt") as f:  # the same file as verakit wrote it before samples existed
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["verakit"])
    del inner["base"]["samples"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata={**meta, "verakit": json.dumps(inner)})
    assert main(["inspect", str(old)]) == 0
    assert "base samples  none (an older file): loading checks module names and shapes only" in capsys.readouterr().out
    assert main(["inspect", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base_samples"] is None

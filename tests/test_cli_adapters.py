"""`verakit inspect` (what it counts) and the command line's behaviour when its reader goes away."""

import json
import os
import subprocess
import sys

from verakit import VeraConfig, attach, save_adapter
from verakit.cli import main
from verakit.cli.adapters import describe_modules
from verakit.fileformat import adapter_from_model
from verakit.interop import to_lora


def test_describe_modules_counts_modules_and_blocks():
    smollm2 = [f"model.layers.{i}.self_attn.{m}" for i in range(30) for m in ("q_proj", "v_proj")]
    assert describe_modules(smollm2) == "60 adapted modules (q_proj, v_proj in 30 blocks)"
    assert describe_modules(["transformer.h.0.attn.c_attn", "lm_head"]) == "2 adapted modules (c_attn in 1 block; lm_head)"
    assert describe_modules(["lm_head"]) == "1 adapted module (lm_head)"


def test_inspect_reports_adapted_modules_and_blocks(tiny_llama, tmp_path, capsys):
    attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj", "v_proj")))
    path = tmp_path / "a.safetensors"
    save_adapter(tiny_llama, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "-> 4 adapted modules (q_proj, v_proj in 2 blocks)" in out and "layers" not in out.split("\n")[3]
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapted_modules"] == 4 and info["blocks"] == 2 and "layers" not in info
    to_lora(adapter_from_model(tiny_llama), tmp_path / "lora")
    assert main(["inspect", str(tmp_path / "lora")]) == 0
    assert "targets       4 adapted modules (q_proj, v_proj in 2 blocks)" in capsys.readouterr().out


def test_inspect_counts_dvora_magnitudes_as_vectors(tiny_llama, tmp_path, capsys):
    """A DVoRA file: m (d_out per layer) counts with d and b, not as saved-module parameters."""
    attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj", "v_proj"), magnitude=True))
    path = tmp_path / "dv.safetensors"
    save_adapter(tiny_llama, path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    d_out = {n: m.out_features for n, m in tiny_llama.named_modules() if n.endswith(("q_proj", "v_proj"))}
    assert info["vector_params"] == sum(4 + 2 * o for o in d_out.values())  # d (r) + b + m (d_out each)
    assert info["saved_params"] == 0
    assert main(["inspect", str(path)]) == 0
    assert "vector params (d, b, m: DVoRA) + 0 in saved modules" in capsys.readouterr().out


def test_a_reader_that_stops_early_ends_the_command_quietly(tiny_llama, tmp_path):
    """`verakit inspect FILE | head`: no BrokenPipeError traceback, whether the pipe breaks mid-output or at exit."""
    attach(tiny_llama, VeraConfig(r=4, target_modules="all-linear"))
    path = tmp_path / "a.safetensors"
    save_adapter(tiny_llama, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "verakit.cli", "inspect", str(path), "--max-layers", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line: every write fails with EPIPE
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode == 1, err
    # a real `head -1`: it exits after one line, usually while the command is still writing
    shell = f"{sys.executable} -m verakit.cli inspect {path} --max-layers 1000 --json | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout == "{\n" and "Traceback" not in done.stderr and "Broken" not in done.stderr, done.stderr

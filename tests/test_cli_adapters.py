"""`verakit inspect` (what it counts), the command line's behaviour when its reader goes away, and bad input to
`inspect`, `convert` and `merge`: one line on stderr, exit 2, nothing already stored overwritten."""

import json
import os
import subprocess
import sys

import pytest

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


def _peft_dir(model, tmp_path):
    """A tiny verakit adapter file and the PEFT VeRA directory `convert to-peft` makes of it."""
    attach(model, VeraConfig(r=4, target_modules=("q_proj", "v_proj")))
    src = tmp_path / "a.safetensors"
    save_adapter(model, src)
    assert main(["convert", "to-peft", str(src), str(tmp_path / "peft")]) == 0
    return src, tmp_path / "peft"


def test_convert_from_peft_never_overwrites_what_dst_names(tiny_llama, tmp_path, capsys):
    """DST an existing file (a trained adapter) stays byte for byte; DST a folder is refused the same way,
    not with IsADirectoryError's traceback; a --model that is nowhere is one line, not the hub's OSError."""
    src, peft = _peft_dir(tiny_llama, tmp_path)
    kept = src.read_bytes()
    capsys.readouterr()
    assert main(["convert", "from-peft", str(peft), str(src), "--model", str(tmp_path)]) == 2
    assert f"{src} exists; convert writes a new adapter file, it does not overwrite one" in capsys.readouterr().err
    assert src.read_bytes() == kept
    (tmp_path / "folder").mkdir()
    assert main(["convert", "from-peft", str(peft), str(tmp_path / "folder")]) == 2
    assert "folder exists; convert writes a new adapter file" in capsys.readouterr().err
    assert main(["convert", "from-peft", str(peft), str(tmp_path / "new.safetensors"), "--model",
                 str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model does not exist" in capsys.readouterr().err
    assert not (tmp_path / "new.safetensors").exists()


def test_merge_out_that_is_a_file_is_refused_and_kept(tiny_llama, tmp_path, capsys):
    attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj", "v_proj")))
    save_adapter(tiny_llama, tmp_path / "a.safetensors")
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(["merge", "--adapter", str(tmp_path / "a.safetensors"), "--out", str(out), "--model",
                 str(tmp_path)]) == 2
    assert f"--out {out} is a file; merge writes a new model directory" in capsys.readouterr().err
    assert out.read_text() == "mine"


def test_inspect_max_layers_must_not_be_negative(tiny_llama, tmp_path, capsys):
    """-1 listed all modules but the last and then "... N+1 more": argparse refuses it under the flag."""
    attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj", "v_proj")))
    save_adapter(tiny_llama, tmp_path / "a.safetensors")
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit) as e:
            main(["inspect", str(tmp_path / "a.safetensors"), "--max-layers", bad])
        assert e.value.code == 2
        assert f"argument --max-layers: must be an integer >= 0, got '{bad}'" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "a.safetensors"), "--max-layers", "0"]) == 0
    assert "... 4 more (--max-layers)" in capsys.readouterr().out


def test_a_folder_where_an_adapter_file_is_meant_is_named(tiny_llama, tmp_path, capsys):
    """inspect/merge/convert of RUN_DIR said "no such adapter file" (or "not a PEFT adapter directory"), though
    the folder exists: now the message names the run's adapter file, or says a folder is not a file."""
    attach(tiny_llama, VeraConfig(r=4, target_modules=("q_proj", "v_proj")))
    run_dir = tmp_path / "run"
    save_adapter(tiny_llama, run_dir / "adapter.safetensors")
    want = f"{run_dir}: a run folder; {{}} takes its adapter file, {run_dir / 'adapter.safetensors'}"
    for argv, command in ((["inspect", str(run_dir)], "inspect"),
                          (["merge", "--adapter", str(run_dir), "--out", str(tmp_path / "m")], "merge"),
                          (["convert", "to-lora", str(run_dir), str(tmp_path / "l")], "convert to-lora")):
        assert main(argv) == 2
        assert want.format(command) in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", "to-peft", str(tmp_path / "empty"), str(tmp_path / "p")]) == 2
    assert "empty: a folder; convert to-peft takes a verakit adapter .safetensors file" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("m", "l", "p"))

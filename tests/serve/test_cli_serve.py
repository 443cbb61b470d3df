"""`verakit serve` as a user first meets it: the start-up line names the URL, `--help` shows every default,
bad options and start-up failures are one line naming the flag / model / address with exit code 2."""

import os
import re
import select
import socket
import subprocess
import sys

import httpx
import pytest

from serve.cases import REPO, free_port
from verakit.cli import main


def _blocks(help_text):
    """{flag: its help text} of the options section of an argparse help."""
    out, flag = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            flag = m.group(1).rstrip(",")
            out[flag] = line
        elif flag:
            out[flag] += " " + line.strip()
    return out


def test_help_shows_every_default(capsys):
    from dataclasses import fields

    from verakit.serve.options import ServeOptions

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    blocks = _blocks(capsys.readouterr().out)
    for field in fields(ServeOptions):
        flag = "--no-base-check" if field.name == "check_base" else "--" + field.name.replace("_", "-")
        if field.name == "adapters":
            continue  # required
        assert "default" in blocks[flag], f"{flag} does not say its default: {blocks[flag]}"
    for flag, shown in {"--port": "8000", "--host": "127.0.0.1", "--capacity": "256", "--max-batch": "32",
                        "--max-wait-ms": "5.0", "--max-new-tokens": "256", "--max-n": "8", "--dtype": "float32",
                        "--max-body-bytes": "1048576"}.items():
        assert f"(default: {shown}" in blocks[flag], blocks[flag]


@pytest.mark.parametrize("args, env, message", [
    (["--admin-token", "short"], {}, "--admin-token (or $VERAKIT_ADMIN_TOKEN) must be at least 8 characters"),
    ([], {"VERAKIT_ADMIN_TOKEN": "short"}, "--admin-token (or $VERAKIT_ADMIN_TOKEN) must be at least 8 characters"),
    ([], {"VERAKIT_API_KEY": "short"}, "--api-key (or $VERAKIT_API_KEY) must be at least 8 characters"),
    (["--protect-metrics"], {}, "--protect-metrics needs an admin token (--admin-token) to protect them with"),
    (["--max-batch", "0"], {}, "--max-batch must be an integer >= 1, got 0"),
    (["--max-wait-ms", "-1"], {}, "--max-wait-ms must be a finite number >= 0, got -1.0"),
    (["--max-wait-ms", "nan"], {}, "--max-wait-ms must be a finite number >= 0, got nan"),
    (["--max-wait-ms", "inf"], {}, "--max-wait-ms must be a finite number >= 0, got inf"),
    (["--port", "70000"], {}, "--port must be in 0..65535, got 70000"),
])
def test_option_errors_name_the_flag(args, env, message, tmp_path, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if not env:
        monkeypatch.delenv("VERAKIT_ADMIN_TOKEN", raising=False)
        monkeypatch.delenv("VERAKIT_API_KEY", raising=False)
    rc = main(["serve", "--adapters", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == f"verakit serve: error: {message}"
    assert "ServeOptions" not in err and "short" not in err  # names the flag; never echoes the token


def test_alias_of_the_other_task_is_exit_2(tmp_path, capsys):
    assert main(["serve", "--model", "minilm", "--task", "generate", "--adapters", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("verakit serve: error: ") and "'minilm' is a classifier model, not a causal-lm" in err


def test_port_in_use_is_exit_2(bert_dirs, capsys):
    model_dir, adapter_dir = bert_dirs
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "--model", str(model_dir), "--adapters", str(adapter_dir), "--port", str(port),
                   "--threads", "1"])
    assert rc == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_port_0_binds_a_free_port_and_names_it(bert_dirs):
    from verakit.serve.options import ServeOptions
    from verakit.serve.server import Server

    model_dir, adapter_dir = bert_dirs
    server = Server(ServeOptions(model=str(model_dir), adapters=str(adapter_dir), port=0, threads=1))
    try:
        port = server.socket.getsockname()[1]
        assert port != 0 and server.url == f"http://127.0.0.1:{port}"
        assert server.describe() == f"listening on http://127.0.0.1:{port} (task classify, model bert, 4 adapters)"
    finally:
        server.engine.close()
        server.socket.close()


def test_startup_line_names_the_url_it_serves(bert_dirs):
    """A real process: its first stdout line says where it listens, and that address answers."""
    model_dir, adapter_dir = bert_dirs
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "verakit.cli", "serve", "--model", str(model_dir), "--adapters", str(adapter_dir),
         "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # model loading, on a busy machine
        assert ready, "no start-up line in 120 s"
        line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        assert line.strip() == f"verakit serve: listening on {url} (task classify, model bert, 4 adapters)"
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["task"] == "classify"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_model_flag_may_be_left_out(tmp_path):
    """`verakit serve --adapters DIR` alone: --model reads as None (minilm or smollm2 chosen from --task), not
    the dataclass's missing-default marker, which crashed the start-up with an AttributeError."""
    from verakit.cli import build_parser
    from verakit.cli.common import fields_of
    from verakit.serve.options import ServeOptions

    args = build_parser().parse_args(["serve", "--adapters", str(tmp_path)])
    assert args.model is None and args.check_base is True
    options = ServeOptions(**fields_of(ServeOptions, args))
    assert options.model is None and options.check_base
    assert build_parser().parse_args(["serve", "--adapters", str(tmp_path), "--no-base-check"]).check_base is False


def test_a_model_folder_without_tokenizer_is_exit_2(bert_dirs, tmp_path, capsys):
    """transformers builds an empty tokenizer (every word [UNK]) for such a folder; the server answered with it."""
    import shutil

    model_dir, adapter_dir = bert_dirs
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    from verakit.serve.options import ServeOptions
    from verakit.serve.startup import load_base

    with pytest.raises(FileNotFoundError, match="the model folder has no tokenizer files"):  # before any server
        load_base(ServeOptions(model=str(bare), adapters=str(adapter_dir), task="classify"), [])
    rc = main(["serve", "--model", str(bare), "--adapters", str(adapter_dir), "--port", "0", "--threads", "1"])
    assert rc == 2
    assert f"verakit serve: error: {bare}: the model folder has no tokenizer files" in capsys.readouterr().err

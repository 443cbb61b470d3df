"""`verakit serve --engine ray` flags: checked, and named, before Ray starts."""

from __future__ import annotations

import pytest

from verakit.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "2"], "--replicas needs --engine ray"),
    (["--address", "auto"], "--address needs --engine ray"),
    (["--engine", "ray", "--replicas", "0"], "--replicas must be an integer >= 1, got 0"),
    (["--engine", "ray", "--min-replicas", "1"], "--min-replicas and max_replicas (--max-replicas) must be given together"),
    (["--engine", "ray", "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas must be >= max(1, min_replicas)"),
])
def test_ray_flags_are_refused_with_their_name(argv, message, tmp_path, capsys):
    assert main(["serve", "--adapters", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("verakit serve: error: ") and message in err


def test_ray_options_range_and_size():
    from verakit.serve.ray_engine import RayOptions

    assert RayOptions(replicas=3).most == 3 and RayOptions(min_replicas=0, max_replicas=4).most == 4


def test_a_busy_port_is_named_before_ray_starts(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        rc = main(["serve", "--engine", "ray", "--adapters", str(tmp_path), "--port", str(port)])
    assert rc == 2 and time.monotonic() - start < 10  # no cluster was started for it
    err = capsys.readouterr().err
    assert err.startswith("verakit serve: error: ") and f"cannot listen on 127.0.0.1:{port}" in err

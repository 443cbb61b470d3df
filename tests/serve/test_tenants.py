"""Who may use which adapter: --api-key, tenant keys (--keys-file) and --protect-metrics, on in-process apps over
one tiny BERT engine (the keys live in the app, so one engine serves every configuration), plus a contract run
(schemathesis, every check) against a real keyed server process."""

import json
import logging
import os
from dataclasses import replace

import pytest

from serve.cases import TOKEN, Server
from verakit.serve.auth import Grant, KeyFileError, Keys, hash_key

KEY_A, KEY_B, KEY_C, API_KEY = "tenant-a-key-0001", "tenant-b-key-0002", "tenant-c-key-0003", "single-api-key-42"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_keys(path, entries: list[tuple[str, str, list[str]]]) -> None:
    """The keys file, replaced atomically (as an editor or a deploy tool would), so it changes inode."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [{"sha256": hash_key(k), "name": n, "adapters": a} for k, n, a in entries]}))
    os.replace(tmp, path)


TENANTS = [(KEY_A, "a", ["a0", "a1", "x*"]), (KEY_B, "b", ["a2", "a3"])]


@pytest.fixture(scope="module")
def engine(bert_dirs):
    import torch

    from verakit.serve.engine import Engine
    from verakit.serve.options import ServeOptions

    torch.set_num_threads(1)
    model_dir, adapter_dir = bert_dirs
    engine = Engine(ServeOptions(model=str(model_dir), adapters=str(adapter_dir), threads=1, max_wait_ms=0))
    yield engine
    engine.close()


def client(engine, **fields):
    """A TestClient of an app over `engine` whose options carry `fields` (keys, admin token, ...)."""
    from fastapi.testclient import TestClient

    from verakit.serve.app import create_app
    from verakit.serve.metrics import ServeMetrics

    return TestClient(create_app(engine, ServeMetrics(lambda: (0, 0, 0, 0, 0)), replace(engine.options, **fields)))


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.json"
    write_keys(path, TENANTS)
    return path


def classify(c, adapter, headers):
    return c.post("/v1/classify", json={"adapter": adapter, "inputs": ["a fine film"]}, headers=headers)


def models(c, headers) -> set[str]:
    r = c.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"] if m["kind"] == "adapter"}


def test_tenant_cannot_use_list_or_probe_another_tenants_adapters(engine, keys_file, monkeypatch):
    c = client(engine, keys_file=str(keys_file), admin_token=TOKEN)
    assert classify(c, "a0", bearer(KEY_A)).status_code == 200
    assert classify(c, "a2", bearer(KEY_B)).status_code == 200
    assert classify(c, None, bearer(KEY_A)).status_code == 200  # the base model is every key's
    assert models(c, bearer(KEY_A)) == {"a0", "a1"} and models(c, bearer(KEY_B)) == {"a2", "a3"}
    assert models(c, ADMIN) == {"a0", "a1", "a2", "a3"}  # the admin token may use every adapter

    # B's existing adapter a2 and the name x2, which A's pattern allows but no file has, get the same bytes
    theirs, unknown = classify(c, "a2", bearer(KEY_A)), classify(c, "x2", bearer(KEY_A))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.content == unknown.content.replace(b"'x2'", b"'a2'")
    assert theirs.json() == {"error": {"message": "adapter 'a2' not found", "type": "not_found", "code": 404}}
    drop = {"date"}
    assert {k: v for k, v in theirs.headers.items() if k not in drop} == \
        {k: v for k, v in unknown.headers.items() if k not in drop}
    # Timing: a refused name never reaches the store, so whether B's file exists cannot change the answer's time.
    looked_up: list[str] = []
    real_exists = engine.store.exists
    monkeypatch.setattr(engine.store, "exists", lambda name: looked_up.append(name) or real_exists(name))
    for name in ("a2", "a3", "never-was"):
        assert classify(c, name, bearer(KEY_A)).status_code == 404
    assert looked_up == []
    assert classify(c, "a0", bearer(KEY_A)).status_code == 200 and looked_up == ["a0"]


def test_wrong_and_missing_keys_are_401(engine, keys_file):
    c = client(engine, keys_file=str(keys_file))
    for headers in ({}, bearer("wrong-key-0000"), {"Authorization": KEY_A}, {"Authorization": f"Basic {KEY_A}"},
                    bearer(KEY_A + "x"), bearer(KEY_A[:-1])):
        for r in (classify(c, "a0", headers), c.get("/v1/models", headers=headers)):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
            assert r.json() == {"error": {"message": "missing or wrong API key", "type": "http_error", "code": 401}}
    # without an admin token, the admin token's empty default is no key
    assert classify(c, "a0", bearer("")).status_code == 401


def test_single_api_key_opens_every_adapter(engine):
    c = client(engine, api_key=API_KEY)
    assert classify(c, "a0", {}).status_code == 401 and classify(c, "a3", bearer("nope-nope")).status_code == 401
    assert classify(c, "a3", bearer(API_KEY)).status_code == 200
    assert models(c, bearer(API_KEY)) == {"a0", "a1", "a2", "a3"}
    r = classify(c, "zz", bearer(API_KEY))
    assert r.status_code == 404 and r.json()["error"]["message"] == "adapter 'zz' not found"
    assert classify(client(engine), "a3", {}).status_code == 200  # keys off: open, as before


def test_keys_file_edits_apply_while_serving(engine, keys_file, caplog):
    c = client(engine, keys_file=str(keys_file))
    assert classify(c, "a2", bearer(KEY_B)).status_code == 200
    assert classify(c, "a1", bearer(KEY_C)).status_code == 401
    write_keys(keys_file, [TENANTS[0], (KEY_C, "c", ["a1", "a2"])])  # B removed, C added
    assert classify(c, "a2", bearer(KEY_B)).status_code == 401
    assert classify(c, "a2", bearer(KEY_C)).status_code == 200 and models(c, bearer(KEY_C)) == {"a1", "a2"}
    for bad in ("{not json", json.dumps({"keys": [{"sha256": "abc", "adapters": ["a0"]}]}), json.dumps([1])):
        tmp = keys_file.with_suffix(".tmp")
        tmp.write_text(bad)
        with caplog.at_level(logging.ERROR, logger="verakit.serve.auth"):
            caplog.clear()
            os.replace(tmp, keys_file)
            assert classify(c, "a2", bearer(KEY_C)).status_code == 200  # the keys in force stay
            assert classify(c, "a2", bearer(KEY_B)).status_code == 401
        assert any(str(keys_file) in m and "keeping the 2 keys in force" in m for m in caplog.messages), caplog.text
    keys_file.unlink()  # a deleted file is a bad file too
    assert classify(c, "a0", bearer(KEY_A)).status_code == 200
    write_keys(keys_file, [(KEY_B, "b", ["a*"])])  # and a good file after bad ones applies
    assert classify(c, "a0", bearer(KEY_A)).status_code == 401 and classify(c, "a0", bearer(KEY_B)).status_code == 200


def test_metrics_and_health_open_by_default_protected_when_asked(engine, keys_file):
    open_ = client(engine, keys_file=str(keys_file), admin_token=TOKEN)
    for path in ("/health", "/metrics"):
        assert open_.get(path).status_code == 200
    shut = client(engine, keys_file=str(keys_file), admin_token=TOKEN, protect_metrics=True)
    for path in ("/health", "/metrics"):
        for headers in ({}, bearer(KEY_A), bearer("wrong-token")):  # a tenant key is not the admin token
            r = shut.get(path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
        assert shut.get(path, headers=ADMIN).status_code == 200
    doc = shut.get("/openapi.json").json()["paths"]
    assert set(doc["/metrics"]["get"]["responses"]) == {"200", "401", "500"}


def test_openapi_states_the_401_and_the_bearer_scheme_when_keys_are_on(engine, keys_file):
    doc = client(engine, keys_file=str(keys_file)).get("/openapi.json").json()
    for path, method in (("/v1/classify", "post"), ("/v1/models", "get")):
        op = doc["paths"][path][method]
        assert "401" in op["responses"] and op["security"] == [{"apiKey": []}], (path, op)
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["apiKey"]["description"]}
    assert "security" not in doc["paths"]["/health"]["get"] and "need an API key" in doc["info"]["description"]
    plain = client(engine).get("/openapi.json").json()
    assert "401" not in plain["paths"]["/v1/classify"]["post"]["responses"]
    assert "security" not in plain["paths"]["/v1/classify"]["post"]


def test_generate_routes_check_the_key_before_batching(llama_dirs, tmp_path):
    from verakit.serve.engine import Engine
    from verakit.serve.options import ServeOptions

    path = tmp_path / "keys.json"
    write_keys(path, [(KEY_A, "a", ["g0"])])
    engine = Engine(ServeOptions(model=str(llama_dirs[0]), adapters=str(llama_dirs[1]), threads=1, max_wait_ms=0,
                                 max_new_tokens=4))
    try:
        c = client(engine, keys_file=str(path))
        body = {"model": "g1", "max_tokens": 2}
        comp = c.post("/v1/completions", json={**body, "prompt": "hi"}, headers=bearer(KEY_A))
        chat = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]},
                      headers=bearer(KEY_A))
        assert comp.status_code == chat.status_code == 404 and comp.content == chat.content
        assert comp.json()["error"]["message"] == "adapter 'g1' not found"
        assert c.post("/v1/completions", json={**body, "prompt": "hi"}).status_code == 401
        assert c.post("/v1/completions", json={**body, "model": "g0", "prompt": "hi"}, headers=bearer(KEY_A)).status_code == 200
    finally:
        engine.close()


def test_keys_file_format_and_grants(tmp_path):
    assert Grant("t", ("acme-*", "shared")).allows("acme-x") and not Grant("t", ("acme-*",)).allows("Acme-x")
    assert not Grant("t", ("a0",)).allows("a00") and Grant("t", None).allows("anything")
    bad = tmp_path / "bad.json"
    z = "0" * 64
    for doc, fault in (("", "cannot read it"), ({"keys": {}}, "at the top level"),
                       ({"keys": [{"sha256": "00", "adapters": []}]}, "keys[0].sha256 must be 64 hex digits"),
                       ({"keys": [{"sha256": z, "adapters": "a0"}]}, "keys[0].adapters"),
                       ({"keys": [{"sha256": z, "adapters": ["a0"], "key": "x"}]}, "keys[0] must be"),
                       ({"keys": [{"sha256": z, "adapters": ["a"]}, {"sha256": z, "adapters": ["b"]}]},
                        "keys[1].sha256 repeats")):
        text = doc if isinstance(doc, str) else json.dumps(doc)
        bad.write_text(text)
        with pytest.raises(KeyFileError, match="keys file .*bad.json") as e:
            Keys(None, None, str(bad))
        assert fault in str(e.value)
    with pytest.raises(KeyFileError, match="missing.json: cannot read it"):
        Keys(None, None, str(tmp_path / "missing.json"))


def test_options_and_hash_key_cli(tmp_path, capsys):
    from verakit.cli import main
    from verakit.serve.options import OptionError, ServeOptions

    with pytest.raises(OptionError, match="api_key must be at least 8"):
        ServeOptions(model=None, adapters=".", api_key="short")
    with pytest.raises(OptionError, match="protect_metrics needs an admin token"):
        ServeOptions(model=None, adapters=".", protect_metrics=True)
    assert main(["hash-key", "--name", "acme", "--adapter", "acme-*", "--adapter", "a0", "--key", KEY_A]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry == {"sha256": hash_key(KEY_A), "name": "acme", "adapters": ["acme-*", "a0"]}
    (tmp_path / "k.json").write_text(json.dumps({"keys": [entry]}))
    keys = Keys(None, None, str(tmp_path / "k.json"))
    assert keys.grant(KEY_A) == Grant("acme", ("acme-*", "a0")) and keys.grant(KEY_B) is None
    assert main(["hash-key", "--name", "new", "--adapter", "b*"]) == 0  # a fresh key, on stderr only
    out = capsys.readouterr()
    fresh = out.err.strip().rsplit(" ", 1)[-1]
    assert fresh.startswith("vk-") and fresh not in out.out and json.loads(out.out)["sha256"] == hash_key(fresh)


def test_schemathesis_finds_nothing_on_a_keyed_server(bert_dirs, tmp_path, tmp_path_factory):
    """The whole contract with keys on: the 401s and the bearer scheme are in the document (schemathesis's
    ignored_auth check sends requests without the key and expects them refused)."""
    from serve.test_contract import _schemathesis

    keys = tmp_path / "keys.json"
    write_keys(keys, TENANTS)
    server = Server(["--model", str(bert_dirs[0]), "--adapters", str(bert_dirs[1]), "--admin-token", TOKEN,
                     "--keys-file", str(keys), "--max-inputs", "4", "--max-body-bytes", "20000",
                     "--max-upload-bytes", "200000"], tmp_path_factory.mktemp("logs") / "keyed.log")
    try:
        assert classify_http(server, "a2", KEY_A) == 404 and classify_http(server, "a2", KEY_B) == 200
        _schemathesis(server, tmp_path, ["a0", "bert"], max_examples=8, max_time=15, reaches="/v1/classify")
    finally:
        server.stop()


def classify_http(server, adapter, key) -> int:
    import httpx

    return httpx.post(f"{server.url}/v1/classify", json={"adapter": adapter, "inputs": ["x"]},
                      headers=bearer(key), timeout=30).status_code

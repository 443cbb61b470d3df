"""`verakit serve --shutdown-timeout-s` reaches uvicorn (docs/reliability.md: graceful shutdown is uvicorn's,
"with its timeout taken from --shutdown-timeout-s"; it was a fixed 5 s). uvicorn's run is replaced by a recorder,
so nothing is served: the test sees the Config the CLI's server hands it."""

import uvicorn

from verakit.cli import main


def test_shutdown_timeout_flag_is_uvicorns_graceful_shutdown_timeout(bert_dirs, monkeypatch):
    model_dir, adapter_dir = bert_dirs
    seen: list[tuple[float | None, int]] = []

    def run(self, sockets=None):
        # What uvicorn waits for the requests in progress on SIGTERM before cancelling them.
        seen.append((self.config.timeout_graceful_shutdown, len(sockets)))

    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert main(["serve", "--model", str(model_dir), "--adapters", str(adapter_dir), "--port", "0",
                 "--threads", "1", "--shutdown-timeout-s", "2.5"]) == 0
    assert seen == [(2.5, 1)]

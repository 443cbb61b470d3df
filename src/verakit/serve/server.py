"""The server process: a loaded engine, its HTTP app (serve/app.py) and a bound socket, run by uvicorn.

`Server` binds before serving, so the caller can say where it listens (the real port, when asked for 0)
and report a port in use as an error of its own; `run_server` is what `verakit serve` runs.
"""

import logging
import socket

from .app import create_app
from .engine import Engine
from .metrics import ServeMetrics
from .options import ServeOptions

__all__ = ["Server", "run_server"]

log = logging.getLogger(__name__)


class Server:
    """A loaded engine, its app and a bound, listening socket; `serve()` then runs until interrupted.

    Binding before serving lets the caller say where the server listens (the real port, when asked for 0)
    and report a port in use as an error of its own rather than a log line from inside uvicorn.
    """

    def __init__(self, options: ServeOptions) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        holder: list[Engine] = []
        self.metrics = ServeMetrics(lambda: holder[0].bank_stats() if holder else (0, 0, 0, 0, 0))
        self.engine = engine = Engine(options, on_batch=self.metrics.observe_batch)
        holder.append(engine)
        self.options = options
        try:
            self.app = create_app(engine, self.metrics, options)
            self.socket = _listen(options.host, options.port)
        except BaseException:
            engine.close()
            raise
        log.info(
            "serving %s model %r: bank rank %d over %d layers, capacity %d, slot tables %.1f MiB; adapters from %s",
            engine.task, engine.base_name, engine.bank.config.r, len(engine.bank.layers), options.capacity,
            engine.bank.nbytes() / 2**20, options.adapters,
        )

    @property
    def url(self) -> str:
        """http://HOST:PORT with the port actually bound."""
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def describe(self) -> str:
        """One line: where it listens, the task, the model and how many adapters it can serve."""
        e = self.engine
        refused = f", {e.adapters_refused} refused (409)" if e.adapters_refused else ""
        count = f"{e.adapters_planned} adapter{'' if e.adapters_planned == 1 else 's'}"
        return f"listening on {self.url} (task {e.task}, model {e.base_name}, {count}{refused})"

    def serve(self) -> None:
        """Serve until interrupted (Ctrl-C, SIGTERM); the engine and socket are closed afterwards."""
        import uvicorn

        # On SIGTERM uvicorn closes the socket (new connections are refused), lets the requests in progress
        # finish for up to shutdown_timeout_s, then cancels them; the engine's batcher then drains and stops.
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=self.options.shutdown_timeout_s)
        try:
            uvicorn.Server(config).run(sockets=[self.socket])
        finally:
            self.engine.close()
            self.socket.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); OSError naming the address when that is impossible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run_server(options: ServeOptions) -> None:
    """Load the model and adapters named by `options`, print where it listens, and serve until interrupted."""
    server = Server(options)
    print(f"verakit serve: {server.describe()}", flush=True)
    server.serve()

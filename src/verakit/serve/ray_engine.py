"""`verakit serve --engine ray`: the same HTTP app on Ray Serve replicas over one adapter directory.

Each replica is one Ray actor that builds its own Engine (base model, AdapterBank, batcher) and the app of
`serve/app.py` from the same ServeOptions, so every route, bound and error answer is the local server's.
Ray Serve's proxy listens on --host/--port and routes each request to a replica; Ray restarts a replica
whose process dies. Replicas share nothing but the adapter directory: a request checks its adapter's file,
and before each batch a replica polls the store's generation token to drop adapters replaced on disk
(`serve/engine.py`, `serve/store.py`), which bounds how long an overwritten adapter is served stale.

Ray is an optional extra (`pip install 'verakit[ray]'`), imported only inside these functions.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..fileformat import AdapterError
from .options import ServeOptions
from .store import AdapterStore

__all__ = ["REPLICA_HEADER", "APP_NAME", "RayOptions", "RayOptionError", "ReplicaApp", "RayServer", "application",
           "pinned"]

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-verakit-replica"  # on every answer: "HOST:PID" of the replica that served it
APP_NAME = "verakit"
# Requests one replica may hold at once. The batcher needs many in flight to fill a batch (Ray's default
# of 5 would cap batches at 5 requests); beyond this Ray queues them in the proxy.
MAX_ONGOING = 256


class RayOptionError(ValueError):
    """A Ray-only setting is invalid; `field` names it (the CLI turns it into its flag)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"RayOptions.{field} {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class RayOptions:
    """How many replicas and where; `verakit serve --engine ray` flags map one to one onto these fields.

    replicas: fixed number of replicas (ignored when min_replicas/max_replicas set an autoscaling range).
    min_replicas, max_replicas: autoscaling range; Ray adds a replica when replicas average more than
        `max_batch` requests in flight, and removes one when load falls.
    address: a running Ray cluster to join ("auto", "ray://HOST:10001", "HOST:6379"); None starts a local
        one (no dashboard, no usage reporting) that lives as long as the command. Ray's own processes
        listen on all interfaces with its token authentication; only the HTTP proxy binds `host`.
    cpus_per_replica: Ray CPUs each replica reserves (the engine's torch threads should match).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    address: str | None = None
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise RayOptionError("replicas", f"must be an integer >= 1, got {self.replicas!r}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise RayOptionError("min_replicas", "and max_replicas (--max-replicas) must be given together: "
                                 "they are an autoscaling range")
        if self.min_replicas is not None and self.max_replicas is not None:
            if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
                raise RayOptionError("max_replicas", f"must be >= max(1, min_replicas); got range "
                                     f"{self.min_replicas}..{self.max_replicas}")
        if self.cpus_per_replica <= 0:
            raise RayOptionError("cpus_per_replica", f"must be > 0, got {self.cpus_per_replica}")

    @property
    def most(self) -> int:
        """The most replicas this can run at once."""
        return self.max_replicas if self.max_replicas is not None else self.replicas


class _ReplicaHeader:
    """ASGI middleware: name the replica in every answer, so a client (or a test) sees who served it."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


class ReplicaApp:
    """One replica: an Engine and its app built from `options` (a ServeOptions as a dict, so Ray ships
    plain data to the actor). Ray wraps this class with serve.ingress; it works without Ray too."""

    def __init__(self, options: dict[str, Any]) -> None:
        from .engine import Engine
        from .metrics import ServeMetrics

        self.options = ServeOptions(**options)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        holder: list[Engine] = []
        self.metrics = ServeMetrics(lambda: holder[0].bank_stats() if holder else (0, 0, 0, 0, 0))
        self.engine = Engine(self.options, on_batch=self.metrics.observe_batch)
        holder.append(self.engine)

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        app = create_app(self.engine, self.metrics, self.options, replica=self.replica)
        app.add_middleware(_ReplicaHeader, replica=self.replica)
        return app

    def check_health(self) -> None:
        """Ray's periodic probe: a replica whose batcher thread died cannot answer; Ray replaces it."""
        if not self.engine.batcher._thread.is_alive():
            raise RuntimeError(f"replica {self.replica}: the batcher thread has stopped")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _port(host: str, port: int) -> int:
    """`port` (a free one for 0) after checking that it can be bound: Ray's proxy binds it only after the
    cluster and the replicas started, and reports a busy port as a long traceback; this names it first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family) as s:
            return s.getsockname()[1]
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def pinned(options: ServeOptions) -> tuple[ServeOptions, int]:
    """`options` with the bank rank fixed from the adapters on disk now, and how many there are.

    Every replica must build the same bank, also one Ray starts later after uploads changed the directory
    (a replacement for a dead replica, or autoscaling): otherwise one replica would accept an upload that
    another refuses. The rank is the only planned setting that follows the largest adapter."""
    from .startup import plan_config

    store = AdapterStore(options.adapters)
    infos = []
    for name in store.names():
        try:
            infos.append(store.info(name))
        except AdapterError:
            continue  # the replicas log it
    config, _ = plan_config(infos, options.rank)
    return replace(options, rank=config.r), len(infos)


def application(options: ServeOptions, ray_options: RayOptions) -> Any:
    """The Ray Serve application of `options` (pass them through `pinned` first), sized by `ray_options`;
    for `serve.run`. Needs `ray.init` to have run."""
    from ray import serve

    scale: dict[str, Any] = {"num_replicas": ray_options.replicas}
    if ray_options.min_replicas is not None:
        scale = {"autoscaling_config": {"min_replicas": ray_options.min_replicas, "max_replicas": ray_options.max_replicas,
                                        "target_ongoing_requests": options.max_batch}}
    deployment = serve.deployment(serve.ingress()(ReplicaApp)).options(
        name=APP_NAME, max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": ray_options.cpus_per_replica},
        **scale)
    return deployment.bind(asdict(options))


class RayServer:
    """Deploys the app on Ray Serve (joining or starting a cluster); `serve()` blocks until interrupted."""

    def __init__(self, options: ServeOptions, ray_options: RayOptions) -> None:
        import ray
        from ray import serve

        self.options, self.adapters = pinned(options)
        self.ray_options = ray_options
        self.own_cluster = ray_options.address is None
        port = _port(self.options.host, self.options.port)
        if self.own_cluster:
            # A private cluster for this command: no dashboard, nothing reported home. The node address is
            # loopback, but Ray binds its ports on every interface regardless (its token auth guards them).
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=max(1, round(ray_options.most * ray_options.cpus_per_replica)), include_dashboard=False,
                     _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
        else:
            ray.init(address=ray_options.address, configure_logging=False, log_to_driver=False)
        # ray.init installs a handler that dies on SIGTERM, leaving the cluster's agents behind; from here a
        # SIGTERM (a service manager stopping us, even while the replicas still load) unwinds like Ctrl-C
        # through close().
        signal.signal(signal.SIGTERM, _interrupt)
        self.url = f"http://[{self.options.host}]:{port}" if ":" in self.options.host else f"http://{self.options.host}:{port}"
        try:
            serve.start(http_options={"host": self.options.host, "port": port})
            serve.run(application(self.options, ray_options), name=APP_NAME, route_prefix="/")
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        """One line: where the proxy listens, how many replicas, the model and adapters."""
        r = self.ray_options
        size = (f"{r.min_replicas}..{r.max_replicas} replicas (autoscaling)" if r.min_replicas is not None
                else f"{r.replicas} replica{'' if r.replicas == 1 else 's'}")
        where = "a local Ray cluster" if self.own_cluster else f"Ray cluster {r.address}"
        return (f"listening on {self.url} (engine ray: {size} on {where}; model {self.options.model or 'default'}, "
                f"bank rank {self.options.rank}, {self.adapters} adapters in {self.options.adapters})")

    def serve(self) -> None:
        """Block until SIGINT or SIGTERM, then remove the app (and stop the cluster this command started)."""
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            if self.own_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            if self.own_cluster:
                ray.shutdown()

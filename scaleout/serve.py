"""The detection service on Ray Serve: the same HTTP API, on replicas spread over a Ray cluster.

What takes HTTP requests on a node is ``scaleout.ingress``'s decision (HAProxy, or Serve's Python proxy).
Two shapes behind it (``build_app(..., retry=...)``; ``refinedet ray-serve`` retries unless ``--direct``)::

    retry (default): ingress -> Ingress (CPU, light) --handle--> Detector replicas
    direct:          ingress -> HttpDetector replicas (each one an HTTP ingress replica)

Each replica (``Replica``) runs the service's whole app (``service.app.create_app``), serving the engine
plan ``deploy.prepare`` decides on that replica's node (the same decision ``refinedet serve`` makes there,
from the node's cache: the fastest verified CPU engine, or a TensorRT engine on a GPU): the same routes,
upload checks, errors, metrics and the project's dynamic batcher (not ``@serve.batch``: one batching
implementation everywhere, with its deadline, queue bound, per-request failures and the engine-side JPEG
decode that ``@serve.batch`` knows nothing of).

``Ingress`` forwards each HTTP request to a ``Detector`` replica through a deployment handle and, when that
replica dies before answering, sends it to another one (detection is idempotent); when none answers it says
so as the service does: a JSON 503 with ``Retry-After``. A request whose replica died is lost in ``direct``
(HAProxy closes its connection; Serve's proxy answers a plain-text 500): its price for saving the handle hop. On the 2-core machine of
docs/scaling.md one ``direct`` replica behind HAProxy served 0.97-0.98x ``refinedet serve``'s requests per
second, the default 0.88-0.94x (behind Serve's Python proxy: 0.89-0.90x and 0.87-0.89x).

Every answer carries ``X-Served-By: <node id[:12]>/<replica id>``, and ``X-Attempts: n`` when it took more
than one replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from service.errors import ServiceError, overloaded, payload_too_large, unavailable
from service.settings import Settings

log = logging.getLogger("refinedet.scaleout")
APP_NAME = "refinedet"
RETRYABLE = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")
REQUEST_ID = b"x-request-id"  # Serve's HTTP servers add it to every answer; the app's copy is dropped


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the ingress received it."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Replica:
    """One replica: the service app (``service_app``; ``app`` is Serve's name for an ingress's ASGI app) with its
    model loaded. ``Detector`` and ``HttpDetector`` are its two faces."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]  # Serve awaits it
        from deploy.prepare import prepare
        from service.app import create_app
        from service.backends import load_backend
        from service.state import ServiceStatus

        plan = await asyncio.to_thread(prepare, settings)  # on this node, for its hardware (its cache)
        log.info("replica engine: %s", plan.summary())
        backend = await asyncio.to_thread(load_backend, plan, settings)  # loaded and warmed up
        self.service_app = create_app(settings, loader=lambda _: backend, plan=plan)
        self._lifespan = self.service_app.router.lifespan_context(self.service_app)
        await self._lifespan.__aenter__()
        state = self.service_app.state.service
        while state.status == ServiceStatus.LOADING:
            await asyncio.sleep(0.01)
        if state.status != ServiceStatus.READY:
            raise RuntimeError(f"the model did not load: {state.error}")
        self.served_by = f"{_node_id()[:12]}/{_replica_id()}".encode()

    def where(self) -> dict[str, Any]:
        """Node, replica and process of this replica (for operators and the cluster test)."""
        return {"node_id": _node_id(), "replica": _replica_id(), "pid": os.getpid()}

    def check_health(self) -> None:
        """Serve restarts a replica whose model failed or that stopped serving."""
        from service.state import ServiceStatus

        state = self.service_app.state.service
        if state.status in (ServiceStatus.FAILED, ServiceStatus.SHUTTING_DOWN):
            raise RuntimeError(f"replica not serving: {state.status} ({state.error})")

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


class Detector(Replica):
    """A replica behind ``Ingress``: a ``Forwarded`` request in, an ``Answer`` out, over ASGI without a socket."""

    async def __call__(self, request: Forwarded) -> Answer:
        return await call_asgi(self.service_app, request, self.served_by)


class HttpDetector(Replica):
    """A replica that is Serve's HTTP ingress (``direct``): it gets each request's ASGI messages from its own HTTP
    server behind HAProxy, or from Serve's proxy."""

    def __serve_build_asgi_app__(self) -> Any:
        return ServedApp(self.service_app, self.served_by)


class ServedApp:
    """The ASGI app Serve drives in an ``HttpDetector``: the service app, its answers tagged with the replica.
    The replica already runs the app's lifespan (``Replica``), so Serve's lifespan events are acknowledged."""

    def __init__(self, app: Any, served_by: bytes) -> None:
        self.app = app
        self.served_by = served_by

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [*_without_request_id(message.get("headers", [])), (b"x-served-by", self.served_by)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged)


async def call_asgi(app: Any, request: Forwarded, served_by: bytes) -> Answer:
    """Run one request through an ASGI app in-process."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": ("ray-serve-ingress", 0),
        "server": ("replica", 0),
    }
    sent_body = False
    never = asyncio.Event()
    status, headers, chunks = 500, [], []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await never.wait()  # the ingress holds the client; a disconnect is not seen here
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return Answer(status, [*headers, (b"x-served-by", served_by)], b"".join(chunks))


class Ingress:
    """Forwards requests to ``Detector`` replicas; a request whose replica died goes to another one."""

    def __init__(self, detector: Any, attempts: int = 3, timeout_s: float = 60.0) -> None:
        self.detector = detector
        self.attempts = attempts
        self.timeout_s = timeout_s

    async def forward(self, request: Forwarded) -> Answer:
        deadline = time.monotonic() + self.timeout_s
        last = "no replica answered"
        for attempt in range(1, self.attempts + 1):
            try:
                answer: Answer = await self.detector.remote(request)
            except Exception as exc:  # Ray's errors for a dead replica differ by version: matched by name
                names = {cls.__name__ for cls in type(exc).__mro__}
                if "BackPressureError" in names:
                    return _error(overloaded("every replica is at capacity"), request.path)
                if not names & set(RETRYABLE) or time.monotonic() > deadline:
                    raise
                last = type(exc).__name__
                log.warning("replica failed (%s), attempt %d of %d", last, attempt, self.attempts)
                continue
            if attempt > 1:
                answer.headers.append((b"x-attempts", str(attempt).encode()))
            return answer
        return _error(unavailable(f"no replica could serve the request ({last})"), request.path)


def _without_request_id(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` less the app's ``X-Request-ID``: Serve's HTTP server sends the same one (the app echoes the
    id Serve put on the request)."""
    return [(k, v) for k, v in headers if k.lower() != REQUEST_ID]


def _error(error: ServiceError, path: str) -> Answer:
    """``error`` as the service answers a request for ``path`` (``service.errors``)."""
    return Answer(error.status, error.response_headers(path=path), error.body(path))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica
        return "local"


def gpus_per_replica(requested: float | None) -> float:
    """``requested``, else 1 when the cluster has GPUs, else 0 (so a CPU cluster schedules replicas)."""
    if requested is not None:
        return requested
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build_app(
    settings: Settings,
    replicas: int,
    num_gpus: float,
    actor_options: dict[str, Any] | None = None,
    retry: bool = True,
) -> Any:
    """The Serve application: ``Detector`` replicas behind ``Ingress`` (one per replica, CPU) with ``retry``,
    else ``HttpDetector`` replicas as Serve's HTTP ingress; each replica with ``num_gpus`` GPUs, one CPU and
    ``actor_options`` (Ray actor options, e.g. ``resources``). Both deployments are named ``Detector``."""
    from ray import serve

    detector = serve.deployment(  # type: ignore[attr-defined]
        Detector if retry else serve.ingress()(HttpDetector),
        name="Detector",
        num_replicas=replicas,
        max_ongoing_requests=max(2 * settings.max_queue_size, 8),
        ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus, **(actor_options or {})},
        health_check_period_s=5,
        graceful_shutdown_timeout_s=settings.graceful_timeout_s,
    ).bind(settings)
    if not retry:
        return detector

    @serve.deployment(name="Ingress", num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    class IngressDeployment:
        def __init__(self, detector_handle: Any) -> None:
            self.ingress = Ingress(detector_handle, timeout_s=settings.request_timeout_s * 2)

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import Response

            body = await request.body()
            forwarded = Forwarded(
                request.method, request.url.path, request.url.query.encode(), list(request.headers.raw), body
            )
            if len(body) > settings.max_upload_bytes:
                answer = _error(payload_too_large(settings.max_upload_bytes), forwarded.path)
            else:
                answer = await self.ingress.forward(forwarded)
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in _without_request_id(answer.headers)
                if k.lower() != b"content-length"
            }
            return Response(answer.body, status_code=answer.status, headers=headers)

    return IngressDeployment.bind(detector)  # type: ignore[attr-defined]


def run(
    settings: Settings,
    address: str,
    host: str,
    port: int,
    replicas: int,
    gpus: float | None,
    blocking: bool,
    proxy_location: str = "EveryNode",
    retry: bool = True,
    ingress: str = "auto",
) -> None:
    """Connect to the Ray cluster at ``address``, start Serve with ``ingress`` on ``host:port``
    (``scaleout.ingress.start``) and deploy (``build_app``); with ``blocking`` keep running until
    interrupted."""
    import ray
    from ray import serve

    from scaleout.ingress import start

    ray.init(address=address, log_to_driver=False)
    chosen = start(host, port, proxy_location, ingress)
    num_gpus = gpus_per_replica(gpus)
    app = build_app(settings, replicas, num_gpus, retry=retry)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    shape = "behind the retrying ingress" if retry else "each one an HTTP ingress (direct)"
    print(
        f"refinedet on Ray Serve: {replicas} replica(s) {shape}, {num_gpus:g} GPU each, "
        f"{chosen} on http://{host}:{port}",
        flush=True,
    )
    if blocking:
        while True:
            time.sleep(3600)

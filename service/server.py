"""How uvicorn runs the service: ``run(settings)`` and the options it uses, in one place. ``deploy.cli``
(``refinedet serve``) decides what to serve, then calls ``run``.

- HTTP protocol: ``service.protocol.LimitedHttpToolsProtocol`` (httptools with a connection cap, a
  header-size limit (431) and a header timeout, and admission's refusals answered from the request's
  headers); its limits and the admission hook come from the app's lifespan state.
- ``ws="none"``: the service has no WebSocket routes, so no WebSocket implementation runs; an ``Upgrade`` is
  served as plain HTTP (``service.protocol``), its answer in the service's JSON like any other.
- ``timeout_keep_alive``: ``keep_alive_timeout_s``.
- Graceful shutdown: on SIGTERM/SIGINT uvicorn stops accepting, the app drains (``service.admission``):
  every request in flight is answered within ``graceful_timeout_s``, a result or 503 ``shutting_down``.
  uvicorn's own graceful timeout is ``DRAIN_MARGIN_S`` longer, so it never has to cancel a request itself
  (which would answer a bare 500).
- One worker: the app object, in this process. Several: ``service.workers.Supervisor`` runs them (one
  listening socket, metrics summed over the workers, a dead worker replaced, a stop that resets no
  connection); each builds the app with ``create_app_from_env``, reading the settings from ``REFINEDET_*``
  variables and the plan from ``REFINEDET_ENGINE_PLAN`` exported here.
- Each serving process is set up by ``service.process.prepare_process`` (allocator, warnings).
- A port that cannot be bound (taken by another server, privileged, an address not on this host) is
  reported by ``check_port`` in one line before uvicorn starts (uvicorn logs it mid-start-up and exits 3).
"""

from __future__ import annotations

import errno
import logging
import logging.config
import math
import os
import socket
from typing import Any

from model.errors import UserError
from model.runtime.plan import PLAN_ENV, EnginePlan
from service.listener import bind_listener
from service.settings import Settings

log = logging.getLogger("refinedet.service")


class ServeFailed(UserError):
    """The server stopped because it could not serve (the CLI prints the reason in one line, exit 2)."""


PROTOCOL = "service.protocol:LimitedHttpToolsProtocol"
DRAIN_MARGIN_S = 3.0


def uvicorn_options(settings: Settings, json_logs: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (without the app and workers)."""
    from model.logs import log_config

    return {
        "host": settings.host,
        "port": settings.port,
        "http": PROTOCOL,
        "ws": "none",
        "log_config": log_config(settings.log_level, json_logs=json_logs),
        "access_log": False,  # the service writes its own, with request ids
        "proxy_headers": True,
        "timeout_keep_alive": max(1, math.ceil(settings.keep_alive_timeout_s)),
        "timeout_graceful_shutdown": math.ceil(settings.graceful_timeout_s + DRAIN_MARGIN_S),
    }


class PortError(UserError):
    """The address to serve on cannot be bound; the message says why and what to do."""


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (``SO_REUSEADDR``) and let go; a ``PortError`` naming the cause
    when that fails. A check, not a reservation: uvicorn binds again right after."""
    bind(host, port).close()


def bind(host: str, port: int) -> socket.socket:
    """``host:port`` bound as uvicorn binds it (``service.listener.bind_listener``), or a ``PortError``."""
    try:
        return bind_listener(host, port)
    except OSError as exc:
        raise PortError(_bind_failure(host, port, exc)) from None


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host} (another server listens there): stop it or pick another --port"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); pick another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine; check --host"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def run(settings: Settings, plan: EnginePlan, json_logs: bool = True) -> None:
    """Serve ``plan`` (``deploy.prepare``'s decision) until SIGTERM/SIGINT, then drain (see the module
    docstring)."""
    import uvicorn

    from service.process import prepare_process

    check_port(settings.host, settings.port)
    prepare_process()
    options = uvicorn_options(settings, json_logs)
    if settings.workers == 1:
        from service.app import create_app

        failures: list[str] = []
        servers: list[uvicorn.Server] = []

        def stop(reason: str) -> None:  # a model that cannot load will not load later: no 503 loop
            failures.append(reason)
            servers[0].should_exit = True  # uvicorn's graceful exit, as on SIGTERM

        servers.append(
            uvicorn.Server(uvicorn.Config(create_app(settings, plan=plan, on_failed=stop), **options))
        )
        servers[0].run()
        if failures:
            raise ServeFailed(f"the model failed to load, so nothing was served: {failures[0]}")
    else:
        from service.workers import Supervisor, WorkerFailed

        logging.config.dictConfig(options["log_config"])
        os.environ.update(settings.to_env())
        os.environ[PLAN_ENV] = plan.to_json()
        grace_s = options["timeout_graceful_shutdown"]
        try:
            Supervisor(bind(settings.host, settings.port), options, settings.workers, grace_s).run()
        except WorkerFailed as exc:
            raise ServeFailed(f"{exc}, so nothing more is served; the reason is in the log") from None

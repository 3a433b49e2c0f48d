"""Several worker processes on one port (``refinedet serve --workers N``): ``Supervisor`` starts them,
replaces one that dies, and stops them without losing a connection. Each worker is a spawned process
running ``serve_worker``: uvicorn's ``Server`` with the app ``service.app.create_app_from_env`` builds
(settings from ``REFINEDET_*``, the plan from ``REFINEDET_ENGINE_PLAN``, both exported by ``service.server``).

- **One listening socket**, bound by the supervisor and shared (``service.listener``): one accept queue,
  so a connection is taken by whichever worker is free, and while one worker is gone the others take
  every connection.
- **Metrics of every worker**: a fresh, empty ``PROMETHEUS_MULTIPROC_DIR`` for the run (removed at the
  end); any worker's ``/metrics`` sums every worker's (``service.metrics``); a dead worker's live gauges
  are removed.
- **A worker that dies** (killed, crashed) is replaced at once; one that keeps dying within ``STABLE_S`` of
  its start is replaced after a growing pause (``restart_delay``: 1, 2, 4 ... 30 s), so a crash loop does
  not spend the host's cores on loading models. The replacement takes connections only
  once its model is loaded and warmed up (``create_app(serve_when_ready=True)``): meanwhile the other
  workers take them all, none is answered ``not_ready``. At the first start every worker listens at once
  and answers 503 ``not_ready`` while it loads, as one worker does. A worker whose model fails to load
  stops the server (exit status 2 and one line, as with one worker), rather than being restarted in a
  loop.
- **Stopping** (SIGTERM or SIGINT to the supervisor, the ``refinedet serve`` process): new connections
  are stopped first (``listener.stop_handshakes``: clients are refused, never reset), the workers accept
  what is already queued, the supervisor lets go of the socket, then tells each worker to stop: each
  drains as one worker does (``service.admission``: every request in flight answered within
  ``GRACEFUL_TIMEOUT_S``). Workers ignore SIGTERM and SIGINT themselves (a signal to the whole process
  group, Ctrl+C or systemd's, reaches the supervisor, which orders the stop); they stop when the
  supervisor tells them, or when it is gone.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from service.listener import stop_handshakes, wait_accepted
from service.metrics import MULTIPROC_ENV

log = logging.getLogger("refinedet.service")
STARTUP_FAILURE = 3  # a worker's exit status when it could not start serving (uvicorn's own for this)
STOP = "stop"
KILL_AFTER_S = 5.0  # a worker still running this long after its drain should have ended is killed
STABLE_S = 30.0  # a worker that served this long before it ended was not crash-looping
MAX_RESTART_DELAY_S = 30.0


def restart_delay(quick_ends: int) -> float:
    """Seconds before replacing a worker in a slot whose last ``quick_ends`` workers each ended within
    ``STABLE_S`` of their start: none for the first (a one-off kill), then 1, 2, 4 ... ``MAX_RESTART_DELAY_S``."""
    return 0.0 if quick_ends <= 1 else min(2.0 ** (quick_ends - 2), MAX_RESTART_DELAY_S)


class WorkerFailed(RuntimeError):
    """A worker could not start serving (its model failed to load): the server stops."""


def serve_worker(
    options: dict[str, Any], sock: socket.socket, control: Connection, replacement: bool
) -> None:
    """A worker process: serve the app on ``sock`` until the supervisor says stop (or is gone). A
    ``replacement`` takes connections once its model is ready. Exits ``STARTUP_FAILURE`` if it cannot
    serve."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # the supervisor's to handle
    logging.config.dictConfig(options["log_config"])
    import uvicorn

    from service.app import create_app_from_env

    failures: list[str] = []
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:  # the model failed to load: stop, and tell the supervisor
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app_from_env(on_failed=stop, serve_when_ready=replacement)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    threading.Thread(target=_obey, args=(control, server), name="refinedet-control", daemon=True).start()
    server.run(sockets=[sock])  # a replacement whose model fails to load: uvicorn exits STARTUP_FAILURE
    if failures:
        sys.exit(STARTUP_FAILURE)


def _obey(control: Connection, server: Any) -> None:
    """In a worker: wait for the supervisor's stop (or its end), then stop as uvicorn does on SIGTERM. A
    worker that does not serve yet (a replacement still loading) has no connection: it just exits."""
    with contextlib.suppress(EOFError, OSError):  # EOF: the supervisor is gone
        control.recv()
    if not server.started:
        os._exit(0)
    server.should_exit = True


@dataclass
class Worker:
    process: BaseProcess
    control: Connection  # the supervisor's end: STOP
    started: float = field(default_factory=time.monotonic)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # already gone
            self.control.send(STOP)


class Supervisor:
    """Runs ``count`` workers serving on ``sock`` (bound, ``service.listener.bind_listener``) until
    SIGTERM/SIGINT (module docstring); ``options``: uvicorn's (``service.server.uvicorn_options``).
    ``grace_s``: how long a worker may take to drain before it is killed."""

    def __init__(self, sock: socket.socket, options: dict[str, Any], count: int, grace_s: float) -> None:
        self.sock = sock
        self.options = options
        self.count = count
        self.grace_s = grace_s
        self.workers: list[Worker | None] = []  # None: a slot waiting for its replacement
        self.quick_ends: list[int] = []  # per slot: workers in a row that ended within STABLE_S
        self.due: dict[int, float] = {}  # slot -> when its replacement starts (time.monotonic)
        self.failure: str | None = None
        self._context = multiprocessing.get_context("spawn")
        self._wake_r, self._wake_w = os.pipe()
        self._signalled: int | None = None
        self._metrics_dir = ""

    def run(self) -> None:
        """Serve until a signal (then stop in order); raises ``WorkerFailed`` if a worker could not start."""
        host, port = self.sock.getsockname()[:2]
        operators = os.environ.get(MULTIPROC_ENV)
        with tempfile.TemporaryDirectory(prefix="refinedet-metrics-") as metrics_dir:
            self._metrics_dir = metrics_dir
            os.environ[MULTIPROC_ENV] = metrics_dir  # the workers inherit it (service.metrics)
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                log.info(
                    "serving on %s:%d with %d workers (supervisor %d)", host, port, self.count, os.getpid()
                )
                self.workers = [self._spawn(replacement=False) for _ in range(self.count)]
                self.quick_ends = [0] * self.count
                self._watch()
                self._stop_all()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                if operators is None:
                    os.environ.pop(MULTIPROC_ENV, None)
                else:
                    os.environ[MULTIPROC_ENV] = operators
                os.close(self._wake_r)
                os.close(self._wake_w)
        if self.failure is not None:
            raise WorkerFailed(self.failure)

    def _on_signal(self, sig: int, frame: object) -> None:
        if self._signalled is None:
            self._signalled = sig
            os.write(self._wake_w, b"!")

    def _spawn(self, replacement: bool) -> Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=serve_worker,
            args=(self.options, self.sock, theirs, replacement),
            name="refinedet-worker",
        )
        process.start()
        theirs.close()
        return Worker(process, ours)

    def _watch(self) -> None:
        """Replace workers that die until a signal arrives or one cannot start."""
        while self._signalled is None and self.failure is None:
            timeout = max(0.0, min(self.due.values()) - time.monotonic()) if self.due else None
            ended = wait([w.process.sentinel for w in self.workers if w] + [self._wake_r], timeout)
            for i, worker in enumerate(self.workers):
                if worker is not None and worker.process.sentinel in ended:
                    self._ended(i, worker)
            for i, when in list(self.due.items()):
                if when <= time.monotonic() and self._signalled is None and self.failure is None:
                    del self.due[i]
                    self.workers[i] = self._spawn(replacement=True)

    def _ended(self, index: int, worker: Worker) -> None:
        process = worker.process
        process.join()
        self._forget(worker)
        self.workers[index] = None
        if process.exitcode == STARTUP_FAILURE:
            self.failure = f"worker {process.pid} could not start serving (its model failed to load)"
            log.error("%s: stopping the server", self.failure)
            return
        if self._signalled is not None:
            return
        lived = time.monotonic() - worker.started
        self.quick_ends[index] = self.quick_ends[index] + 1 if lived < STABLE_S else 0
        delay = restart_delay(self.quick_ends[index])
        self.due[index] = time.monotonic() + delay
        log.warning(
            "worker %d ended (exit status %s) after %.1f s: starting a replacement%s, which takes "
            "connections once its model is loaded", process.pid, process.exitcode, lived,
            f" in {delay:.0f} s ({self.quick_ends[index]} workers in a row ended within {STABLE_S:.0f} s)"
            if delay else "",
        )  # fmt: skip

    def _forget(self, worker: Worker) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        worker.control.close()
        if worker.process.pid is not None:
            mark_process_dead(worker.process.pid, self._metrics_dir)

    def _stop_all(self) -> None:
        """New connections stopped, the queued ones accepted, the socket let go; then each worker drains."""
        alive = [w for w in self.workers if w is not None and w.process.is_alive()]
        if alive and stop_handshakes(self.sock) and not wait_accepted(self.sock):
            log.warning("connections were still queued when the listening socket closed")
        self.sock.close()
        log.info("stopping %d worker(s): each drains its requests", len(alive))
        for worker in alive:
            worker.stop()
        deadline = time.monotonic() + self.grace_s + KILL_AFTER_S
        for worker in (w for w in self.workers if w is not None):
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d did not stop in time: killed", worker.process.pid)
                worker.process.kill()
                worker.process.join()
            self._forget(worker)

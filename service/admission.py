"""What every request is held to, whatever route serves it: a deadline, admission by expected wait, a
share of the decoded-pixel budget, and an answer (never a silent drop) when the server drains.

``GuardMiddleware`` (pure ASGI) wraps each HTTP request:

- **Deadline.** Each request gets ``deadline = arrival + request_timeout_s`` (monotonic, in
  ``scope["state"]["refinedet.deadline"]``); the routes wait for the engine until then (504 after), and
  the body must have arrived by then (408, ``service.middleware``).
- **Admission** (inference requests: every POST except the benchmark). Before the body is read: with
  ``ahead`` requests admitted and not finished, the expected wait is ``(ahead // (batch x engine slots)
  + 1) x recent batch time`` (``DynamicBatcher.expected_wait_s``); if that exceeds ``admission_headroom``
  of the time left to the deadline (or ``ahead`` reaches ``max_queue_size``), the answer is 503
  ``overloaded`` + ``Retry-After`` at once. ``Admission.admit`` decides, once per request: under
  ``refinedet serve`` in the HTTP protocol as soon as the headers are complete (``service.protocol``: a
  refused request never becomes an ASGI task), else here.
- **Drain.** When the server starts shutting down (``Admission.begin_drain``, through
  ``ServiceState.begin_drain``), every request in flight gets until ``graceful_timeout_s`` from then; one
  still unanswered at that point is cancelled and answered 503 ``shutting_down``. A request that arrives
  during the drain and cannot be served before it ends is answered 503 ``shutting_down`` at once.
- **Pixels.** ``PixelBudget`` counts the decoded pixels of every image being served; ``read_images``
  reserves an image's width*height (read from its header) before decoding it, 503 if over budget,
  through ``current_reserver`` (set here for each request, so every route that decodes uploads is
  covered); the middleware releases the request's reservations when it ends.

``Admission`` owns all of it: the count of requests admitted and not finished (taken when a request is
admitted, given back when it ends), the pixel budget, the drain, and the batcher requests are admitted to
(set by ``service.state.ServiceState`` while it serves; None before and after).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import BatchObserver, DynamicBatcher
from service.errors import ServiceError, overloaded, send_error, shutting_down
from service.settings import Settings

log = logging.getLogger("refinedet.service")
DEADLINE_KEY = "refinedet.deadline"
ADMITTED_KEY = "refinedet.admitted"  # an inference request admitted (counted in Admission.admitted)
PIXELS_KEY = "refinedet.pixels"
EXEMPT_POSTS = frozenset({"/v1/benchmark"})  # POSTs that are not inference (admission does not apply)


class PixelBudget:
    """Decoded pixels in flight across all requests (thread-safe: decoding runs in worker threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int, held: list[int]) -> None:
        """Take ``pixels`` (appended to ``held``, the request's reservations) or raise 503."""
        with self._lock:
            if self.used + pixels > self.limit:
                raise overloaded("the service is decoding too many large images")
            self.used += pixels
            held.append(pixels)

    def release(self, held: list[int]) -> None:
        with self._lock:
            self.used -= sum(held)
            held.clear()


def pixel_reserver(scope: Scope, budget: PixelBudget) -> Callable[[int], None]:
    """``reserve(pixels)`` for the request of ``scope`` (released by ``GuardMiddleware`` when it ends)."""
    held = scope.setdefault("state", {}).setdefault(PIXELS_KEY, [])
    return lambda pixels: budget.reserve(pixels, held)


# The current request's ``reserve(pixels)``, set by GuardMiddleware, so that whatever decodes an upload
# (``service.routes.uploads.read_images``, for every route) takes from the budget without being told to.
current_reserver: ContextVar[Callable[[int], None] | None] = ContextVar("refinedet_reserve", default=None)


def request_deadline(scope_state: dict[str, Any], timeout_s: float) -> float:
    """The request's deadline (``time.monotonic()`` seconds); ``timeout_s`` from now if none was set."""
    deadline = scope_state.get(DEADLINE_KEY)
    return deadline if deadline is not None else time.monotonic() + timeout_s


def is_inference(scope: Scope) -> bool:
    """Whether admission applies to the request: every POST except the benchmark."""
    return scope["method"] == "POST" and scope["path"] not in EXEMPT_POSTS


class Admission:
    """Which requests are served: admission by deadline, the count of admitted requests, the pixel budget
    and the drain (module docstring). ``observer.on_drop`` counts the refusals ("admission", "draining")."""

    def __init__(self, settings: Settings, observer: BatchObserver) -> None:
        self.settings = settings
        self.observer = observer
        self.admitted = 0  # inference requests admitted and not finished
        self.pixels = PixelBudget(settings.max_pixels_in_flight)
        self.batcher: DynamicBatcher | None = None  # where admitted requests queue, while the app serves
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain ends
        self._watched: set[asyncio.Timeout] = set()

    def admit(self, scope: Scope) -> ServiceError | None:
        """The admission decision for the request of ``scope``, made once, where the request is first seen:
        by the HTTP protocol when its headers are complete and it is next in line on its connection
        (``service.protocol``, through ``service.middleware.early_refusals``), else by ``GuardMiddleware``
        (other ASGI servers, in-process test clients). Sets the request's deadline; an inference request is
        either admitted (counted until ``release``) or gets the 503 to answer it with. None if admitted,
        exempt, or decided already."""
        scope_state = scope.setdefault("state", {})
        if DEADLINE_KEY in scope_state:
            return None
        deadline = scope_state[DEADLINE_KEY] = time.monotonic() + self.settings.request_timeout_s
        if not is_inference(scope) or not self._key_ok(scope):
            return None  # not counted: a request without the API key is answered 401 by the route, at once
        refusal = self.admit_by(deadline)
        if refusal is None:
            scope_state[ADMITTED_KEY] = True
        return refusal

    def _key_ok(self, scope: Scope) -> bool:
        """Whether the request carries the API key (always, without one): strangers are not counted against
        the key holders' admission."""
        if self.settings.api_key is None:
            return True
        name = self.settings.api_key_header.lower().encode("latin-1")
        presented = next((v for k, v in scope.get("headers", ()) if k.lower() == name), None)
        return self.settings.api_key_ok(presented)

    def admit_by(self, deadline: float) -> ServiceError | None:
        """Admit one inference request due by ``deadline`` (monotonic), or the 503 to answer it with now:
        its expected wait (``DynamicBatcher.expected_wait_s``: ``ahead // (batch x slots) + 1`` recent batch
        times) must fit in ``admission_headroom`` of the time it has left (to the drain's end, while
        draining)."""
        now = time.monotonic()
        drain_end = self.drain_deadline
        draining = drain_end is not None and drain_end < deadline
        if drain_end is not None:
            deadline = min(deadline, drain_end)
        batcher = self.batcher
        if batcher is None:
            if draining:
                return shutting_down()
            self.admitted += 1  # the route answers not_ready; counted like any admitted request
            return None
        ahead = self.admitted
        expected = batcher.expected_wait_s(ahead)
        allowed = self.settings.admission_headroom * (deadline - now)
        if ahead >= self.settings.max_queue_size or expected > allowed:
            self.observer.on_drop("draining" if draining else "admission")
            if draining:
                return shutting_down()
            retry_s = max(1, min(60, math.ceil(expected - allowed)))
            return overloaded(f"the service is at capacity (expected wait {expected:.1f} s)", retry_s)
        self.admitted += 1
        return None

    def release(self, scope_state: dict[str, Any]) -> None:
        """The request of ``scope_state`` ended: give back its admission and its pixels."""
        if scope_state.pop(ADMITTED_KEY, False):
            self.admitted -= 1
        held = scope_state.get(PIXELS_KEY)
        if held:
            self.pixels.release(held)

    def begin_drain(self) -> bool:
        """The server stops taking connections: every request in flight (or arriving) is answered within
        ``graceful_timeout_s``. True the first time; the later calls change nothing."""
        if self.drain_deadline is not None:
            return False
        grace = self.settings.graceful_timeout_s
        self.drain_deadline = time.monotonic() + grace
        log.info("draining: %d request(s) in flight get up to %.0f s", len(self._watched), grace)
        for timeout in self._watched:
            self._cap(timeout)
        return True

    def watch(self, timeout: asyncio.Timeout) -> None:
        """Track a request's timeout scope: the drain's end cancels it."""
        self._watched.add(timeout)
        if self.drain_deadline is not None:
            self._cap(timeout)

    def unwatch(self, timeout: asyncio.Timeout) -> None:
        self._watched.discard(timeout)

    def _cap(self, timeout: asyncio.Timeout) -> None:
        assert self.drain_deadline is not None
        when = asyncio.get_running_loop().time() + (self.drain_deadline - time.monotonic())
        current = timeout.when()
        if current is None or current > when:
            timeout.reschedule(when)


class GuardMiddleware:
    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = self.admission
        refusal = admission.admit(scope)
        if refusal is not None:
            settings = admission.settings
            clean = await discard_body(scope, receive, settings.max_upload_bytes, settings.body_timeout_s)
            await send_error(send, refusal, scope["path"], close=not clean)
            return
        scope_state = scope["state"]
        current_reserver.set(pixel_reserver(scope, admission.pixels))  # this request's task (and threads)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(None) as timeout:
                admission.watch(timeout)
                try:
                    await self.app(scope, receive, tracking_send)
                finally:
                    admission.unwatch(timeout)
        except TimeoutError:
            if not timeout.expired():
                raise
            log.warning("drain ended before %s %s was answered", scope["method"], scope["path"])
            if not started:
                await send_error(send, shutting_down(), scope["path"], close=True)
        finally:
            admission.release(scope_state)


async def discard_body(scope: Scope, receive: Receive, limit: int, idle_s: float) -> bool:
    """Read and drop a refused request's body (never buffered or decoded), so that answering it early does
    not reset the connection under the client while it is still sending (a close with unread bytes is
    a TCP reset, which can destroy the answer). False if it could not be read cleanly (over ``limit``,
    a pause over ``idle_s``, the client left): then the answer closes the connection."""
    headers = {k.lower(): v for k, v in scope.get("headers", ())}
    if headers.get(b"expect", b"").lower() == b"100-continue":
        return True  # the client waits for a go-ahead before sending the body: it will not send it
    if headers.get(b"content-length", b"0") in (b"0", b"") and b"transfer-encoding" not in headers:
        return True
    received = 0
    while True:
        try:
            async with asyncio.timeout(idle_s):
                message = await receive()
        except TimeoutError:
            return False
        if message["type"] != "http.request":
            return False
        received += len(message.get("body", b""))
        if received > limit:
            return False
        if not message.get("more_body", False):
            return True

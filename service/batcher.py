"""Dynamic batching: group concurrent requests into engine calls, up to ``concurrency`` calls at once.

A batch starts with the oldest queued request and is cut when it holds ``max_batch_size`` items or when
``max_delay_s`` has passed since that first request arrived (a monotonic deadline). A batch starts as soon
as one of the ``concurrency`` engine slots is free, so with ``max_delay_s = 0`` a lone request runs at
once and, under load, everything that queued while the slots worked becomes the next batch (no timer on
the latency path). One slot (a GPU: one batch after another) is the default; on a CPU the service runs as
many slots as the engine has threads, each taking the next request the moment it is free, so no core
waits for the slowest image of a batch (``service.detector.BatchDetector`` gives a call that runs alone all
the threads). Before a batch runs, requests whose caller already gave up (timed out, so their future is
cancelled) are dropped, and so are those whose client disconnected, asked only of requests that waited
at least ``disconnect_check_s`` (asking costs a turn of the event loop per request; a request younger
than that is cheaper to run than to ask about). Engine calls run on the slots' worker threads, never on
the event loop, and every submitted future is resolved exactly once: with its own result (results are
matched to requests by position; an ``Exception`` instance in the results fails that request alone),
with the batch's exception, or with ``ClientGone`` / ``ShuttingDown`` / ``TooLate``. It also keeps the
recent batch time (``batch_seconds``, a moving average), from which admission control estimates a new
request's wait (``expected_wait_s``), and a watchdog for readiness (``stalled_s``): how long the engine has
had work without finishing any, or the oldest call in flight has run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("refinedet.service")
BATCH_TIME_WEIGHT = 0.3  # of the newest batch in the moving average


class QueueFull(Exception):
    """The bounded queue is full: answer 503 with Retry-After."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new work."""


class ClientGone(Exception):
    """The client disconnected before its request reached the engine; it was not run."""


class TooLate(Exception):
    """The request's deadline would pass before its batch finished (at the recent batch time); it was
    not run: answer 503 with Retry-After rather than make it wait for a 504."""


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    is_disconnected: Callable[[], Awaitable[bool]] | None = None
    deadline: float | None = None  # time.monotonic() by which its answer is due


_STOP: Any = object()


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def on_batch(self, size: int) -> None: ...

    def on_drop(self, reason: str) -> None: ...

    def on_queue(self, depth: int) -> None:
        """The number of requests waiting for a batch (``DynamicBatcher.depth``) changed."""


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R | Exception]],
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
        disconnect_check_s: float = 0.02,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.process = process
        self.concurrency = concurrency
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self.observer = observer or BatchObserver()
        self.disconnect_check_s = disconnect_check_s
        self._queue: asyncio.Queue[_Pending[T]] = (
            asyncio.Queue()
        )  # bounded by hand: the stop marker always fits
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="refinedet-engine")
        self._slots = asyncio.Semaphore(concurrency)  # engine calls that may run at once
        self._exclusive = asyncio.Lock()  # one exclusive user (``exclusive``) at a time
        self._task: asyncio.Task | None = None
        self._calls: dict[asyncio.Task, float] = {}  # engine calls in flight: when each started
        self._waiting: _Pending[T] | None = None  # taken from the queue, waiting for a free slot
        self._closing = False
        self.batch_seconds: float | None = None  # moving average of recent engine calls (wall time)
        self._running: set[asyncio.Future] = set()
        self._progress_at = time.monotonic()  # last work finished, or when work came to an idle engine

    def expected_wait_s(self, ahead: int) -> float:
        """Expected seconds until a request with ``ahead`` images before it is answered: its batch and
        those ahead of it, ``concurrency`` batches at a time, at the recent batch time (0 before the first
        batch)."""
        if self.batch_seconds is None:
            return 0.0
        return (ahead // (self.max_batch_size * self.concurrency) + 1) * self.batch_seconds

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize() + (self._waiting is not None)

    @property
    def busy(self) -> bool:
        """Whether the engine has work: calls in flight, requests queued, or an exclusive user."""
        return bool(self._calls) or self.depth > 0 or self._exclusive.locked()

    def progress(self) -> None:
        """Note that the engine finished some work (each engine call does; an exclusive user calls it after
        each unit of its own). Safe from any thread."""
        self._progress_at = time.monotonic()

    def stalled_s(self) -> float:
        """The watchdog (readiness): seconds the engine has had work without finishing any (since the last
        ``progress``, or since work came to an idle engine), or the oldest call in flight has run, whichever
        is longer; 0 while idle."""
        now = time.monotonic()
        waiting = now - self._progress_at if self.busy else 0.0
        return max(waiting, now - min(self._calls.values(), default=now))

    def _work_arrives(self) -> None:
        if not self.busy:  # an idle engine is not a stalled one: its clock starts now
            self.progress()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[ThreadPoolExecutor]:
        """Every engine slot, once the calls in flight have finished: other engine work (the benchmark)
        runs on the yielded executor with the engine to itself, calling ``progress`` as it goes. Exclusive
        users take the engine one after another (``_exclusive``): two taking slots at once could each hold
        some and wait for the others' forever, and every request with them."""
        self._work_arrives()
        async with self._exclusive:
            taken = 0
            try:
                for _ in range(self.concurrency):
                    await self._slots.acquire()
                    taken += 1
                yield self._executor
            finally:
                for _ in range(taken):
                    self._slots.release()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="refinedet-batcher")

    def submit(
        self,
        item: T,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        deadline: float | None = None,
    ) -> asyncio.Future:
        """Queue one item; the future resolves to (result, queue seconds). Raises QueueFull / ShuttingDown.
        An item whose ``deadline`` (monotonic) would pass before its batch finished is not run: its future
        fails with ``TooLate``."""
        if self._closing or self._task is None:
            raise ShuttingDown("the service is shutting down")
        if self.depth >= self.max_queue_size:
            self.observer.on_drop("queue_full")
            raise QueueFull(f"{self.max_queue_size} requests are already queued")
        future = asyncio.get_running_loop().create_future()
        self._work_arrives()
        self._queue.put_nowait(_Pending(item, future, is_disconnected=is_disconnected, deadline=deadline))
        self.observer.on_queue(self.depth)
        return future

    def started(self, future: asyncio.Future) -> bool:
        """Whether ``future``'s item is in the batch the engine is running."""
        return future in self._running

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking work, finish everything already queued (up to ``timeout_s``), then stop."""
        self._closing = True
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.warning("batcher did not drain in %.1f s; cancelling the rest", timeout_s)
                self._task.cancel()
                _fail(self._running, ShuttingDown("the service shut down while this request ran"))
        self._fail_queued(ShuttingDown("the service shut down before this request ran"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        stopping = False
        try:
            while not stopping:
                first = await self._queue.get()
                if first is _STOP:
                    break
                self._waiting = first  # still queued, as far as anyone asks, until a slot is free
                await self._slots.acquire()  # meanwhile the batch fills with what queues
                self._waiting = None
                self.observer.on_queue(self.depth)
                batch, stopping = await self._collect(first)
                self.observer.on_queue(self.depth)
                live = await self._drop_abandoned(batch)
                if not live:
                    self._slots.release()
                    continue
                call = asyncio.get_running_loop().create_task(self._execute(live))
                self._calls[call] = time.monotonic()
                call.add_done_callback(self._call_done)
            if self._calls:
                await asyncio.wait(set(self._calls))
        except asyncio.CancelledError:
            self._fail_queued(ShuttingDown("the service shut down before this request ran"))
            for call in self._calls:  # each fails its batch with ShuttingDown
                call.cancel()
            raise

    def _call_done(self, call: asyncio.Task) -> None:
        self._calls.pop(call, None)
        self.progress()
        self._slots.release()

    async def _collect(self, first: _Pending[T]) -> tuple[list[_Pending[T]], bool]:
        """Fill a batch until it is full or the first item's deadline passes. Returns (batch, stop seen)."""
        batch = [first]
        deadline = first.enqueued + self.max_delay_s
        while len(batch) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                pending = self._queue.get_nowait()
            if pending is _STOP:
                return batch, True
            batch.append(pending)
        return batch, False

    async def _drop_abandoned(self, batch: list[_Pending[T]]) -> list[_Pending[T]]:
        waiting = [p for p in batch if not p.future.done()]  # done: the caller timed out and cancelled it
        for _ in range(len(batch) - len(waiting)):
            self.observer.on_drop("timeout")
        finish = time.monotonic() + (self.batch_seconds or 0.0)
        for pending in waiting:
            if pending.deadline is not None and finish > pending.deadline:
                pending.future.set_exception(TooLate("the request could not be served before its deadline"))
                self.observer.on_drop("too_late")
        waiting = [p for p in waiting if not p.future.done()]
        asked_before = time.monotonic() - self.disconnect_check_s
        ask = [p for p in waiting if p.is_disconnected is not None and p.enqueued <= asked_before]
        if ask:
            for pending, left in zip(ask, await asyncio.gather(*map(_client_left, ask)), strict=True):
                if left and not pending.future.done():
                    pending.future.set_exception(ClientGone("client disconnected before inference"))
                    self.observer.on_drop("client_gone")
        return [p for p in waiting if not p.future.done()]

    async def _execute(self, batch: list[_Pending[T]]) -> None:
        started = time.monotonic()
        self.observer.on_batch(len(batch))
        loop = asyncio.get_running_loop()
        futures = {p.future for p in batch}
        self._running |= futures
        try:
            results = await loop.run_in_executor(self._executor, self.process, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} inputs")
        except asyncio.CancelledError:
            _fail(futures, ShuttingDown("the service shut down while this request ran"))
            raise
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            _fail(futures, exc)
            return
        finally:
            self._running -= futures
            self._record(time.monotonic() - started)
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, Exception):  # this item alone failed (e.g. an undecodable image)
                pending.future.set_exception(result)
            else:
                pending.future.set_result((result, started - pending.enqueued))

    def _record(self, seconds: float) -> None:
        last = self.batch_seconds
        self.batch_seconds = seconds if last is None else last + BATCH_TIME_WEIGHT * (seconds - last)

    def _fail_queued(self, exc: Exception) -> None:
        queued = [self._waiting] if self._waiting is not None else []
        self._waiting = None
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        self.observer.on_queue(0)
        _fail([p.future for p in queued if p is not _STOP], exc)


async def _client_left(pending: _Pending[Any]) -> bool:
    return pending.is_disconnected is not None and await pending.is_disconnected()


def _fail(futures: Iterable[asyncio.Future], exc: BaseException) -> None:
    for future in list(futures):
        if not future.done():
            future.set_exception(exc)

"""DynamicBatcher: batches cut at size or deadline, results matched to requests, abandoned requests
skipped, bounded queue, one resolution per future, draining on stop, several engine calls at once
(each slot taking the next request the moment it is free) and exclusive use of the engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batcher import BatchObserver, ClientGone, DynamicBatcher, QueueFull, ShuttingDown, TooLate


class Recorder(BatchObserver):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.drops: list[str] = []

    def on_batch(self, size: int) -> None:
        self.batches.append(size)

    def on_drop(self, reason: str) -> None:
        self.drops.append(reason)


def doubler(calls: list[list[int]], delay_s: float = 0.0):
    def process(items):
        calls.append(list(items))
        if delay_s:
            time.sleep(delay_s)
        return [2 * x for x in items]

    return process


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_form_one_batch_and_get_their_own_results():
    async def main():
        calls: list[list[int]] = []
        obs = Recorder()
        b = DynamicBatcher(doubler(calls), max_batch_size=8, max_delay_s=0.2, max_queue_size=16, observer=obs)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(5)))
        await b.stop()
        return calls, obs, results

    calls, obs, results = run(main())
    assert calls == [[0, 1, 2, 3, 4]] and obs.batches == [5]
    assert [r for r, _ in results] == [0, 2, 4, 6, 8]
    assert all(q >= 0 for _, q in results)


def test_batch_is_cut_at_max_size_without_waiting_for_the_deadline():
    async def main():
        calls: list[list[int]] = []
        b = DynamicBatcher(doubler(calls), max_batch_size=3, max_delay_s=5.0, max_queue_size=16)
        b.start()
        start = time.monotonic()
        results = await asyncio.gather(*(b.submit(i) for i in range(6)))
        elapsed = time.monotonic() - start
        await b.stop()
        return calls, results, elapsed

    calls, results, elapsed = run(main())
    assert calls == [[0, 1, 2], [3, 4, 5]]
    assert [r for r, _ in results] == [0, 2, 4, 6, 8, 10]
    assert elapsed < 2.0  # full batches never waited for the 5 s deadline


def test_a_lone_request_runs_after_the_deadline():
    async def main():
        calls: list[list[int]] = []
        b = DynamicBatcher(doubler(calls), max_batch_size=8, max_delay_s=0.05, max_queue_size=4)
        b.start()
        start = time.monotonic()
        result, queue_s = await b.submit(21)
        elapsed = time.monotonic() - start
        await b.stop()
        return calls, result, queue_s, elapsed

    calls, result, queue_s, elapsed = run(main())
    assert calls == [[21]] and result == 42
    assert queue_s >= 0.04 and 0.04 <= elapsed < 2.0


def test_requests_whose_client_left_or_timed_out_are_dropped_before_the_engine():
    async def main():
        calls: list[list[int]] = []
        obs = Recorder()
        b = DynamicBatcher(doubler(calls), max_batch_size=8, max_delay_s=0.1, max_queue_size=16, observer=obs)
        b.start()

        async def gone() -> bool:
            return True

        async def here() -> bool:
            return False

        kept = b.submit(1, here)
        left = b.submit(2, gone)
        timed_out = b.submit(3)
        timed_out.cancel()  # what asyncio.wait_for does to a request that timed out
        result = await kept
        with pytest.raises(ClientGone):
            await left
        await b.stop()
        return calls, obs, result, timed_out

    calls, obs, result, timed_out = run(main())
    assert calls == [[1]] and result[0] == 2
    assert sorted(obs.drops) == ["client_gone", "timeout"] and timed_out.cancelled()


def test_full_queue_is_refused_and_engine_errors_reach_every_request():
    async def main():
        busy, release = threading.Event(), threading.Event()

        def blocked(items):
            busy.set()
            release.wait(5)
            if 99 in items:
                raise RuntimeError("engine failed")
            return list(items)

        obs = Recorder()
        b = DynamicBatcher(blocked, max_batch_size=1, max_delay_s=0.0, max_queue_size=2, observer=obs)
        b.start()
        first = b.submit(0)
        assert await asyncio.to_thread(busy.wait, 10)  # the engine holds item 0; the queue the next two
        queued = [b.submit(99), b.submit(99)]
        with pytest.raises(QueueFull):
            b.submit(5)
        release.set()
        outcome = await asyncio.gather(first, *queued, return_exceptions=True)
        await b.stop()
        return outcome, obs

    outcome, obs = run(main())
    assert outcome[0] == (0, pytest.approx(outcome[0][1]))
    assert all(isinstance(o, RuntimeError) for o in outcome[1:])
    assert obs.drops == ["queue_full"]


def test_stop_drains_queued_work_then_refuses_new_work():
    async def main():
        calls: list[list[int]] = []
        b = DynamicBatcher(
            doubler(calls, delay_s=0.05), max_batch_size=2, max_delay_s=0.01, max_queue_size=16
        )
        b.start()
        futures = [b.submit(i) for i in range(5)]
        await b.stop(timeout_s=10)
        with pytest.raises(ShuttingDown):
            b.submit(9)
        return [f.result()[0] for f in futures], calls

    results, calls = run(main())
    assert results == [0, 2, 4, 6, 8]
    assert sum(len(c) for c in calls) == 5 and max(len(c) for c in calls) <= 2


def test_an_exception_returned_for_one_item_fails_that_request_only():
    async def main():
        def process(items):
            return [ValueError(f"bad {x}") if x < 0 else 2 * x for x in items]

        b = DynamicBatcher(process, max_batch_size=8, max_delay_s=0.1, max_queue_size=16)
        b.start()
        outcome = await asyncio.gather(*(b.submit(x) for x in (1, -1, 3)), return_exceptions=True)
        await b.stop()
        return outcome

    first, failed, third = run(main())
    assert first[0] == 2 and third[0] == 6
    assert isinstance(failed, ValueError) and str(failed) == "bad -1"


def test_only_requests_that_waited_are_asked_whether_their_client_left():
    """Asking costs a turn of the event loop: a request younger than ``disconnect_check_s`` runs unasked.
    The two limits are far from any real wait (0 s: every request is old enough; an hour: none is), so
    the outcome does not depend on how fast the machine is."""

    async def asked_with(disconnect_check_s: float) -> tuple[list[int], int]:
        asked: list[int] = []

        async def is_disconnected() -> bool:
            asked.append(1)
            return False

        b = DynamicBatcher(doubler([]), max_batch_size=2, max_delay_s=0.0, max_queue_size=16,
                           disconnect_check_s=disconnect_check_s)  # fmt: skip
        b.start()
        result, _ = await b.submit(3, is_disconnected)
        await b.stop()
        return asked, result

    assert run(asked_with(3600.0)) == ([], 6)  # younger than the limit: run without asking
    assert run(asked_with(0.0)) == ([1], 6)  # older: asked once, still connected, so it runs


def test_zero_delay_runs_at_once_and_batches_what_queued_while_the_engine_worked():
    """The default (max_delay 0): the first request runs alone at once; the ones submitted while the
    engine is busy with it become the next batch together."""

    async def main():
        calls: list[list[int]] = []
        busy, release = threading.Event(), threading.Event()
        double = doubler(calls)

        def held(items):
            busy.set()
            release.wait(10)
            return double(items)

        b = DynamicBatcher(held, max_batch_size=8, max_delay_s=0.0, max_queue_size=16)
        b.start()
        first = b.submit(0)
        assert await asyncio.to_thread(busy.wait, 10)  # the engine is now busy with [0]
        rest = [b.submit(i) for i in range(1, 5)]
        release.set()
        results = await asyncio.gather(first, *rest)
        await b.stop()
        return calls, results

    calls, results = run(main())
    assert calls == [[0], [1, 2, 3, 4]]
    assert [r for r, _ in results] == [0, 2, 4, 6, 8]


def test_requests_that_cannot_finish_by_their_deadline_are_not_run():
    """With the recent batch time known, an item whose deadline would pass before its batch finished fails
    with TooLate (answered 503, never run); the expected wait grows with the work ahead."""

    async def main():
        calls: list[list[int]] = []
        obs = Recorder()
        b = DynamicBatcher(doubler(calls), max_batch_size=2, max_delay_s=0.0, max_queue_size=16, observer=obs)
        b.start()
        assert b.expected_wait_s(5) == 0.0  # nothing measured yet
        await b.submit(1)
        b.batch_seconds = 10.0  # as if batches took 10 s lately
        assert b.expected_wait_s(0) == 10.0 and b.expected_wait_s(5) == 30.0
        now = time.monotonic()
        late = b.submit(2, deadline=now + 1.0)
        fine = b.submit(3, deadline=now + 60.0)
        outcomes = await asyncio.gather(late, fine, return_exceptions=True)
        await b.stop()
        return calls, obs, outcomes

    calls, obs, (late, fine) = run(main())
    assert isinstance(late, TooLate) and fine[0] == 6
    assert calls == [[1], [3]] and obs.drops == ["too_late"]


def test_slots_run_calls_at_once_and_each_takes_the_next_request_when_free():
    """concurrency=2: two calls run at once; while one is held, the other slot serves every request
    queued after it (none waits for the held one), and results still go to their own requests."""

    async def main():
        held, release = threading.Event(), threading.Event()
        running_now, most = [0], [0]
        lock = threading.Lock()

        def process(items):
            with lock:
                running_now[0] += 1
                most[0] = max(most[0], running_now[0])
            try:
                if items == [0]:
                    held.set()
                    assert release.wait(30)
                return [10 * x for x in items]
            finally:
                with lock:
                    running_now[0] -= 1

        obs = Recorder()
        b = DynamicBatcher(process, max_batch_size=1, max_delay_s=0.0, max_queue_size=16, observer=obs,
                           concurrency=2)  # fmt: skip
        b.start()
        first = b.submit(0)
        assert await asyncio.to_thread(held.wait, 10)
        others = await asyncio.gather(*(b.submit(x) for x in range(1, 6)))  # served by the free slot
        assert not first.done() and b.started(first)
        release.set()
        result = await first
        await b.stop()
        return result, others, obs, most[0]

    result, others, obs, most = run(main())
    assert result[0] == 0 and [r for r, _ in others] == [10, 20, 30, 40, 50]
    assert obs.batches == [1] * 6 and most == 2


def test_exclusive_waits_for_calls_in_flight_and_holds_new_batches():
    async def main():
        calls: list[list[int]] = []
        release = threading.Event()
        started = threading.Event()

        def process(items):
            calls.append(list(items))
            started.set()
            assert release.wait(30)
            return list(items)

        b = DynamicBatcher(process, max_batch_size=1, max_delay_s=0.0, max_queue_size=16, concurrency=2)
        b.start()
        running_one = b.submit(1)
        assert await asyncio.to_thread(started.wait, 10)
        order: list[str] = []

        async def benchmark():
            async with b.exclusive() as executor:
                order.append("exclusive")
                assert await asyncio.get_running_loop().run_in_executor(executor, lambda: 42) == 42
                order.append("exclusive done")

        bench = asyncio.create_task(benchmark())
        await asyncio.sleep(0)  # the benchmark takes the free slot and waits for the busy one
        later = b.submit(2)
        release.set()
        await running_one
        order.append("first done")
        await bench
        await later
        order.append("later done")
        await b.stop()
        return order, calls

    order, calls = run(main())
    assert order == ["first done", "exclusive", "exclusive done", "later done"]
    assert calls == [[1], [2]]


def test_expected_wait_counts_the_slots():
    b = DynamicBatcher(
        lambda items: items, max_batch_size=2, max_delay_s=0.0, max_queue_size=16, concurrency=3
    )
    assert b.expected_wait_s(5) == 0.0  # no batch timed yet
    b.batch_seconds = 0.5
    assert [b.expected_wait_s(ahead) for ahead in (0, 5, 6, 13)] == [0.5, 0.5, 1.0, 1.5]
    with pytest.raises(ValueError, match="concurrency"):
        DynamicBatcher(
            lambda items: items, max_batch_size=1, max_delay_s=0.0, max_queue_size=1, concurrency=0
        )


def test_concurrent_exclusive_users_take_the_engine_in_turn_without_deadlock():
    """Issue #25: three benchmarks at once each took one of the engine slots and waited for the others
    forever, and every request after them waited too. They must take the engine one after another."""

    async def main():
        b = DynamicBatcher(lambda items: list(items), max_batch_size=1, max_delay_s=0.0, max_queue_size=16,
                           concurrency=2)  # fmt: skip
        b.start()
        order: list[int] = []

        async def benchmark(k: int) -> None:
            async with b.exclusive():
                order.append(k)
                await asyncio.sleep(0.01)
                order.append(k)

        await asyncio.wait_for(asyncio.gather(*(benchmark(k) for k in range(3))), 10)
        assert sorted(order) == [0, 0, 1, 1, 2, 2]
        assert all(order[i] == order[i + 1] for i in range(0, 6, 2)), order  # never interleaved
        result, _ = await asyncio.wait_for(b.submit(7), 10)  # the engine is free again afterwards
        assert result == 7
        await b.stop()

    asyncio.run(main())


def test_the_stall_clock_runs_only_while_the_engine_has_work():
    """The readiness watchdog: an engine idle for long is not stalled when work arrives; one that has work
    and finishes none is, for as long as that lasts."""

    async def main():
        release = threading.Event()
        b = DynamicBatcher(lambda items: [release.wait(30) and x for x in items], max_batch_size=1,
                           max_delay_s=0.0, max_queue_size=16)  # fmt: skip
        b.start()
        b._progress_at -= 100  # the last work finished long ago
        idle = b.stalled_s()
        future = b.submit(1)
        arrived = b.stalled_s()
        while b.stalled_s() < 0.2:  # the call runs and finishes nothing
            await asyncio.sleep(0.01)
        release.set()
        assert (await future)[0] == 1
        for _ in range(500):  # the call's slot is given back just after its future resolves
            if not b.busy:
                break
            await asyncio.sleep(0.01)
        done = b.stalled_s()
        await b.stop()
        return idle, arrived, done

    idle, arrived, done = run(main())
    assert idle == 0.0 and arrived < 5 and done == 0.0


def test_a_hung_call_is_a_stall_though_other_slots_progress():
    async def main():
        hang = threading.Event()

        def process(items):
            if items == ["hang"]:
                assert hang.wait(30)
            return list(items)

        b = DynamicBatcher(process, max_batch_size=1, max_delay_s=0.0, max_queue_size=16, concurrency=2)
        b.start()
        hung = b.submit("hang")
        start = time.monotonic()
        while time.monotonic() - start < 0.3:  # the other slot keeps finishing work meanwhile
            assert (await b.submit("ok"))[0] == "ok"
        stalled = b.stalled_s()
        b.progress()  # an exclusive user's progress does not hide the hung call either
        still = b.stalled_s()
        hang.set()
        await hung
        await b.stop()
        return stalled, still

    stalled, still = run(main())
    assert stalled >= 0.25 and still >= 0.25  # the call started just after the clock above
